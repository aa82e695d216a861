"""The LoRA recipe: ``train(spec, emit)`` = setup -> train -> save -> cleanup.

An explicit Accelerate + PEFT loop (no ``transformers.Trainer``): one process on one device, or
one process per GPU under ``accelerate launch`` for ``plan.strategy == "fsdp"``. The loss is the
mean cross-entropy over assistant tokens only (labels != -100); the same spec gives the same loss
sequence on CPU (seeded LoRA init, seeded data order, no other randomness).

``spec.plan`` decides the micro-batch layout (:mod:`.packing`), the loss (:mod:`.loss`), and
dtype, attention, QLoRA, recompute and compile (:mod:`.device_setup`).

``setup`` starts from the newest checkpoint in ``spec.checkpoint_dir`` written by the same spec
(crash recovery, resume after pause), else from ``spec.init_adapter`` (continued fine-tuning),
else from a fresh seeded LoRA init. The loop itself is in :mod:`loraforge.trainer.loop`.

Progress is reported through ``emit(dict)``; the CLI prints each dict as one JSON line.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from loraforge.adapters.format import (
    ADAPTER_CONFIG,
    MANIFEST,
    AdapterManifest,
    LoraSettings,
    write_manifest,
)
from loraforge.catalog.catalog import BaseModelEntry, load_catalog
from loraforge.catalog.loading import load_tokenizer
from loraforge.trainer import checkpointer as ckpt
from loraforge.trainer import distributed as dist
from loraforge.trainer.data import TokenizedExample, TrainingDataError, read_chat_jsonl, tokenize_dataset
from loraforge.trainer.device_setup import compute_dtype, load_base, make_optimizer, prepare_for_training
from loraforge.trainer.hyperparams import ResolvedHyperparameters, resolve_hyperparameters, steps_per_epoch
from loraforge.trainer.loop import DONE, train_loop
from loraforge.trainer.loss import CausalLMLoss, resolve_loss_mode
from loraforge.trainer.spec import TrainSpec
from loraforge.trainer.start import build_model

logger = logging.getLogger(__name__)

Emit = Callable[[dict[str, Any]], None]

# Gradient norm is clipped at 1.0 in the loop; weight decay and warmup come from the spec.
# Packed rows on CUDA are rounded up to a multiple of flex_attention's 128-token block: fewer
# distinct shapes to compile for, at most 127 filler tokens per micro-batch.
PACK_MULTIPLE_CUDA = 128


def warmup_schedule(warmup_ratio: float, total_steps: int) -> Callable[[int], float]:
    """LR factor per step: linear from 1/W up to 1 over the first W = ceil(ratio * steps) steps, then 1.

    Args:
        warmup_ratio: fraction of the steps spent warming up (0: none, factor 1 throughout).
        total_steps: optimizer steps of the run.

    Returns:
        The ``LambdaLR`` factor function.
    """
    warmup = math.ceil(warmup_ratio * total_steps)
    return lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


@dataclass
class TrainingRun:
    """Everything :func:`setup` builds and the later phases use."""

    spec: TrainSpec
    entry: BaseModelEntry
    accelerator: Accelerator
    tokenizer: Any
    model: Any
    optimizer: Any
    # Linear warmup over spec.warmup_ratio of the steps, then constant; checkpointed for resume.
    scheduler: Any
    train_set: list[TokenizedExample]
    valid_set: list[TokenizedExample]
    hyperparameters: ResolvedHyperparameters
    lora: LoraSettings
    total_steps: int
    train_tokens_per_epoch: int
    # Identifies checkpoints this run may resume (spec + resolved hyperparameters).
    fingerprint: str
    # The module the loop calls (the PEFT model + its loss; what accelerate prepares under FSDP).
    loss_module: Any = None
    # Autocast dtype (bf16 on CUDA with a bf16 or 4-bit base; None: plain fp32).
    compute_dtype: torch.dtype | None = None
    # Packed rows are rounded up to this many tokens with a filler document (CUDA; None on CPU).
    pad_to_multiple: int | None = None
    # Where the loop starts (step 0 or a checkpoint's position) and where it is.
    position: ckpt.Position = field(default_factory=ckpt.Position)
    # RNG states to restore right before the first step of a resumed run.
    resume_rng: dict[str, Any] | None = None
    resumed_from: ckpt.CheckpointInfo | None = None
    last_checkpoint_step: int = -1
    # The last step's metrics (validation merged in when it ran at that step) ...
    step_metrics: dict[str, float] = field(default_factory=dict)
    # ... and the latest value of every metric so far (for the manifest).
    metrics: dict[str, float] = field(default_factory=dict)


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but CUDA is not available")
    return device


def _restore(run: TrainingRun, resume: ckpt.CheckpointInfo) -> None:
    """Load optimizer, scheduler, data position, metrics and RNG states from ``resume``."""
    state = ckpt.load_training_state(resume)
    dist.load_optimizer_state(run.loss_module, run.optimizer, state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.position = ckpt.Position(**state["position"])
    run.resume_rng = state["rng"]
    run.metrics = dict(state.get("metrics") or {})
    run.step_metrics = dict(resume.metrics)
    run.resumed_from = resume
    run.last_checkpoint_step = resume.step


def setup(spec: TrainSpec) -> TrainingRun:
    """Phase 1: read and tokenize the data, resolve hyperparameters, build model and optimizer.

    Data is validated before the model is loaded, so a bad file fails fast. When a checkpoint of
    this spec exists, the run is positioned to continue from it.

    Args:
        spec: the run's spec.

    Returns:
        The prepared run.

    Raises:
        TrainingDataError: the training or validation file is invalid.
        ValueError: the base model is not in the catalog, or ``init_adapter`` does not fit it.
    """
    if spec.torch_threads > 0:
        torch.set_num_threads(spec.torch_threads)
    catalog = load_catalog(Path(spec.models_config) if spec.models_config else None)
    entry = catalog.get(spec.base_model)
    if entry is None:
        raise ValueError(f"base model {spec.base_model!r} is not in the model catalog")
    train_examples = read_chat_jsonl(spec.training_file)
    valid_examples = (
        read_chat_jsonl(spec.validation_file, param="validation_file", min_examples=1)
        if spec.validation_file
        else []
    )

    models_dir = Path(spec.models_dir)
    tokenizer = load_tokenizer(entry, models_dir)
    max_len = min(spec.max_seq_length or entry.max_seq_length, entry.context_length)
    train_set = tokenize_dataset(tokenizer, train_examples, max_len)
    valid_set = tokenize_dataset(tokenizer, valid_examples, max_len)
    train_tokens = sum(ex.n_label_tokens for ex in train_set)
    if train_tokens == 0:
        raise TrainingDataError(
            "invalid_training_file",
            "Training file has no assistant tokens to train on (all have weight 0 or were truncated)",
        )
    hp = resolve_hyperparameters(spec.hyperparameters, len(train_set), entry)
    total_steps = hp.n_epochs * steps_per_epoch(len(train_set), hp.batch_size)

    device = _resolve_device(spec.device)
    plan = spec.plan
    # Under `accelerate launch` (FSDP) the Accelerator reads the plugin and ranks from the env.
    accelerator = Accelerator(cpu=device == "cpu")
    world = dist.world_size()
    base = load_base(entry, models_dir, accelerator.device, plan)
    dtype = compute_dtype(accelerator.device.type, next(base.parameters()).dtype, plan.strategy)
    fingerprint = spec.fingerprint(hp.model_dump())
    model, lora, resume = build_model(spec, entry, base, fingerprint)
    model = prepare_for_training(model, plan, accelerator.device.type, dtype)
    loss_mode = resolve_loss_mode(plan.loss, accelerator.device.type, world)
    loss_module: Any = CausalLMLoss(model, loss_mode)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, hp.learning_rate, spec.weight_decay, accelerator.device.type)
    if world > 1:  # FSDP shards the loss module (decoder layers as units) and the optimizer
        loss_module, optimizer = accelerator.prepare(loss_module, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_schedule(spec.warmup_ratio, total_steps))
    run = TrainingRun(
        spec=spec,
        entry=entry,
        accelerator=accelerator,
        tokenizer=tokenizer,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_set=train_set,
        valid_set=valid_set,
        hyperparameters=hp,
        lora=lora,
        total_steps=total_steps,
        train_tokens_per_epoch=train_tokens,
        fingerprint=fingerprint,
        loss_module=loss_module,
        compute_dtype=dtype,
        pad_to_multiple=PACK_MULTIPLE_CUDA if plan.packing and accelerator.device.type == "cuda" else None,
    )
    if resume is not None:
        _restore(run, resume)
    logger.info(
        "setup: %s on %s x%d (%s, loss %s, attention %s, autocast %s), %d examples "
        "(%d trained tokens/epoch), %s, %d steps, %d trainable params, from %s",
        entry.id,
        accelerator.device,
        world,
        plan.model_dump(),
        loss_mode,
        base.config._attn_implementation,
        dtype,
        len(train_set),
        train_tokens,
        hp.model_dump(),
        total_steps,
        sum(p.numel() for p in params),
        f"checkpoint step {resume.step}" if resume else (spec.init_adapter or "a fresh LoRA init"),
    )
    return run


def build_manifest(run: TrainingRun, metrics: dict[str, float], *, steps: int) -> AdapterManifest:
    """The adapter manifest for the model after ``steps`` steps (a checkpoint or the final one).

    Args:
        run: the run.
        metrics: the metrics to record.
        steps: optimizer steps taken so far.

    Returns:
        The manifest.
    """
    per_epoch = steps_per_epoch(len(run.train_set), run.hyperparameters.batch_size)
    return AdapterManifest(
        job_id=run.spec.job_id,
        base_model=run.entry.id,
        base_weights=run.entry.weights,
        chat_template=run.entry.chat_template_text,
        stop_tokens=list(run.entry.stop_tokens),
        lora=run.lora,
        hyperparameters={
            **run.hyperparameters.model_dump(),
            "max_seq_length": min(
                run.spec.max_seq_length or run.entry.max_seq_length, run.entry.context_length
            ),
            "warmup_ratio": run.spec.warmup_ratio,
            "weight_decay": run.spec.weight_decay,
        },
        metrics=metrics,
        trained_tokens=run.train_tokens_per_epoch * steps // per_epoch,
        total_steps=steps,
        spec_hash=run.spec.spec_hash(),
    )


def _install(tmp: Path, final: Path) -> None:
    """Move the finished ``tmp`` adapter to ``final``, replacing an earlier adapter (a retry)."""
    if final.exists():
        if not final.is_dir() or not (
            not any(final.iterdir()) or (final / ADAPTER_CONFIG).exists() or (final / MANIFEST).exists()
        ):
            raise FileExistsError(f"{final} exists and is not an adapter directory; refusing to replace it")
    ckpt.replace_dir(tmp, final)


def save(run: TrainingRun, metrics: dict[str, float]) -> AdapterManifest:
    """Phase 3: write the PEFT pair and ``manifest.json`` to a temp sibling, then rename it.

    A run killed before the rename leaves only a hidden ``.<name>.partial-*`` directory, never a
    half-written ``output_dir``; such leftovers of earlier runs are removed here.

    Args:
        run: the trained run.
        metrics: the final metrics for the manifest.

    Returns:
        The manifest written.
    """
    final = Path(run.spec.output_dir).resolve()
    # Gathering FSDP shards is a collective: every rank takes part, rank 0 writes.
    adapter_state = dist.adapter_state_dict(run.model)
    if not dist.is_main():
        dist.barrier()
        return build_manifest(run, metrics, steps=run.total_steps)
    final.parent.mkdir(parents=True, exist_ok=True)
    for leftover in final.parent.glob(f".{final.name}.partial-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        run.model.save_pretrained(tmp, state_dict=adapter_state)
        (tmp / "README.md").unlink(missing_ok=True)
        manifest = build_manifest(run, metrics, steps=run.total_steps)
        write_manifest(tmp, manifest)
        # mkdtemp/mkstemp create private (0700/0600) entries; the engine may run as another user.
        tmp.chmod(0o755)
        for path in tmp.iterdir():
            path.chmod(0o644)
        _install(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
    logger.info("adapter written to %s", final)
    return manifest


def cleanup(run: TrainingRun) -> None:
    """Phase 4: drop references to the model and optimizer and free accelerator memory.

    Args:
        run: the finished (or failed) run.
    """
    run.model = run.optimizer = run.scheduler = run.loss_module = None
    run.accelerator.free_memory()


def _hyperparameters_line(run: TrainingRun) -> dict[str, Any]:
    hp = run.hyperparameters
    return {
        "type": "hyperparameters",
        "n_epochs": hp.n_epochs,
        "batch_size": hp.batch_size,
        "learning_rate_multiplier": hp.learning_rate_multiplier,
        "learning_rate": hp.learning_rate,
        "total_steps": run.total_steps,
        "n_examples": len(run.train_set),
        "train_tokens_per_epoch": run.train_tokens_per_epoch,
    }


def train(spec: TrainSpec, emit: Emit) -> AdapterManifest | None:
    """Fine-tune a LoRA adapter on ``spec.training_file`` and write it to ``spec.output_dir``.

    Emits, in order: one ``hyperparameters`` dict; a ``resumed`` dict when it continues from a
    checkpoint; ``metrics`` and ``checkpoint`` dicts during training; then either one ``done``
    dict after the adapter is in place, or one ``paused`` dict when ``spec.pause_file`` appeared
    (see the package docstring for the shapes).

    Args:
        spec: what to train.
        emit: called with each progress dict (the CLI prints them as JSON lines).

    Returns:
        The manifest written into the adapter directory, or None when the run was paused.

    Raises:
        TrainingDataError: the training or validation file is invalid.
    """
    run = setup(spec)
    try:
        emit(_hyperparameters_line(run))
        if run.resumed_from is not None:
            info = run.resumed_from
            emit(
                {
                    "type": "resumed",
                    "step": info.step,
                    "epoch": info.epoch,
                    "kind": info.kind,
                    "path": str(info.path.resolve()),
                }
            )
        if train_loop(run, emit) != DONE:
            latest = ckpt.list_checkpoints(Path(spec.checkpoint_dir)) if spec.checkpoint_dir else []
            emit(
                {
                    "type": "paused",
                    "step": run.position.step,
                    "total_steps": run.total_steps,
                    "checkpoint": str(latest[-1].path.resolve()) if latest else None,
                }
            )
            return None
        metrics = dict(run.metrics)
        manifest = save(run, metrics)
    finally:
        cleanup(run)
    emit(
        {
            "type": "done",
            "adapter_dir": str(Path(spec.output_dir).resolve()),
            "trained_tokens": manifest.trained_tokens,
            "total_steps": manifest.total_steps,
            "train_loss": metrics["train_loss"],
            "metrics": metrics,
            "resumed_from_step": run.resumed_from.step if run.resumed_from else None,
        }
    )
    return manifest
