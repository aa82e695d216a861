"""Dependencies point one way: the API never imports torch; the trainer never imports Celery,
FastAPI or the database layer (checked in a fresh interpreter)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def modules_after_import(*modules: str) -> set[str]:
    code = (
        "import json, sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return set(json.loads(out.stdout))


def test_api_process_never_imports_torch() -> None:
    loaded = modules_after_import(
        "loraforge.api.app",
        "loraforge.cli",
        "loraforge.queue.dispatch",
        "loraforge.engines",
        "loraforge.planner",
    )
    assert "fastapi" in loaded
    assert not {m for m in loaded if m == "torch" or m.startswith(("torch.", "transformers", "peft"))}


def test_worker_never_imports_torch() -> None:
    loaded = modules_after_import(
        "loraforge.queue.tasks",
        "loraforge.worker.training",
        "loraforge.worker.gpu_leases",
        "loraforge.worker.admission",
    )
    assert "celery" in loaded
    assert "torch" not in loaded and "transformers" not in loaded


@pytest.mark.slow  # imports torch; lint-imports checks the same statically
def test_trainer_imports_no_service_code() -> None:
    loaded = modules_after_import(
        "loraforge.trainer", "loraforge.trainer.recipe", "loraforge.trainer.__main__"
    )
    forbidden = {"celery", "fastapi", "sqlalchemy", "starlette", "kombu", "uvicorn"}
    assert not forbidden & loaded
    assert not {
        m
        for m in loaded
        if m.startswith(("loraforge.api", "loraforge.queue", "loraforge.db", "loraforge.jobs"))
    }
