"""Weights & Biases: the org's key is write-only and stored encrypted; a job echoes its
``integrations`` and needs the key; the worker's run logs every metrics event, the resolved
hyperparameters, the LoRA settings and the plan (offline run files read back); an unreachable W&B
is one warning event and never blocks the job."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from loraforge.contracts.trainer_events import parse_event
from loraforge.db.models import JobEvent, OrgIntegration
from loraforge.db.session import make_engine, make_sessionmaker, session_scope
from loraforge.settings import Settings
from loraforge.worker.progress import RunProgress
from loraforge.worker.wandb_run import WandbRun
from tests.helpers import chat_examples, to_jsonl
from tests.wandb_files import read_run

TINY = "loraforge/tiny-llama"
KEY = "wandb-test-key-0123456789abcdef0123456789abcdef"
WANDB = {"type": "wandb", "wandb": {"project": "tickets", "name": "run-1", "tags": ["ci", "tiny"]}}


def sdk(api: TestClient, key: str) -> OpenAI:
    return OpenAI(base_url="http://testserver/v1", api_key=key, http_client=api, max_retries=0)


@pytest.fixture
def sessions(settings: Settings, api: TestClient) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings)
    yield make_sessionmaker(engine)
    engine.dispose()


def _status(client: OpenAI, method: str = "get", **body: object) -> dict:
    call = getattr(client, method)
    kwargs = {"body": body} if method == "post" else {}
    response = call("/organization/integrations/wandb", cast_to=httpx.Response, **kwargs)
    return dict(response.json())


def test_operator_cli_sets_and_clears_the_key(api, make_key, settings, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from loraforge import cli, cli_orgs

    client = sdk(api, make_key("acme"))
    monkeypatch.setattr(cli_orgs, "get_settings", lambda: settings)
    runner = CliRunner()
    done = runner.invoke(cli.app, ["orgs", "wandb", "acme", "--entity", "acme-team"], input=KEY + "\n")
    assert done.exit_code == 0, done.output
    assert KEY not in done.output and "…cdef" in done.output
    assert _status(client)["configured"] is True and _status(client)["entity"] == "acme-team"
    assert runner.invoke(cli.app, ["orgs", "wandb", "nobody"], input=KEY + "\n").exit_code == 2
    assert runner.invoke(cli.app, ["orgs", "wandb", "acme"], input="\n").exit_code != 0  # no key
    cleared = runner.invoke(cli.app, ["orgs", "wandb", "acme", "--clear"])
    assert cleared.exit_code == 0 and "removed" in cleared.output
    assert _status(client)["configured"] is False


def _job(client: OpenAI, **extra: object):  # type: ignore[no-untyped-def]
    data = io.BytesIO(to_jsonl(chat_examples(10)))
    file_id = client.files.create(file=("t.jsonl", data), purpose="fine-tune").id
    return client.fine_tuning.jobs.create(model=TINY, training_file=file_id, **extra)  # type: ignore[arg-type]


def test_org_key_is_write_only_encrypted_and_per_org(api, make_key, sessions) -> None:  # type: ignore[no-untyped-def]
    acme, other = sdk(api, make_key("acme")), sdk(api, make_key("other"))
    assert _status(acme)["configured"] is False
    answer = _status(acme, "post", api_key=KEY, entity="acme-team")
    assert answer == {
        "object": "organization.integration",
        "type": "wandb",
        "configured": True,
        "api_key_hint": "…cdef",
        "entity": "acme-team",
        "updated_at": answer["updated_at"],
    }
    assert KEY not in str(_status(acme)) and _status(acme)["configured"] is True
    assert _status(other)["configured"] is False  # another org sees nothing
    with session_scope(sessions) as session:
        row = session.execute(select(OrgIntegration)).scalar_one()
        assert KEY not in row.api_key_encrypted and row.api_key_encrypted.startswith("gAAAA")  # Fernet
    with pytest.raises(openai.BadRequestError) as exc:
        acme.post("/organization/integrations/wandb", body={"api_key": ""}, cast_to=httpx.Response)
    assert exc.value.param == "api_key"
    assert _status(acme, "delete")["configured"] is False and _status(acme)["configured"] is False


def test_job_echoes_integrations_and_needs_the_key(api, make_key) -> None:  # type: ignore[no-untyped-def]
    client = sdk(api, make_key("acme"))
    with pytest.raises(openai.BadRequestError) as exc:
        _job(client, integrations=[WANDB])
    assert (exc.value.code, exc.value.param) == ("wandb_not_configured", "integrations")
    _status(client, "post", api_key=KEY)
    with pytest.raises(openai.BadRequestError) as exc:
        _job(client, integrations=[{"type": "wandb", "wandb": {"name": "no project"}}])
    assert exc.value.param is not None and exc.value.param.startswith("integrations")
    job = _job(client, integrations=[WANDB])
    assert [i.model_dump(exclude_none=True) for i in job.integrations or []] == [WANDB]
    assert client.fine_tuning.jobs.retrieve(job.id).integrations == job.integrations
    assert KEY not in client.fine_tuning.jobs.retrieve(job.id).model_dump_json()
    assert _job(client).integrations is None


def _events(sessions: sessionmaker[Session], job_id: str) -> list[JobEvent]:
    with session_scope(sessions) as session:
        rows = session.execute(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq))
        return list(rows.scalars())


LINES = [
    '{"type": "hyperparameters", "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 1.0,'
    ' "learning_rate": 0.005, "total_steps": 4, "n_examples": 8, "train_tokens_per_epoch": 400}',
    *(
        f'{{"type": "metrics", "step": {s}, "total_steps": 4, "epoch": {(s + 1) // 2},'
        f' "train_loss": {1.0 / s}, "train_mean_token_accuracy": {0.2 * s}}}'
        for s in range(1, 5)
    ),
    '{"type": "done", "adapter_dir": "adapter", "trained_tokens": 800, "total_steps": 4, "train_loss": 0.25,'
    ' "metrics": {"train_loss": 0.25, "train_mean_token_accuracy": 0.8}}',
]


@pytest.mark.slow
def test_run_progress_logs_to_an_offline_wandb_run(  # type: ignore[no-untyped-def]
    api, make_key, settings, sessions, monkeypatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    client = sdk(api, make_key("acme"))
    _status(client, "post", api_key=KEY)
    job = _job(client, integrations=[WANDB], hyperparameters={"lora_r": 8})
    run = RunProgress(settings, sessions, job.id)
    assert run.wandb is not None
    for line in LINES:
        run.handle(parse_event(line))
    run.close()
    assert run.wandb.join(60)
    logged = read_run(settings.wandb_dir / job.id)
    assert (logged.run_id, logged.project, logged.tags) == (job.id, "tickets", ["ci", "tiny"])
    rows = [r for r in logged.history if "train_loss" in r]
    assert [(r["_step"], r["train_loss"], r["epoch"]) for r in rows] == [
        (s, 1.0 / s, (s + 1) // 2) for s in range(1, 5)
    ]
    assert logged.summary["trained_tokens"] == 800
    config = {k: v.get("value", v) if isinstance(v, dict) else v for k, v in logged.config.items()}
    assert config["lora"]["r"] == 8 and config["plan"] == job.plan
    assert config["resolved_hyperparameters"]["total_steps"] == 4
    started = [e for e in _events(sessions, job.id) if e.message.startswith("Weights & Biases run")]
    assert len(started) == 1 and started[0].data["wandb_run_id"] == job.id and started[0].data["offline"]
    files = (settings.wandb_dir / job.id).rglob("*")
    assert not any(KEY.encode() in p.read_bytes() for p in files if p.is_file())  # the key is never written


@pytest.mark.slow
def test_unreachable_wandb_is_one_warning_and_never_blocks(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("WANDB_MODE", "online")
    reports: list[tuple[str, str, dict]] = []
    run = WandbRun(
        job_id="ftjob-unreachable",
        wandb={"project": "p"},
        api_key=KEY,
        entity=None,
        config={},
        directory=tmp_path,
        report=lambda message, level, data: reports.append((message, level, data)),
        base_url="http://127.0.0.1:9",  # discard port: nothing answers
        init_timeout=3,
        queue_size=100,
    )
    event = parse_event(LINES[1])
    started = time.monotonic()
    for _ in range(1000):  # far more than the queue holds, while wandb.init is still trying
        run.send(event)
    run.close()
    assert time.monotonic() - started < 0.5  # the job's thread never waits for W&B
    assert run.join(60)
    assert len(reports) == 1, reports
    message, level, data = reports[0]
    assert level == "warn" and "the job continues" in message and KEY not in message
    assert run.failed.is_set() and run.dropped >= 900
