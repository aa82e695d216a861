"""Deleting models: a fine-tuned model takes its checkpoint models with it, a checkpoint model can
be deleted alone (OpenAI's deletion object), each is unloaded from the engines and its adapter
directory removed; what is gone no longer answers chat or export. Checkpoints of a finished job
without a fine-tuned model count against the plan's hosted models until they are deleted."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from sqlalchemy import select

from loraforge.db.models import FineTunedModel, Job, JobCheckpoint, Organization
from loraforge.db.session import make_engine, make_sessionmaker, session_scope
from loraforge.ids import new_id, now
from loraforge.settings import Settings
from tests.helpers import chat_examples, to_jsonl

TINY = "loraforge/tiny-llama"


class RecordingEngines:
    def __init__(self) -> None:
        self.unloaded: list[tuple[str, list[str]]] = []

    def unload(self, base_model: str, names: Sequence[str]) -> None:
        self.unloaded.append((base_model, list(names)))

    def urls(self, base_model: str) -> list[str]:
        return []

    async def aclose(self) -> None:
        return None


def _adapter(path: Path) -> str:
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"weights")
    return str(path)


def _trained_job(
    settings: Settings, org_name: str, status: str, *, final: bool, steps: Sequence[int]
) -> dict[str, object]:
    """A job of ``org_name`` in ``status`` with checkpoint models (and a fine-tuned model)."""
    engine = make_engine(settings)
    job_id = new_id("ftjob-")
    name = f"ft:{TINY}:{org_name}::{job_id[-8:]}"
    with session_scope(make_sessionmaker(engine)) as session:
        org = session.execute(select(Organization).where(Organization.name == org_name)).scalar_one()
        session.add(
            Job(
                id=job_id, org_id=org.id, model=TINY, training_file="file-x", status=status, method={},
                hyperparameters={}, seed=1, created_at=now(), result_files=[], reserved_model=name,
            )
        )  # fmt: skip
        session.flush()
        checkpoints = {}
        for step in steps:
            ckpt = f"{name}:ckpt-step-{step}"
            path = _adapter(settings.runs_dir / job_id / "checkpoints" / f"step-{step:07d}")
            checkpoints[ckpt] = Path(path)
            session.add(
                JobCheckpoint(
                    id=new_id("ftckpt-"), org_id=org.id, job_id=job_id, step_number=step,
                    fine_tuned_model_checkpoint=ckpt, base_model=TINY, adapter_path=path, metrics={},
                    created_at=now(),
                )
            )  # fmt: skip
        adapter = settings.adapters_dir / job_id
        if final:
            session.add(
                FineTunedModel(
                    id=name, org_id=org.id, job_id=job_id, base_model=TINY,
                    adapter_path=_adapter(adapter), created_at=now(),
                )
            )  # fmt: skip
    engine.dispose()
    return {"job": job_id, "name": name, "checkpoints": checkpoints, "adapter": adapter}


def _client(api: TestClient, key: str) -> tuple[OpenAI, RecordingEngines]:
    engines = RecordingEngines()
    api.app.state.services.engines = engines  # type: ignore[attr-defined]
    return OpenAI(base_url="http://testserver/v1", api_key=key, http_client=api, max_retries=0), engines


def test_a_checkpoint_model_is_deleted_alone_then_the_final_model_takes_the_rest(
    api, make_key, settings
) -> None:  # type: ignore[no-untyped-def]
    client, engines = _client(api, make_key("del-org"))
    made = _trained_job(settings, "del-org", "succeeded", final=True, steps=[5, 10])
    first, second = made["checkpoints"]  # type: ignore[misc]
    paths: dict[str, Path] = made["checkpoints"]  # type: ignore[assignment]

    deleted = client.models.delete(first)
    assert (deleted.id, deleted.object, deleted.deleted) == (first, "model", True)
    assert engines.unloaded == [(TINY, [first])]
    assert not paths[first].exists() and paths[second].exists()
    listed = [m.id for m in client.models.list().data]
    assert first not in listed and second in listed and made["name"] in listed
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model=first, messages=[{"role": "user", "content": "hi"}])
    assert exc.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.delete(first)  # gone

    deleted = client.models.delete(str(made["name"]))
    assert deleted.deleted is True
    assert engines.unloaded[-1] == (TINY, [made["name"], second])
    assert not paths[second].exists() and not Path(made["adapter"]).exists()  # type: ignore[arg-type]
    listed = [m.id for m in client.models.list().data]
    assert made["name"] not in listed and second not in listed
    for model in (second, made["name"]):
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=str(model), messages=[{"role": "user", "content": "hi"}])
        assert (
            api.get(
                f"/v1/models/{model}/export", headers={"authorization": f"Bearer {client.api_key}"}
            ).status_code
            == 404
        )


def test_checkpoints_of_an_unfinished_job_stay(api, make_key, settings) -> None:  # type: ignore[no-untyped-def]
    client, engines = _client(api, make_key("busy-del-org"))
    made = _trained_job(settings, "busy-del-org", "running", final=False, steps=[3])
    (ckpt,) = made["checkpoints"]  # type: ignore[misc]
    with pytest.raises(openai.BadRequestError) as exc:
        client.models.delete(ckpt)
    assert exc.value.code == "job_not_finished" and engines.unloaded == []
    assert Path(made["checkpoints"][ckpt]).exists()  # type: ignore[index]


def test_rows_pointing_outside_the_adapter_store_are_not_removed(api, make_key, settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    client, _ = _client(api, make_key("outside-org"))
    made = _trained_job(settings, "outside-org", "succeeded", final=True, steps=[])
    elsewhere = Path(_adapter(tmp_path / "not-ours"))
    engine = make_engine(settings)
    with session_scope(make_sessionmaker(engine)) as session:
        row = session.execute(select(FineTunedModel).where(FineTunedModel.id == made["name"])).scalar_one()
        row.adapter_path = str(elsewhere)
    engine.dispose()
    assert client.models.delete(str(made["name"])).deleted is True
    assert elsewhere.exists()


def test_checkpoints_without_a_final_model_count_as_a_hosted_model(api, make_key, settings) -> None:  # type: ignore[no-untyped-def]
    client, _ = _client(api, make_key("ckpt-trial-org", tier="trial"))
    made = _trained_job(settings, "ckpt-trial-org", "failed", final=False, steps=[4, 8])
    file_id = client.files.create(
        file=("t.jsonl", io.BytesIO(to_jsonl(chat_examples(10)))), purpose="fine-tune"
    ).id
    with pytest.raises(openai.BadRequestError) as exc:  # the failed job's checkpoints are still served
        client.fine_tuning.jobs.create(model=TINY, training_file=file_id)
    assert exc.value.code == "hosted_model_limit_reached"
    for ckpt in made["checkpoints"]:  # type: ignore[attr-defined]
        client.models.delete(ckpt)
    client.fine_tuning.jobs.create(model=TINY, training_file=file_id)  # the slot is free again
