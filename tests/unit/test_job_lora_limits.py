"""Jobs take LoRA knobs, refuse LoRA settings the engines could not serve, and respect the plan's
hosted-model limit; the knobs reach the trainer's spec."""

from __future__ import annotations

import io

import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from sqlalchemy import select

from loraforge.contracts.train_spec import load_spec
from loraforge.contracts.trainer_events import HyperparametersEvent
from loraforge.db.models import FineTunedModel, Job, Organization
from loraforge.ids import now
from loraforge.jobs.limits import hosted_model_limit
from loraforge.orgs import DEFAULT_TIER
from loraforge.trainer.recipe import warmup_schedule
from loraforge.worker.job_spec import write_spec
from loraforge.worker.progress import RunProgress
from tests.helpers import chat_examples, to_jsonl

TINY = "loraforge/tiny-llama"
LLAMA8B = "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo"


def _client(api: TestClient, key: str) -> tuple[OpenAI, str]:
    client = OpenAI(base_url="http://testserver/v1", api_key=key, http_client=api, max_retries=0)
    file_id = client.files.create(
        file=("t.jsonl", io.BytesIO(to_jsonl(chat_examples(10)))), purpose="fine-tune"
    ).id
    return client, file_id


def test_lora_knobs_are_filled_echoed_and_reach_the_trainer_spec(api, make_key, settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    client, file_id = _client(api, make_key("knobs-org"))
    knobs = {"lora_r": 8, "lora_alpha": 16, "lora_target_modules": "q_proj, v_proj", "warmup_ratio": 0.1}
    job = client.fine_tuning.jobs.create(
        model=TINY, training_file=file_id, hyperparameters={"n_epochs": 2, **knobs, "weight_decay": 0.01}
    )
    hp = job.hyperparameters.model_dump()
    assert hp["n_epochs"] == 2 and hp["batch_size"] == "auto"
    assert hp["lora_r"] == 8 and hp["lora_alpha"] == 16 and hp["lora_target_modules"] == ["q_proj", "v_proj"]
    assert hp["lora_dropout"] == 0.0 and hp["max_seq_length"] == 512  # the catalog's defaults
    assert hp["warmup_ratio"] == 0.1 and hp["weight_decay"] == 0.01
    assert job.method.supervised.hyperparameters.lora_r == 8  # type: ignore[union-attr]

    default = client.fine_tuning.jobs.create(
        model=TINY, training_file=file_id, method={"type": "supervised", "supervised": {}}
    ).hyperparameters.model_dump()
    assert default["lora_r"] == 16 and default["lora_target_modules"] == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    ]  # fmt: skip

    sessions = api.app.state.services.sessions  # type: ignore[attr-defined]
    with sessions() as session:
        row = session.execute(select(Job).where(Job.id == job.id)).scalar_one()
        spec = load_spec(write_spec(settings, session, row, tmp_path / "run"))
    assert spec.lora_r == 8 and spec.lora_alpha == 16 and spec.lora_target_modules == ["q_proj", "v_proj"]
    assert spec.warmup_ratio == 0.1 and spec.weight_decay == 0.01 and spec.max_seq_length == 512
    assert spec.hyperparameters.n_epochs == 2 and spec.hyperparameters.batch_size == "auto"

    # The trainer's resolved trio is merged in: the LoRA knobs stay on the job.
    RunProgress(settings, sessions, job.id).handle(
        HyperparametersEvent(
            n_epochs=2,
            batch_size=2,
            learning_rate_multiplier=1.0,
            learning_rate=5e-3,
            total_steps=10,
            n_examples=10,
            train_tokens_per_epoch=100,
        )
    )
    after = client.fine_tuning.jobs.retrieve(job.id).hyperparameters.model_dump()
    assert after["batch_size"] == 2 and after["lora_r"] == 8 and after["weight_decay"] == 0.01


@pytest.mark.parametrize("where", ["legacy", "method"])
@pytest.mark.parametrize(
    ("knobs", "field", "code"),
    [
        ({"lora_r": 128}, "lora_r", "lora_config_not_servable"),
        (
            {"lora_target_modules": ["q_proj", "embed_tokens"]},
            "lora_target_modules",
            "lora_config_not_servable",
        ),
        ({"lora_target_modules": ["lm_head"]}, "lora_target_modules", "lora_config_not_servable"),
        ({"lora_target_modules": "q_prj"}, "lora_target_modules", "lora_config_not_servable"),
        ({"max_seq_length": 100_000}, "max_seq_length", None),
        ({"lora_r": 0}, "lora_r", None),
        ({"lora_dropout": 1.0}, "lora_dropout", None),
        ({"warmup_ratio": 1.5}, "warmup_ratio", None),
        ({"lora_target_modules": []}, "lora_target_modules", None),
    ],
)
def test_unservable_or_invalid_lora_settings_are_400_naming_the_param(
    api: TestClient,
    make_key,
    where: str,
    knobs: dict,
    field: str,
    code: str | None,  # type: ignore[no-untyped-def]
) -> None:
    client, file_id = _client(api, make_key("lora-limits-org"))
    if where == "legacy":
        kwargs, param = {"hyperparameters": knobs}, f"hyperparameters.{field}"
    else:
        method = {"type": "supervised", "supervised": {"hyperparameters": knobs}}
        kwargs, param = {"method": method}, f"method.supervised.hyperparameters.{field}"
    with pytest.raises(openai.BadRequestError) as exc:
        client.fine_tuning.jobs.create(model=TINY, training_file=file_id, **kwargs)  # type: ignore[arg-type]
    assert exc.value.status_code == 400 and exc.value.param == param
    if code is not None:
        assert exc.value.code == code and "cannot be served" in exc.value.message
    assert client.fine_tuning.jobs.list().data == []  # nothing was created


def test_trial_plan_hosts_one_model_and_delete_frees_the_slot(api: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    client, file_id = _client(api, make_key("plan-trial-org", tier="trial"))
    first = client.fine_tuning.jobs.create(model=TINY, training_file=file_id)
    with pytest.raises(openai.BadRequestError) as exc:  # 400: the SDK does not retry it
        client.fine_tuning.jobs.create(model=TINY, training_file=file_id)
    assert exc.value.code == "hosted_model_limit_reached" and "trial plan" in exc.value.message
    client.fine_tuning.jobs.cancel(first.id)  # a cancelled job will never host a model
    second = client.fine_tuning.jobs.create(model=TINY, training_file=file_id)
    client.fine_tuning.jobs.cancel(second.id)

    sessions = api.app.state.services.sessions  # type: ignore[attr-defined]
    name = "ft:klusterai/Meta-Llama-3.1-8B-Instruct-Turbo:plan-trial-org::abcd1234"
    with sessions() as session:  # a model the org already hosts (no engine serves that base here)
        org = session.execute(select(Organization).where(Organization.name == "plan-trial-org")).scalar_one()
        session.add(
            FineTunedModel(
                id=name,
                org_id=org.id,
                job_id=second.id,
                base_model=LLAMA8B,
                adapter_path="/nope",
                created_at=now(),
            )
        )
        session.commit()
    with pytest.raises(openai.BadRequestError) as exc:
        client.fine_tuning.jobs.create(model=TINY, training_file=file_id)
    assert exc.value.code == "hosted_model_limit_reached"
    assert client.models.delete(name).deleted is True
    client.fine_tuning.jobs.create(model=TINY, training_file=file_id)  # the slot is free again


def test_plan_limits_and_default_tier(api: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    assert [hosted_model_limit(t) for t in ("trial", "core", "scale", "enterprise")] == [1, 10, 25, None]
    assert DEFAULT_TIER == "enterprise"
    client, file_id = _client(api, make_key("plan-default-org"))  # no tier: no limit
    for _ in range(3):
        client.fine_tuning.jobs.create(model=TINY, training_file=file_id)


def test_warmup_schedule() -> None:
    schedule = warmup_schedule(0.1, 100)  # 10 warmup steps
    assert [schedule(s) for s in (0, 4, 9, 10, 99)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    assert warmup_schedule(0.0, 100)(0) == 1.0
