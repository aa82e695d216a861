"""The response models give the JSON the API has always returned, key for key.

Each expected object below is what the API answered for the same stored rows before responses
were pydantic models (when routes returned dicts): nulls, extension fields, keys that are absent
when unset, key order and ``2`` vs ``2.0`` included. The SDK and older clients parse these.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.encoders import jsonable_encoder
from pydantic import BaseModel, TypeAdapter

from loraforge.api.schemas.files import ListFilesResponse, file_public
from loraforge.api.schemas.fine_tuning import (
    ListFineTuningJobCheckpointsResponse,
    checkpoint_public,
    event_public,
    job_public,
)
from loraforge.api.schemas.models import (
    ListModelsResponse,
    base_model_public,
    checkpoint_model_public,
    fine_tuned_model_public,
)
from loraforge.api.schemas.preflight import dry_run_public
from loraforge.api.schemas.uploads import part_public, upload_public
from loraforge.api.schemas.webhooks import webhook_endpoint_public, webhook_endpoint_with_secret
from loraforge.catalog import load_catalog
from loraforge.db import models as db
from tests.conftest import REPO

TINY = "loraforge/tiny-llama"
FT = f"ft:{TINY}:acme:s:abcdefgh"
T = 1_700_000_000
ORG = db.Organization(id="org-1", name="acme", tier="trial", created_at=T)
HYPER = {
    "batch_size": 3,
    "learning_rate_multiplier": 2,  # stored as an int: shown as an int
    "n_epochs": 2,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "lora_target_modules": ["q_proj", "v_proj"],
    "max_seq_length": 512,
    "warmup_ratio": 0.0,
    "weight_decay": 0.0,
}
ESTIMATE = {
    "n_examples": 12,
    "n_epochs": 2,
    "batch_size": 2,
    "learning_rate_multiplier": 2.0,
    "steps_per_epoch": 6,
    "total_steps": 12,
    "tokens_per_epoch": None,
    "trained_tokens_per_epoch": None,
    "estimated_trained_tokens": None,
    "estimated_duration_seconds": None,
    "throughput_tokens_per_second": 4000.0,
    "throughput_source": "default",
    # no processed_tokens: the tokenizer was not available
}
PLAN = {
    "pool": "cpu",
    "device": "cpu",
    "strategy": "lora",
    "num_gpus": 0,
    "token_budget": None,
    "gradient_checkpointing": False,
    "checkpoint_layers": 0,
    "estimated_peak_gib": 2.54,
    "breakdown_gib": {"weights": 0.0, "activations": 0.02, "process_overhead": 2.5, "total": 2.54},
    "summary": "lora on cpu 16 GiB (pool cpu)",
}


def wire(model: BaseModel) -> Any:
    """The JSON FastAPI sends for ``model`` (its response serialization), parsed."""
    return json.loads(TypeAdapter(type(model)).dump_json(model))


def same(got: Any, expected: Any) -> None:
    assert got == expected
    # key order and int/float, which == does not see
    assert json.dumps(got) == json.dumps(expected)


def test_fine_tuning_job() -> None:
    job = db.Job(
        id="ftjob-1",
        org_id=ORG.id,
        model=TINY,
        training_file="file-t",
        validation_file=None,
        status="succeeded",
        method={"type": "supervised", "supervised": {"hyperparameters": HYPER}},
        hyperparameters=HYPER,
        suffix="s",
        seed=5,
        user_metadata={"team": "a"},
        fine_tuned_model=FT,
        error=None,
        created_at=T,
        finished_at=T + 60,
        estimated_finish=None,
        trained_tokens=1234,
        result_files=["file-r"],
        parent_model=None,
        preflight={"training_file": {"n_examples": 12}, "estimate": ESTIMATE},
        # the stored plan has more than the API shows
        plan={**PLAN, "memory_gib": 16, "packing": True, "loss": "auto"},
    )
    same(
        wire(job_public(job, ORG)),
        {
            "id": "ftjob-1",
            "object": "fine_tuning.job",
            "created_at": T,
            "error": None,
            "fine_tuned_model": FT,
            "finished_at": T + 60,
            "hyperparameters": HYPER,
            "model": TINY,
            "organization_id": "org-1",
            "result_files": ["file-r"],
            "seed": 5,
            "status": "succeeded",
            "trained_tokens": 1234,
            "training_file": "file-t",
            "validation_file": None,
            "estimated_finish": None,
            "estimate": ESTIMATE,
            "plan": PLAN,
            "integrations": None,
            "metadata": {"team": "a"},
            "method": {"type": "supervised", "supervised": {"hyperparameters": HYPER}},
            "user_provided_suffix": "s",
        },
    )

    # A failed continued job created before plans and pre-flights; paused is ours, not OpenAI's.
    job.status, job.parent_model, job.plan, job.preflight, job.user_metadata = "failed", FT, None, None, None
    job.error = {"code": "training_error", "message": "boom", "param": None}
    got = wire(job_public(job, ORG))
    assert got["model"] == FT and got["plan"] is None and got["estimate"] is None and got["metadata"] is None
    assert got["error"] == {"code": "training_error", "message": "boom", "param": None}
    job.status, job.error = "paused", {}
    assert wire(job_public(job, ORG))["status"] == "paused" and wire(job_public(job, ORG))["error"] is None


def test_events_checkpoints_and_pages() -> None:
    event = db.JobEvent(
        id="ftevent-1", job_id="ftjob-1", created_at=T, level="info", type="metrics", message="Step 1/4",
        data={"step": 1, "train_loss": 1.2},
    )  # fmt: skip
    same(
        wire(event_public(event)),
        {
            "id": "ftevent-1",
            "object": "fine_tuning.job.event",
            "created_at": T,
            "level": "info",
            "message": "Step 1/4",
            "data": {"step": 1, "train_loss": 1.2},
            "type": "metrics",
        },
    )
    event.data = None
    assert wire(event_public(event))["data"] == {}

    ckpt = db.JobCheckpoint(
        id="ftckpt-1", org_id=ORG.id, job_id="ftjob-1", step_number=2, base_model=TINY,
        fine_tuned_model_checkpoint=f"{FT}:ckpt-step-2", adapter_path="-", created_at=T,
        metrics={"step": 2, "train_loss": 0.75, "valid_loss": 0.8},
    )  # fmt: skip
    page = ListFineTuningJobCheckpointsResponse.of([checkpoint_public(ckpt)], has_more=False)
    same(
        wire(page),
        {
            "object": "list",
            "data": [
                {
                    "id": "ftckpt-1",
                    "object": "fine_tuning.job.checkpoint",
                    "created_at": T,
                    "fine_tuned_model_checkpoint": f"{FT}:ckpt-step-2",
                    "fine_tuning_job_id": "ftjob-1",
                    "step_number": 2,
                    "metrics": {"step": 2, "train_loss": 0.75, "valid_loss": 0.8},
                }
            ],
            "first_id": "ftckpt-1",
            "last_id": "ftckpt-1",
            "has_more": False,
        },
    )
    same(
        wire(ListFilesResponse.of([], has_more=False)),
        {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False},
    )


def test_files_and_uploads() -> None:
    record = db.FileRecord(
        id="file-1", org_id=ORG.id, filename="t.jsonl", purpose="fine-tune", bytes=10, created_at=T,
        expires_at=None, status="uploaded", status_details=None, storage_key="-",
    )  # fmt: skip
    plain = {
        "id": "file-1",
        "object": "file",
        "bytes": 10,
        "created_at": T,
        "filename": "t.jsonl",
        "purpose": "fine-tune",
        "status": "uploaded",
    }
    same(wire(file_public(record)), plain)  # expires_at and status_details absent, not null
    record.expires_at, record.status, record.status_details = T + 3600, "error", "line 2: too short"
    same(
        wire(file_public(record)),
        {
            "id": "file-1",
            "object": "file",
            "bytes": 10,
            "created_at": T,
            "expires_at": T + 3600,
            "filename": "t.jsonl",
            "purpose": "fine-tune",
            "status": "error",
            "status_details": "line 2: too short",
        },
    )

    upload = db.Upload(
        id="upload_1", org_id=ORG.id, filename="u.jsonl", purpose="fine-tune", mime_type="text/jsonl",
        bytes=10, created_at=T, expires_at=T + 3600, status="completed", file_id="file-1",
    )  # fmt: skip
    got = wire(upload_public(upload, record))
    assert list(got) == [
        "id", "object", "bytes", "created_at", "expires_at", "filename", "purpose", "status", "file",
    ]  # fmt: skip
    assert got["file"] == wire(file_public(record))
    assert wire(upload_public(upload))["file"] is None
    part = db.UploadPart(id="part_1", upload_id="upload_1", created_at=T, bytes=10, storage_key="-")
    same(
        wire(part_public(part)),
        {"id": "part_1", "object": "upload.part", "created_at": T, "upload_id": "upload_1"},
    )


def test_models() -> None:
    entry = load_catalog(REPO / "configs" / "models.yaml").get(TINY)
    assert entry is not None
    fine_tuned = db.FineTunedModel(
        id=FT, org_id=ORG.id, job_id="ftjob-1", base_model=TINY, adapter_path="-", created_at=T
    )
    ckpt = db.JobCheckpoint(
        id="ftckpt-1", org_id=ORG.id, job_id="ftjob-1", step_number=2, base_model=TINY,
        fine_tuned_model_checkpoint=f"{FT}:ckpt-step-2", adapter_path="-", created_at=T, metrics={},
    )  # fmt: skip
    listing = ListModelsResponse(
        data=[
            base_model_public(entry),
            fine_tuned_model_public(fine_tuned, ORG),
            checkpoint_model_public(ckpt, ORG),
        ]
    )
    same(
        wire(listing),
        {
            "object": "list",
            "data": [
                {
                    "id": TINY,
                    "object": "model",
                    "created": entry.created,
                    "owned_by": entry.owned_by,
                    "tags": ["base", "fine-tunable", "servable"],
                    "aliases": entry.aliases,
                    "context_length": entry.context_length,
                },
                {
                    "id": FT,
                    "object": "model",
                    "created": T,
                    "owned_by": "acme",
                    "parent": TINY,
                    "root": TINY,
                    "fine_tuning_job": "ftjob-1",
                },
                {
                    "id": f"{FT}:ckpt-step-2",
                    "object": "model",
                    "created": T,
                    "owned_by": "acme",
                    "parent": FT,
                    "root": TINY,
                    "fine_tuning_job": "ftjob-1",
                    "step_number": 2,
                },
            ],
        },
    )


def test_webhook_endpoints() -> None:
    endpoint = db.WebhookEndpoint(
        id="we_1", org_id=ORG.id, name="n", url="https://example.test/hook", event_types=["a"],
        signing_secret="whsec_abcdefgh", created_at=T, updated_at=T + 1,
    )  # fmt: skip
    masked = {
        "id": "we_1",
        "object": "webhook_endpoint",
        "created_at": T,
        "event_types": ["a"],
        "name": "n",
        "url": "https://example.test/hook",
        "signing_secret_hint": "whsec_****efgh",
        "updated_at": T + 1,
    }
    same(wire(webhook_endpoint_public(endpoint)), masked)
    same(wire(webhook_endpoint_with_secret(endpoint)), {**masked, "signing_secret": "whsec_abcdefgh"})


def test_dry_run_is_passed_through() -> None:
    report = {
        "object": "fine_tuning.job.dry_run",
        "model": TINY,
        "method": {"type": "supervised"},
        "training_file": "file-1",
        "validation_file": None,
        "valid": False,
        "error": {"code": "invalid_n_examples", "message": "too few", "param": "training_file"},
        "hyperparameters": {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"},
        "estimate": None,
        "training_file_report": {
            "format": "chat", "bytes": 824, "n_lines": 3, "n_examples": 3, "valid": False, "n_errors": 1,
            "errors": [{"line": None, "path": None, "code": "too_few_examples", "message": "too few"}],
            "n_warnings": 0, "warnings": [], "tokens": None, "tokens_unavailable": "no tokenizer",
        },
        "validation_file_report": None,
        "created_at": T,
        "plan": PLAN,
    }  # fmt: skip
    same(wire(dry_run_public(report)), jsonable_encoder(report))
