"""The adapter directory: the contract between trainer, registry, engine and export.

    adapter_config.json         PEFT's LoRA config
    adapter_model.safetensors   PEFT's LoRA weights
    manifest.json               ours: base model, chat template, stop tokens, LoRA config,
                                resolved hyperparameters, metrics, spec hash

Pure (no torch): the API, the worker and the engine all read it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MANIFEST = "manifest.json"
REQUIRED_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST)


class InvalidAdapterError(ValueError):
    """An adapter directory is missing files or has an unreadable manifest."""


class LoraSettings(BaseModel):
    r: int
    alpha: int
    dropout: float
    target_modules: list[str]


class AdapterManifest(BaseModel):
    """What the engine needs to serve an adapter exactly as it was trained."""

    format_version: int = 1
    job_id: str
    base_model: str  # public catalog id
    base_weights: str  # hub id / local path / builtin name it was trained on
    chat_template: str
    stop_tokens: list[str]
    lora: LoraSettings
    hyperparameters: dict[str, Any]
    metrics: dict[str, float] = Field(default_factory=dict)
    trained_tokens: int = 0
    total_steps: int = 0
    spec_hash: str = ""
    created_at: int = Field(default_factory=lambda: int(time.time()))


def write_manifest(adapter_dir: Path, manifest: AdapterManifest) -> Path:
    """Write ``manifest.json`` atomically (tmp file + rename)."""
    adapter_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", dir=adapter_dir)
    with os.fdopen(fd, "w") as fh:
        fh.write(manifest.model_dump_json(indent=2))
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; engines may run as another user
    final = adapter_dir / MANIFEST
    os.replace(tmp, final)
    return final


# The messages below name files, never the directory: they reach users (export errors) and
# engine clients, who must not learn where a machine keeps its adapters.
def read_manifest(adapter_dir: Path) -> AdapterManifest:
    """Read and validate ``manifest.json`` from ``adapter_dir``."""
    path = adapter_dir / MANIFEST
    try:
        return AdapterManifest.model_validate(json.loads(path.read_text()))
    except FileNotFoundError as exc:
        raise InvalidAdapterError(f"the adapter has no {MANIFEST}") from exc
    except ValueError as exc:
        raise InvalidAdapterError(f"the adapter's {MANIFEST} is not valid: {exc}") from exc


def validate_adapter_dir(adapter_dir: Path) -> AdapterManifest:
    """Check that ``adapter_dir`` holds the whole contract; return its manifest."""
    missing = [name for name in REQUIRED_FILES if not (adapter_dir / name).is_file()]
    if missing:
        raise InvalidAdapterError(f"the adapter is missing {', '.join(missing)}")
    return read_manifest(adapter_dir)
