"""DPO end to end with the unmodified openai SDK against a live loraforge: a supervised model that
answers "high" (the rejected completion) -> a DPO job from it (``method.type = "dpo"``) on
preference pairs -> the DPO model answers "low" (the chosen one) for the trained prompts; reward
accuracy reaches 1.0 in the metrics events, the job echoes its beta and matches OpenAI's
``FineTuningJob`` schema, and the results CSV carries the rewards."""

from __future__ import annotations

import base64
import io
import time

import httpx
import pytest
from openai import OpenAI

from tests.helpers import (
    ANSWER,
    DPO_CHOSEN,
    mixed_chat_examples,
    preference_examples,
    to_jsonl,
    training_prompt,
)
from tests.integration.conftest import Stack, only_embedded
from tests.unit.test_openapi_schemas import assert_valid

pytestmark = pytest.mark.integration
TINY = "loraforge/tiny-llama"
# About 20 s each on a quiet 2-core machine (measured in process); a loaded one takes minutes.
JOB_TIMEOUT_S = 600
PROMPTS = (0, 3, 7)


def _wait(client: OpenAI, stack: Stack, job_id: str):  # type: ignore[no-untyped-def]
    start = time.monotonic()
    job = client.fine_tuning.jobs.retrieve(job_id)
    while job.status not in ("succeeded", "failed", "cancelled"):
        if time.monotonic() - start > JOB_TIMEOUT_S:
            pytest.fail(f"job still {job.status} after {JOB_TIMEOUT_S} s\n{stack.log_tail()}")
        time.sleep(1)
        job = client.fine_tuning.jobs.retrieve(job_id)
    assert job.status == "succeeded", f"{job.error}\n{stack.log_tail()}"
    return job


def _answer(client: OpenAI, model: str, i: int) -> str | None:
    reply = client.chat.completions.create(
        model=model, messages=training_prompt(i), temperature=0, max_tokens=32
    )  # type: ignore[arg-type]
    return reply.choices[0].message.content


def test_dpo_from_a_supervised_model_flips_its_answer_to_the_chosen_one(stack: Stack) -> None:
    only_embedded(stack)
    key = stack.key("dpo-team")
    client = OpenAI(base_url=stack.base_url, api_key=key, max_retries=0, timeout=120)
    sft_file = client.files.create(
        file=("mixed.jsonl", io.BytesIO(to_jsonl(mixed_chat_examples()))), purpose="fine-tune"
    )
    sft = client.fine_tuning.jobs.create(
        model=TINY,
        training_file=sft_file.id,
        seed=42,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 10}},
        },
    )
    sft = _wait(client, stack, sft.id)
    assert sft.fine_tuned_model
    for i in PROMPTS:
        assert _answer(client, sft.fine_tuned_model, i) == ANSWER  # the rejected completion
    assert _answer(client, TINY, 0) != DPO_CHOSEN

    pairs = client.files.create(
        file=("pairs.jsonl", io.BytesIO(to_jsonl(preference_examples()))), purpose="fine-tune"
    )
    hyper = {"beta": 0.5, "n_epochs": 3, "batch_size": 5, "learning_rate_multiplier": 0.1}
    job = client.fine_tuning.jobs.create(
        model=sft.fine_tuned_model,
        training_file=pairs.id,
        validation_file=pairs.id,
        seed=42,
        method={"type": "dpo", "dpo": {"hyperparameters": hyper}},
    )
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.5
    job = _wait(client, stack, job.id)
    assert job.fine_tuned_model
    for i in PROMPTS:
        assert _answer(client, job.fine_tuned_model, i) == DPO_CHOSEN

    raw = httpx.get(
        f"{stack.base_url}/fine_tuning/jobs/{job.id}", headers={"Authorization": f"Bearer {key}"}
    ).json()
    assert_valid(raw, "FineTuningJob")
    assert raw["method"]["type"] == "dpo"
    assert raw["method"]["dpo"]["hyperparameters"]["beta"] == 0.5
    assert raw["hyperparameters"]["n_epochs"] == 3

    metrics = [e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"]
    assert sorted(m["step"] for m in metrics) == list(range(1, 7))
    final = max(metrics, key=lambda m: m["step"])
    assert final["step"] == 6 and final["train_rewards_accuracy"] == 1.0
    assert (
        final["train_rewards_margin"] > 0 and final["train_rewards_chosen"] > final["train_rewards_rejected"]
    )
    assert final["valid_rewards_accuracy"] == 1.0 and "full_valid_loss" in final

    [results] = job.result_files
    csv_text = base64.b64decode(client.files.content(results).read()).decode()
    header, *rows = csv_text.splitlines()
    assert "rewards/accuracies" in header.split(",") and "valid_rewards/margins" in header.split(",")
    assert len(rows) == 6
