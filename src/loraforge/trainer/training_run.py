"""A training run once set up: what each setup phase built, and where the loop is.

:func:`loraforge.trainer.recipe.setup` builds a :class:`TrainingRun` from three immutable parts,
one per phase: :class:`RunData` (the tokenized data and the resolved schedule), :class:`RunModel`
(the device, the PEFT model and where its weights start) and :class:`Optimization` (the module
the loop calls, its optimizer and LR schedule). The loop (:mod:`loraforge.trainer.loop`) only
advances the run's :class:`LoopState`: the data position, the metrics, the last checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from loraforge.adapters.format import AdapterManifest, LoraSettings
from loraforge.catalog.catalog import BaseModelEntry
from loraforge.contracts.hyperparams import ResolvedHyperparameters, steps_per_epoch
from loraforge.contracts.train_spec import TrainSpec
from loraforge.trainer.checkpointer import CheckpointInfo, Position


@dataclass(frozen=True)
class RunData:
    """What the data phase built: the tokenized examples and the schedule they imply."""

    entry: BaseModelEntry
    tokenizer: PreTrainedTokenizerBase
    # Supervised: memory-mapped rows (:class:`~loraforge.trainer.dataset.ArrowExamples`), in file
    # order; DPO: a list of ``PreferencePair`` (trainer/dpo_data.py).
    train_set: Sequence[Any]
    valid_set: Sequence[Any]
    hyperparameters: ResolvedHyperparameters
    # Longest example kept, in tokens (the spec's or the catalog's, within the context length).
    max_seq_length: int
    total_steps: int
    # Assistant tokens the loss is computed on in one epoch.
    train_tokens_per_epoch: int
    # A temporary data directory removed after the run (spec.data_dir unset); None: kept.
    scratch: Path | None = None


@dataclass(frozen=True)
class RunModel:
    """What the model phase built: the device, the PEFT model, and what it starts from."""

    accelerator: Accelerator
    peft: PeftModel
    lora: LoraSettings
    # Identifies checkpoints this run may resume (spec + resolved hyperparameters).
    fingerprint: str
    # The checkpoint this run continues from; None: spec.init_adapter or a fresh LoRA init.
    resume: CheckpointInfo | None
    # Autocast dtype (bf16 on CUDA with a bf16 or 4-bit base; None: plain fp32).
    compute_dtype: torch.dtype | None
    # Packed rows are rounded up to this many tokens with a filler document (CUDA; None on CPU).
    pad_to_multiple: int | None


@dataclass(frozen=True)
class Optimization:
    """What the optimizer phase built (prepared together by accelerate under FSDP)."""

    # The module the loop calls: the PEFT model and its loss (FSDP-sharded under accelerate launch).
    loss_module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    # Linear warmup over spec.warmup_ratio of the steps, then constant; checkpointed for resume.
    scheduler: torch.optim.lr_scheduler.LambdaLR


@dataclass
class LoopState:
    """Where the run is: the only part of a run that changes while it trains."""

    # The next batch (step 0, or a resumed checkpoint's position).
    position: Position = field(default_factory=Position)
    # RNG states to restore right before the first step of a resumed run.
    resume_rng: dict[str, Any] | None = None
    last_checkpoint_step: int = -1
    # The last step's metrics (validation merged in when it ran at that step) ...
    step_metrics: dict[str, float] = field(default_factory=dict)
    # ... and the latest value of every metric so far (for the manifest).
    metrics: dict[str, float] = field(default_factory=dict)
    # DPO: the reference policy's (chosen, rejected) log-probs per pair, ``{"train", "valid"}``
    # tables computed before the first step (trainer/dpo.py) and kept in checkpoints.
    reference: dict[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class TrainingRun:
    """One run: its spec, the three setup parts, and its loop state."""

    spec: TrainSpec
    data: RunData
    model: RunModel
    optim: Optimization
    state: LoopState = field(default_factory=LoopState)

    def manifest(self, metrics: dict[str, float], *, steps: int) -> AdapterManifest:
        """The adapter manifest for the model after ``steps`` steps (a checkpoint or the final one).

        Args:
            metrics: the metrics to record.
            steps: optimizer steps taken so far.

        Returns:
            The manifest.
        """
        data, spec = self.data, self.spec
        per_epoch = steps_per_epoch(len(data.train_set), data.hyperparameters.batch_size)
        return AdapterManifest(
            job_id=spec.job_id,
            base_model=data.entry.id,
            base_weights=data.entry.weights,
            chat_template=data.entry.chat_template_text,
            stop_tokens=list(data.entry.stop_tokens),
            lora=self.model.lora,
            hyperparameters={
                **data.hyperparameters.model_dump(),
                **({"method": "dpo", "beta": spec.beta()} if spec.method == "dpo" else {}),
                "max_seq_length": data.max_seq_length,
                "warmup_ratio": spec.warmup_ratio,
                "weight_decay": spec.weight_decay,
            },
            metrics=metrics,
            trained_tokens=data.train_tokens_per_epoch * steps // per_epoch,
            total_steps=steps,
            spec_hash=spec.spec_hash(),
        )
