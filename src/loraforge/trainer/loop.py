"""The optimisation loop: steps, metrics lines, validation, epoch checkpoints, pause.

The loop can start anywhere: :class:`~loraforge.trainer.checkpointer.Position` says which epoch,
which batch of it, and the data-order generator state, so a resumed run takes exactly the steps
an uninterrupted one would have taken (same batches, same RNG, same optimizer state).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from loraforge.trainer import checkpointer as ckpt
from loraforge.trainer import distributed as dist
from loraforge.trainer.data import TokenizedExample
from loraforge.trainer.packing import MicroBatch, shard_for_rank, step_micro_batches
from loraforge.trainer.step import StepStats, forward_backward

if TYPE_CHECKING:
    from loraforge.trainer.recipe import TrainingRun

logger = logging.getLogger(__name__)

Emit = Callable[[dict[str, Any]], None]

MAX_GRAD_NORM = 1.0
# Periodic and epoch-end validation use the first examples of the validation file (OpenAI's
# valid_loss is also a sample); the full set is evaluated once, at the end (full_valid_*).
VALID_SAMPLE = 64
DONE = "done"
PAUSED = "paused"


def _batches(
    examples: list[TokenizedExample], order: list[int], batch_size: int
) -> list[list[TokenizedExample]]:
    return [[examples[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]


def micro_batches(run: TrainingRun, examples: list[TokenizedExample]) -> list[MicroBatch]:
    """This rank's micro-batches of one step's (or one evaluation batch's) examples, per the plan.

    Args:
        run: the prepared run.
        examples: the step's examples (all ranks').

    Returns:
        The micro-batches to run on this process.
    """
    plan = run.spec.plan
    return step_micro_batches(
        shard_for_rank(examples, dist.rank(), dist.world_size()),
        packing=plan.packing,
        token_budget=plan.token_budget,
        pad_token_id=run.tokenizer.pad_token_id,
        pad_to_multiple=run.pad_to_multiple,
    )


def _run_step(run: TrainingRun, examples: list[TokenizedExample], *, train: bool) -> StepStats:
    return forward_backward(
        run.loss_module,
        micro_batches(run, examples),
        device=run.accelerator.device,
        backward=run.accelerator.backward if train else None,
        compute_dtype=run.compute_dtype,
        pad_token_id=run.tokenizer.pad_token_id,
    )


def evaluate(run: TrainingRun, examples: list[TokenizedExample] | None = None) -> dict[str, float]:
    """Token-weighted loss and accuracy over ``examples`` (default: the validation sample).

    Args:
        run: the prepared run.
        examples: what to evaluate; None means the first ``VALID_SAMPLE`` validation examples.

    Returns:
        ``{"valid_loss", "valid_mean_token_accuracy"}``.
    """
    examples = run.valid_set[:VALID_SAMPLE] if examples is None else examples
    loss_total, correct_total, count_total = 0.0, 0.0, 0
    run.model.eval()
    with torch.no_grad():
        for chunk in _batches(examples, list(range(len(examples))), run.hyperparameters.batch_size):
            stats = _run_step(run, chunk, train=False)
            loss_total += stats.loss * stats.n_targets
            correct_total += stats.accuracy * stats.n_targets
            count_total += stats.n_targets
    run.model.train()
    return {
        "valid_loss": loss_total / max(count_total, 1),
        "valid_mean_token_accuracy": correct_total / max(count_total, 1),
    }


def _pause_requested(run: TrainingRun) -> bool:
    asked = bool(run.spec.pause_file) and os.path.exists(str(run.spec.pause_file))
    if dist.world_size() == 1:
        return asked
    # Every rank must stop at the same step (or the others hang in the next collective).
    flag = torch.tensor([int(asked)], device=run.accelerator.device)
    return bool(dist.all_reduce(flag, op="max").item())


def _checkpoint(run: TrainingRun, kind: str, generator: torch.Generator, emit: Emit) -> Path | None:
    """Save the run's state at ``run.position``; emit a ``checkpoint`` line (None: disabled)."""
    if not run.spec.checkpoint_dir:
        return None
    from loraforge.trainer.recipe import build_manifest

    pos, step = run.position, run.position.step
    metrics = dict(run.step_metrics)
    info = {
        "step": step,
        "epoch": pos.epoch if pos.batch_index else pos.epoch - 1,
        "kind": kind,
        "fingerprint": run.fingerprint,
        "metrics": metrics,
    }
    state = {
        "position": {
            "step": step,
            "epoch": pos.epoch,
            "batch_index": pos.batch_index,
            "order": pos.order,
            "generator_state": generator.get_state(),
        },
        "optimizer": dist.optimizer_state(run.loss_module, run.optimizer),
        "scheduler": run.scheduler.state_dict(),
        "rng": ckpt.rng_state(),
        "metrics": dict(run.metrics),
    }
    root = Path(run.spec.checkpoint_dir)
    # Gathering FSDP shards is a collective: every rank takes part, rank 0 writes.
    adapter_state = dist.adapter_state_dict(run.model)
    run.last_checkpoint_step = step
    if not dist.is_main():
        dist.barrier()
        return None
    written = ckpt.save_checkpoint(
        root,
        model=run.model,
        manifest=build_manifest(run, metrics, steps=step),
        info=info,
        state=state,
        adapter_state=adapter_state,
    )
    dist.barrier()
    removed = ckpt.prune(root, run.spec.keep_checkpoints, step)
    emit(
        {
            "type": "checkpoint",
            "kind": kind,
            "step": step,
            "epoch": written.epoch,
            "path": str(written.path.resolve()),
            "metrics": {"step": step, **metrics},
            "removed": [str(path.resolve()) for path in removed],
        }
    )
    return written.path


def _metrics_line(run: TrainingRun, epoch: int) -> dict[str, Any]:
    return {
        "type": "metrics",
        "step": run.position.step,
        "total_steps": run.total_steps,
        "epoch": epoch,
        **run.step_metrics,
    }


def _train_step(run: TrainingRun, chunk: list[TokenizedExample], params: list[Any]) -> None:
    stats = _run_step(run, chunk, train=True)
    run.accelerator.clip_grad_norm_(params, MAX_GRAD_NORM)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step_metrics = {"train_loss": stats.loss, "train_mean_token_accuracy": stats.accuracy}
    run.metrics.update(run.step_metrics)


def _validate(run: TrainingRun, epoch_end: bool) -> None:
    """Add validation metrics for this step where due: sample periodically, full set at the end."""
    if not run.valid_set:
        return
    step, every = run.position.step, run.spec.eval_every
    if epoch_end or (every and step % every == 0) or step == run.total_steps:
        run.step_metrics.update(evaluate(run))
    if step == run.total_steps:
        full = evaluate(run, run.valid_set)
        run.step_metrics.update(
            full_valid_loss=full["valid_loss"],
            full_valid_mean_token_accuracy=full["valid_mean_token_accuracy"],
        )
    run.metrics.update(run.step_metrics)


def train_loop(run: TrainingRun, emit: Emit) -> str:
    """Phase 2: optimise from ``run.position`` to the end, or until a pause is requested.

    Emits a ``metrics`` line every ``spec.log_every`` steps, on the last step and whenever
    validation ran (``valid_*`` merged in; ``full_valid_*`` on the last step), a ``checkpoint``
    line after each epoch-end checkpoint, and, when pausing, the ``checkpoint`` of the pause.

    Args:
        run: the prepared (possibly resumed) run.
        emit: receives each dict.

    Returns:
        ``"done"`` when every step ran, ``"paused"`` when the pause file stopped the run.
    """
    spec, hp, pos = run.spec, run.hyperparameters, run.position
    params = [p for p in run.model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(spec.seed)
    if pos.generator_state is not None:
        generator.set_state(pos.generator_state)
    if run.resume_rng is not None:
        ckpt.restore_rng(run.resume_rng)
    first_step, started = pos.step, time.monotonic()
    run.model.train()
    while pos.epoch <= hp.n_epochs:
        if pos.order is None:
            pos.order = torch.randperm(len(run.train_set), generator=generator).tolist()
        batches = _batches(run.train_set, pos.order, hp.batch_size)
        while pos.batch_index < len(batches):
            if _pause_requested(run):
                if pos.step > 0 and pos.step != run.last_checkpoint_step:
                    _checkpoint(run, ckpt.PAUSE, generator, emit)
                return PAUSED
            _train_step(run, batches[pos.batch_index], params)
            pos.step += 1
            pos.batch_index += 1
            _validate(run, epoch_end=pos.batch_index == len(batches))
            line = _metrics_line(run, pos.epoch)
            if "valid_loss" in line or pos.step % spec.log_every == 0 or pos.step == run.total_steps:
                emit(line)
        # The epoch checkpoint's position is the start of the next epoch (its order not drawn yet).
        pos.epoch, pos.batch_index, pos.order = pos.epoch + 1, 0, None
        _checkpoint(run, ckpt.EPOCH, generator, emit)
    logger.info(
        "trained steps %d-%d in %.2f s, final %s",
        first_step + 1,
        pos.step,
        time.monotonic() - started,
        run.metrics,
    )
    return DONE
