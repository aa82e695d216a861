"""Weights & Biases on the live stack: the org's key set through the API, a job created
with ``integrations`` through the SDK, its W&B run (offline: the stack runs with
``WANDB_MODE=offline``) read back from the worker's run files: every metrics event, the LoRA
settings and the plan; the run's event; the key nowhere but encrypted in the database."""

from __future__ import annotations

import io
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.helpers import chat_examples, to_jsonl
from tests.integration.conftest import Stack, only_embedded
from tests.wandb_files import read_run

pytestmark = pytest.mark.integration

TINY = "loraforge/tiny-llama"
ORG = "wandb-org"
WANDB_KEY = "local-0123456789abcdef0123456789abcdef01234567"
INTEGRATION = {"type": "wandb", "wandb": {"project": "support-tickets", "name": "tiny-run", "tags": ["ci"]}}


def _holds(path: Path, secret: bytes) -> bool:
    try:
        return path.is_file() and path.suffix != ".sqlite" and secret in path.read_bytes()
    except OSError:  # removed meanwhile (another test's files)
        return False


def test_a_job_logs_its_metrics_to_its_wandb_run(stack: Stack) -> None:
    only_embedded(stack)
    client = OpenAI(base_url=stack.base_url, api_key=stack.key(ORG), max_retries=0, timeout=60)
    # The org's key, set through the API (the operator's `loraforge orgs wandb` is a unit test).
    body = {"api_key": WANDB_KEY, "entity": "acme-team"}
    client.post("/organization/integrations/wandb", body=body, cast_to=httpx.Response)
    status = client.get("/organization/integrations/wandb", cast_to=httpx.Response).json()
    assert status["configured"] and status["api_key_hint"] == "…" + WANDB_KEY[-4:]
    assert status["entity"] == "acme-team" and WANDB_KEY not in str(status)

    file_id = client.files.create(
        file=("train.jsonl", io.BytesIO(to_jsonl(chat_examples(10)))), purpose="fine-tune"
    ).id
    job = client.fine_tuning.jobs.create(
        model=TINY,
        training_file=file_id,
        hyperparameters={"n_epochs": 2, "batch_size": 5},
        integrations=[INTEGRATION],  # type: ignore[list-item]
    )
    deadline = time.monotonic() + 180
    while job.status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job still {job.status}\n{stack.log_tail()}"
        time.sleep(0.5)
        job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", f"{job.error}\n{stack.log_tail()}"
    assert [i.model_dump(exclude_none=True) for i in job.integrations or []] == [INTEGRATION]

    events = list(reversed(list(client.fine_tuning.jobs.list_events(job.id, limit=1000))))
    metrics = [e.data for e in events if e.type == "metrics"]
    runs = [e for e in events if e.message.startswith("Weights & Biases run")]
    assert len(runs) == 1 and runs[0].data["wandb_run_id"] == job.id and runs[0].data["offline"]
    assert not [e for e in events if e.level == "warn" and "Weights & Biases" in e.message]

    logged = read_run(stack.home / "wandb" / job.id, timeout=60)
    assert (logged.run_id, logged.project, logged.tags) == (job.id, "support-tickets", ["ci"])
    rows = {r["_step"]: r for r in logged.history if "train_loss" in r}
    assert sorted(rows) == [m["step"] for m in metrics] and len(rows) >= 3
    for m in metrics:
        assert rows[m["step"]]["train_loss"] == pytest.approx(m["train_loss"])
        assert rows[m["step"]]["train_mean_token_accuracy"] == pytest.approx(m["train_mean_token_accuracy"])
    config = {k: v.get("value", v) if isinstance(v, dict) else v for k, v in logged.config.items()}
    public = job.model_dump()
    assert config["lora"]["r"] == public["hyperparameters"]["lora_r"]
    assert config["plan"] == public["plan"] and config["plan"]["pool"]
    resolved = config["resolved_hyperparameters"]
    assert (resolved["n_epochs"], resolved["batch_size"], resolved["total_steps"]) == (2, 5, 4)
    assert logged.summary["trained_tokens"] == job.trained_tokens

    # The key: only its encrypted form, in the database; never in a log, a run file or the job.
    assert not [p for p in stack.home.rglob("*") if _holds(p, WANDB_KEY.encode())]
    assert WANDB_KEY not in client.fine_tuning.jobs.retrieve(job.id).model_dump_json()
