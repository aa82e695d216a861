"""Where a run starts: its newest checkpoint (crash recovery, resume after pause), else
``spec.init_adapter`` (continued fine-tuning), else a fresh LoRA init seeded by ``spec.seed``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from loraforge.adapters.format import ADAPTER_CONFIG, MANIFEST, LoraSettings, read_manifest
from loraforge.catalog.catalog import BaseModelEntry
from loraforge.contracts.train_spec import TrainSpec
from loraforge.trainer import checkpointer as ckpt


def _lora_settings(spec: TrainSpec, entry: BaseModelEntry) -> LoraSettings:
    defaults = entry.lora
    return LoraSettings(
        r=spec.lora_r if spec.lora_r is not None else defaults.r,
        alpha=spec.lora_alpha if spec.lora_alpha is not None else defaults.alpha,
        dropout=spec.lora_dropout if spec.lora_dropout is not None else defaults.dropout,
        target_modules=list(spec.lora_target_modules or defaults.target_modules),
    )


def _adapter_lora_settings(adapter_dir: Path) -> LoraSettings:
    """The LoRA settings an existing adapter was trained with (from PEFT's adapter_config.json)."""
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    targets = config.get("target_modules") or []
    return LoraSettings(
        r=int(config["r"]),
        alpha=int(config["lora_alpha"]),
        dropout=float(config.get("lora_dropout", 0.0)),
        target_modules=[targets] if isinstance(targets, str) else sorted(targets),
    )


def _check_init_adapter(path: Path, entry: BaseModelEntry) -> None:
    """Refuse a continued fine-tuning start point trained on another base model."""
    if not (path / ADAPTER_CONFIG).is_file():
        raise ValueError(f"init_adapter {path} is not an adapter directory (no {ADAPTER_CONFIG})")
    if (path / MANIFEST).is_file():
        base = read_manifest(path).base_model
        if base not in {entry.id, *entry.aliases}:
            raise ValueError(f"init_adapter {path} was trained on {base!r}, not {entry.id!r}")


def build_model(
    spec: TrainSpec, entry: BaseModelEntry, base: Any, fingerprint: str
) -> tuple[Any, LoraSettings, Any]:
    """The PEFT model to train, its LoRA settings, and the checkpoint it resumes (or None).

    Args:
        spec: the run's spec.
        entry: the base model's catalog entry.
        base: the loaded base model.
        fingerprint: the run's fingerprint (checkpoints of other specs are not resumed).

    Returns:
        ``(model, lora settings, checkpoint or None)``.

    Raises:
        ValueError: ``spec.init_adapter`` is not an adapter directory of this base model.
    """
    resume = ckpt.latest_checkpoint(Path(spec.checkpoint_dir), fingerprint) if spec.checkpoint_dir else None
    start = resume.path if resume else (Path(spec.init_adapter) if spec.init_adapter else None)
    if start is not None:
        if resume is None:
            _check_init_adapter(start, entry)
        # The adapter's own config wins: its weights only fit the shapes it was trained with.
        model = PeftModel.from_pretrained(base, str(start), is_trainable=True)
        return model, _adapter_lora_settings(start), resume
    lora = _lora_settings(spec, entry)
    # Seed right before the LoRA init: building a builtin model reseeds the global RNG.
    torch.manual_seed(spec.seed)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, config), lora, None
