"""The LoRA recipe: ``train(spec, emit)`` = setup -> train -> save -> cleanup.

An explicit Accelerate + PEFT loop (no ``transformers.Trainer``): one process on one device, or
one process per GPU under ``accelerate launch`` for ``plan.strategy == "fsdp"``. The loss is the
mean cross-entropy over assistant tokens only (labels != -100); the same spec gives the same loss
sequence on CPU (seeded LoRA init, seeded data order, no other randomness).

Read top to bottom: :func:`setup` runs :func:`_setup_data` (validate and tokenize the files into
memory-mapped Arrow, cached in ``spec.data_dir`` by :mod:`.dataset`; resolve the
hyperparameters), :func:`_setup_model` (device, base model, LoRA; from the newest checkpoint
of this spec in ``spec.checkpoint_dir`` -- crash recovery, resume after pause -- else
``spec.init_adapter`` -- continued fine-tuning -- else a fresh seeded LoRA init) and
:func:`_setup_optimizer`, then puts back a checkpoint's optimizer and position; :func:`train`
runs the loop (:mod:`loraforge.trainer.loop`), :func:`save` writes the adapter, :func:`cleanup`
frees the accelerator. ``spec.plan`` decides the micro-batch layout (:mod:`.packing`), the loss
(:mod:`.loss`), and dtype, attention, QLoRA, recompute and compile (:mod:`.device_setup`).

Progress is reported as typed events (:mod:`loraforge.contracts.trainer_events`) through
``emit``; the CLI prints each as one JSON line.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers import PreTrainedTokenizerBase

from loraforge.adapters.format import ADAPTER_CONFIG, MANIFEST, AdapterManifest, write_manifest
from loraforge.catalog.catalog import load_catalog
from loraforge.catalog.loading import load_tokenizer
from loraforge.contracts.hyperparams import resolve_hyperparameters, steps_per_epoch
from loraforge.contracts.train_spec import TrainSpec
from loraforge.contracts.trainer_events import (
    DataProgressEvent,
    DoneEvent,
    Emit,
    HyperparametersEvent,
    PausedEvent,
    ResumedEvent,
    StepMetrics,
)
from loraforge.trainer import checkpointer as ckpt
from loraforge.trainer import distributed as dist
from loraforge.trainer import dpo
from loraforge.trainer.data import TrainingDataError
from loraforge.trainer.dataset import ArrowExamples, prepare
from loraforge.trainer.device_setup import compute_dtype, load_base, make_optimizer, prepare_for_training
from loraforge.trainer.dpo_data import read_preference_jsonl, tokenize_pairs
from loraforge.trainer.dpo_logps import SequenceLogps
from loraforge.trainer.loop import DONE, train_loop
from loraforge.trainer.loss import CausalLMLoss, resolve_loss_mode
from loraforge.trainer.start import build_model
from loraforge.trainer.training_run import Optimization, RunData, RunModel, TrainingRun

logger = logging.getLogger(__name__)

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


def setup(spec: TrainSpec, emit: Emit | None = None) -> TrainingRun:
    """Phase 1: data, then model, then optimizer; positioned at a checkpoint of this spec if any.

    Data is validated before the model is loaded, so a bad file fails fast.

    Args:
        spec: the run's spec.
        emit: receives ``data_progress`` events while the files are prepared (None: not reported).

    Returns:
        The prepared run.

    Raises:
        TrainingDataError: the training or validation file is invalid.
        ValueError: the base model is not in the catalog, or ``init_adapter`` does not fit it.
    """
    if spec.torch_threads > 0:
        torch.set_num_threads(spec.torch_threads)
    data = _setup_data(spec, emit)
    model = _setup_model(spec, data)
    run = TrainingRun(spec=spec, data=data, model=model, optim=_setup_optimizer(spec, data, model))
    if model.resume is not None:
        _restore(run, model.resume)
    if spec.method == "dpo":
        dpo.ensure_reference(run)  # before the first step: the starting model is the reference
    return run


def _setup_data(spec: TrainSpec, emit: Emit | None = None) -> RunData:
    """Prepare the files (tokenized Arrow, cached in ``spec.data_dir``), resolve ``"auto"``
    hyperparameters, count the steps."""
    catalog = load_catalog(Path(spec.models_config) if spec.models_config else None)
    entry = catalog.get(spec.base_model)
    if entry is None:
        raise ValueError(f"base model {spec.base_model!r} is not in the model catalog")
    tokenizer = load_tokenizer(entry, Path(spec.models_dir))
    max_len = min(spec.max_seq_length or entry.max_seq_length, entry.context_length)
    train_set: Sequence[Any]
    valid_set: Sequence[Any]
    scratch: Path | None = None
    if spec.method == "dpo":
        # Preference pairs stay a list read whole (not on the Arrow pipeline yet).
        train_set = tokenize_pairs(tokenizer, read_preference_jsonl(spec.training_file), max_len, "train")
        valid_set = (
            tokenize_pairs(
                tokenizer,
                read_preference_jsonl(spec.validation_file, param="validation_file", min_examples=1),
                max_len,
                "valid",
            )
            if spec.validation_file
            else []
        )
        train_tokens = sum(ex.n_label_tokens for ex in train_set)
    else:
        scratch = None if spec.data_dir else Path(tempfile.mkdtemp(prefix="loraforge-data-"))
        cache_root = Path(spec.data_dir) if spec.data_dir else scratch
        assert cache_root is not None
        try:
            arrow_train, valid_set = _prepare_files(spec, tokenizer, max_len, cache_root, emit)
        except BaseException:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            raise
        train_set, train_tokens = arrow_train, arrow_train.n_label_tokens()
    if train_tokens == 0:
        raise TrainingDataError(
            "invalid_training_file",
            "Training file has no assistant tokens to train on (all have weight 0 or were truncated)",
        )
    hp = resolve_hyperparameters(spec.hyperparameters, len(train_set), entry)
    total_steps = hp.n_epochs * steps_per_epoch(len(train_set), hp.batch_size)
    logger.info(
        "data: %s, %d examples (%d trained tokens/epoch), %s, %d steps",
        entry.id,
        len(train_set),
        train_tokens,
        hp.model_dump(),
        total_steps,
    )
    return RunData(
        entry=entry,
        tokenizer=tokenizer,
        train_set=train_set,
        valid_set=valid_set,
        hyperparameters=hp,
        max_seq_length=max_len,
        total_steps=total_steps,
        train_tokens_per_epoch=train_tokens,
        scratch=scratch,
    )


def _prepare_files(
    spec: TrainSpec, tokenizer: PreTrainedTokenizerBase, max_len: int, cache_root: Path, emit: Emit | None
) -> tuple[ArrowExamples, ArrowExamples]:
    """The training and validation files as memory-mapped examples (rank 0 prepares, others wait)."""
    # Under `accelerate launch` torch.distributed is not up yet: the launcher's RANK says who we are.
    # Only a shared ``data_dir`` can be waited for: without one each rank has a scratch folder of
    # its own (a follower would wait for ever) and prepares the same rows itself.
    follower = spec.data_dir is not None and int(os.environ.get("RANK", "0") or 0) != 0

    def progress(fraction: float, elapsed: float, left: float) -> None:
        # A file prepared within a second needs no progress report, only the "ready" line.
        if emit is not None and fraction < 1 and elapsed >= 1:
            event = DataProgressEvent(
                fraction=round(fraction, 4), elapsed_s=round(elapsed, 2), eta_s=round(left, 2)
            )
            emit(event)

    common = {"method": "supervised", "num_proc": spec.data_num_proc or None, "wait_only": follower}
    train = prepare(spec.training_file, tokenizer, max_len, cache_root, progress=progress, **common)
    if emit is not None:
        emit(
            DataProgressEvent(
                fraction=1.0,
                elapsed_s=round(train.seconds, 2),
                eta_s=0.0,
                n_examples=len(train.examples),
                cached=train.cached,
            )
        )
    if not spec.validation_file:
        return train.examples, ArrowExamples.empty()
    file = spec.validation_file
    valid = prepare(file, tokenizer, max_len, cache_root, param="validation_file", min_examples=1, **common)
    return train.examples, valid.examples


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but CUDA is not available")
    return device


def _setup_model(spec: TrainSpec, data: RunData) -> RunModel:
    """Load the base on the device and put LoRA on it, from a checkpoint, an adapter or fresh."""
    plan = spec.plan
    # Under `accelerate launch` (FSDP) the Accelerator reads the plugin and ranks from the env.
    accelerator = Accelerator(cpu=_resolve_device(spec.device) == "cpu")
    device_type = accelerator.device.type
    base = load_base(data.entry, Path(spec.models_dir), accelerator.device, plan)
    dtype = compute_dtype(device_type, next(base.parameters()).dtype, plan.strategy)
    fingerprint = spec.fingerprint(data.hyperparameters.model_dump())
    model, lora, resume = build_model(spec, data.entry, base, fingerprint)
    model = prepare_for_training(model, plan, device_type, dtype)
    logger.info(
        "model: %s on %s x%d (%s, attention %s, autocast %s), %d trainable params, from %s",
        data.entry.id,
        accelerator.device,
        dist.world_size(),
        plan.model_dump(),
        base.config._attn_implementation,
        dtype,
        sum(p.numel() for p in model.parameters() if p.requires_grad),
        f"checkpoint step {resume.step}" if resume else (spec.init_adapter or "a fresh LoRA init"),
    )
    return RunModel(
        accelerator=accelerator,
        peft=model,
        lora=lora,
        fingerprint=fingerprint,
        resume=resume,
        compute_dtype=dtype,
        pad_to_multiple=PACK_MULTIPLE_CUDA if plan.packing and device_type == "cuda" else None,
    )


def _setup_optimizer(spec: TrainSpec, data: RunData, model: RunModel) -> Optimization:
    """AdamW on the LoRA parameters and the warmup schedule; the loss module the loop calls."""
    accelerator, world = model.accelerator, dist.world_size()
    loss_mode = resolve_loss_mode(spec.plan.loss, accelerator.device.type, world)
    logger.info("loss: %s", loss_mode)
    loss_module: torch.nn.Module = (
        # DPO needs per-sequence log-probs, which the fused CE kernel does not give: chunked instead.
        SequenceLogps(model.peft, "full" if loss_mode == "full" else "chunked")
        if spec.method == "dpo"
        else CausalLMLoss(model.peft, loss_mode)
    )
    params = [p for p in model.peft.parameters() if p.requires_grad]
    optimizer = make_optimizer(
        params, data.hyperparameters.learning_rate, spec.weight_decay, accelerator.device.type
    )
    if world > 1:  # FSDP shards the loss module (decoder layers as units) and the optimizer
        loss_module, optimizer = accelerator.prepare(loss_module, optimizer)
    schedule = warmup_schedule(spec.warmup_ratio, data.total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return Optimization(loss_module=loss_module, optimizer=optimizer, scheduler=scheduler)


def _restore(run: TrainingRun, resume: ckpt.CheckpointInfo) -> None:
    """Load optimizer, scheduler, data position, metrics and RNG states from ``resume``."""
    saved = ckpt.load_training_state(resume)
    dist.load_optimizer_state(run.optim.loss_module, run.optim.optimizer, saved["optimizer"])
    run.optim.scheduler.load_state_dict(saved["scheduler"])
    run.state.position = ckpt.Position(**saved["position"])
    run.state.resume_rng = saved["rng"]
    run.state.metrics = dict(saved.get("metrics") or {})
    run.state.step_metrics = dict(resume.metrics)
    run.state.last_checkpoint_step = resume.step
    run.state.reference = saved.get("dpo_reference")


def train(spec: TrainSpec, emit: Emit) -> AdapterManifest | None:
    """Fine-tune a LoRA adapter on ``spec.training_file`` and write it to ``spec.output_dir``.

    Emits, in order: one ``hyperparameters`` event; a ``resumed`` event when it continues from a
    checkpoint; ``metrics`` and ``checkpoint`` events during training; then either one ``done``
    event after the adapter is in place, or one ``paused`` event when ``spec.pause_file``
    appeared (see :mod:`loraforge.contracts.trainer_events`).

    Args:
        spec: what to train.
        emit: called with each event (the CLI prints them as JSON lines).

    Returns:
        The manifest written into the adapter directory, or None when the run was paused.

    Raises:
        TrainingDataError: the training or validation file is invalid.
    """
    run = setup(spec, emit)
    data, resumed = run.data, run.model.resume
    try:
        hp = data.hyperparameters
        emit(
            HyperparametersEvent(
                n_epochs=hp.n_epochs,
                batch_size=hp.batch_size,
                learning_rate_multiplier=hp.learning_rate_multiplier,
                learning_rate=hp.learning_rate,
                total_steps=data.total_steps,
                n_examples=len(data.train_set),
                train_tokens_per_epoch=data.train_tokens_per_epoch,
                beta=spec.beta() if spec.method == "dpo" else None,
            )
        )
        if resumed is not None:
            emit(
                ResumedEvent(
                    step=resumed.step,
                    epoch=resumed.epoch,
                    kind=resumed.kind,
                    path=str(resumed.path.resolve()),
                )
            )
        if train_loop(run, emit) != DONE:
            emit(_paused_event(run))
            return None
        metrics = dict(run.state.metrics)
        manifest = save(run, metrics)
    finally:
        cleanup(run)
    emit(
        DoneEvent(
            adapter_dir=str(Path(spec.output_dir).resolve()),
            trained_tokens=manifest.trained_tokens,
            total_steps=manifest.total_steps,
            train_loss=metrics["train_loss"],
            metrics=StepMetrics.model_validate(metrics),
            resumed_from_step=resumed.step if resumed else None,
        )
    )
    return manifest


def _paused_event(run: TrainingRun) -> PausedEvent:
    root = run.spec.checkpoint_dir
    latest = ckpt.list_checkpoints(Path(root)) if root else []
    return PausedEvent(
        step=run.state.position.step,
        total_steps=run.data.total_steps,
        checkpoint=str(latest[-1].path.resolve()) if latest else None,
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
    adapter_state = dist.adapter_state_dict(run.model.peft)
    if not dist.is_main():
        dist.barrier()
        return run.manifest(metrics, steps=run.data.total_steps)
    final.parent.mkdir(parents=True, exist_ok=True)
    for leftover in final.parent.glob(f".{final.name}.partial-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        run.model.peft.save_pretrained(tmp, state_dict=adapter_state)
        (tmp / "README.md").unlink(missing_ok=True)
        manifest = run.manifest(metrics, steps=run.data.total_steps)
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
    """Phase 4: release what accelerate holds (FSDP-prepared modules) and free accelerator memory.

    The run's own tensors go with the last reference to ``run`` (the caller's), right after.

    Args:
        run: the finished (or failed) run.
    """
    run.model.accelerator.free_memory()
    if run.data.scratch is not None:
        shutil.rmtree(run.data.scratch, ignore_errors=True)
