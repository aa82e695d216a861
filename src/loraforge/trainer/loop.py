"""The optimisation loop: steps, metrics lines, validation, epoch checkpoints, pause.

The loop can start anywhere: :class:`~loraforge.trainer.checkpointer.Position` says which epoch,
which batch of it, and the data-order generator state, so a resumed run takes exactly the steps
an uninterrupted one would have taken (same batches, same RNG, same optimizer state).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from loraforge.contracts.trainer_events import CheckpointEvent, Emit, MetricsEvent, StepMetrics
from loraforge.trainer import checkpointer as ckpt
from loraforge.trainer import distributed as dist
from loraforge.trainer import dpo
from loraforge.trainer.data import TokenizedExample
from loraforge.trainer.packing import MicroBatch, shard_for_rank, step_micro_batches
from loraforge.trainer.step import StepStats, forward_backward
from loraforge.trainer.training_run import TrainingRun

logger = logging.getLogger(__name__)

MAX_GRAD_NORM = 1.0
# Periodic and epoch-end validation use the first examples of the validation file (OpenAI's
# valid_loss is also a sample); the full set is evaluated once, at the end (full_valid_*).
VALID_SAMPLE = 64
DONE = "done"
PAUSED = "paused"


def _rows(examples: Sequence[Any], indices: list[int]) -> list[Any]:
    """The examples at ``indices``: one gather from the memory-mapped table, or a list lookup."""
    take = getattr(examples, "take", None)
    return list(take(indices)) if take is not None else [examples[i] for i in indices]


def _batches(order: list[int], batch_size: int) -> list[list[int]]:
    """The epoch's steps as row numbers; the rows are read only when their step runs."""
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


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
        pad_token_id=run.data.tokenizer.pad_token_id,
        pad_to_multiple=run.model.pad_to_multiple,
    )


def _run_step(run: TrainingRun, examples: list[Any], *, train: bool) -> StepStats:
    if run.spec.method == "dpo":
        return dpo.run_step(run, examples, train=train)
    return forward_backward(
        run.optim.loss_module,
        micro_batches(run, examples),
        device=run.model.accelerator.device,
        backward=run.model.accelerator.backward if train else None,
        compute_dtype=run.model.compute_dtype,
        pad_token_id=run.data.tokenizer.pad_token_id,
    )


def evaluate(run: TrainingRun, examples: Sequence[Any] | None = None) -> dict[str, float]:
    """Token-weighted loss and accuracy over ``examples`` (default: the validation sample).

    A DPO run's are weighted by pairs, and its reward metrics come as ``valid_rewards_*``.

    Args:
        run: the prepared run.
        examples: what to evaluate; None means the first ``VALID_SAMPLE`` validation examples.

    Returns:
        ``{"valid_loss", "valid_mean_token_accuracy"}``.
    """
    if examples is None:
        examples = _rows(run.data.valid_set, list(range(min(VALID_SAMPLE, len(run.data.valid_set)))))
    loss_total, correct_total, count_total = 0.0, 0.0, 0
    extra_total: dict[str, float] = {}
    run.model.peft.eval()
    with torch.no_grad():
        for rows in _batches(list(range(len(examples))), run.data.hyperparameters.batch_size):
            stats = _run_step(run, _rows(examples, rows), train=False)
            loss_total += stats.loss * stats.n_targets
            correct_total += stats.accuracy * stats.n_targets
            count_total += stats.n_targets
            for key, value in stats.extra.items():
                extra_total[key] = extra_total.get(key, 0.0) + value * stats.n_targets
    run.model.peft.train()
    return {
        "valid_loss": loss_total / max(count_total, 1),
        "valid_mean_token_accuracy": correct_total / max(count_total, 1),
        **{f"valid_{key}": value / max(count_total, 1) for key, value in extra_total.items()},
    }


def _pause_requested(run: TrainingRun) -> bool:
    asked = bool(run.spec.pause_file) and os.path.exists(str(run.spec.pause_file))
    if dist.world_size() == 1:
        return asked
    # Every rank must stop at the same step (or the others hang in the next collective).
    flag = torch.tensor([int(asked)], device=run.model.accelerator.device)
    return bool(dist.all_reduce(flag, op="max").item())


def _checkpoint(run: TrainingRun, kind: str, generator: torch.Generator, emit: Emit) -> Path | None:
    """Save the run's state at its position; emit a ``checkpoint`` event (None: disabled)."""
    if not run.spec.checkpoint_dir:
        return None
    state = run.state
    pos, step = state.position, state.position.step
    metrics = dict(state.step_metrics)
    info = {
        "step": step,
        "epoch": pos.epoch if pos.batch_index else pos.epoch - 1,
        "kind": kind,
        "fingerprint": run.model.fingerprint,
        "metrics": metrics,
    }
    saved = {
        "position": {
            "step": step,
            "epoch": pos.epoch,
            "batch_index": pos.batch_index,
            "order": pos.order,
            "generator_state": generator.get_state(),
        },
        "optimizer": dist.optimizer_state(run.optim.loss_module, run.optim.optimizer),
        "scheduler": run.optim.scheduler.state_dict(),
        "rng": ckpt.rng_state(),
        "metrics": dict(state.metrics),
    }
    if state.reference is not None:
        saved["dpo_reference"] = state.reference
    root = Path(run.spec.checkpoint_dir)
    # Gathering FSDP shards is a collective: every rank takes part, rank 0 writes.
    adapter_state = dist.adapter_state_dict(run.model.peft)
    state.last_checkpoint_step = step
    if not dist.is_main():
        dist.barrier()
        return None
    written = ckpt.save_checkpoint(
        root,
        model=run.model.peft,
        manifest=run.manifest(metrics, steps=step),
        info=info,
        state=saved,
        adapter_state=adapter_state,
    )
    dist.barrier()
    removed = ckpt.prune(root, run.spec.keep_checkpoints, step)
    emit(
        CheckpointEvent(
            kind=kind,
            step=step,
            epoch=written.epoch,
            path=str(written.path.resolve()),
            metrics=StepMetrics.model_validate(metrics),
            removed=[str(path.resolve()) for path in removed],
        )
    )
    return written.path


def _train_step(run: TrainingRun, chunk: list[Any], params: list[Any]) -> None:
    stats = _run_step(run, chunk, train=True)
    optim, state = run.optim, run.state
    run.model.accelerator.clip_grad_norm_(params, MAX_GRAD_NORM)
    optim.optimizer.step()
    optim.scheduler.step()
    optim.optimizer.zero_grad(set_to_none=True)
    state.step_metrics = {
        "train_loss": stats.loss,
        "train_mean_token_accuracy": stats.accuracy,
        **{f"train_{key}": value for key, value in stats.extra.items()},
    }
    state.metrics.update(state.step_metrics)


def _validate(run: TrainingRun, epoch_end: bool) -> None:
    """Add validation metrics for this step where due: sample periodically, full set at the end."""
    if not run.data.valid_set:
        return
    state, total = run.state, run.data.total_steps
    step, every = state.position.step, run.spec.eval_every
    if epoch_end or (every and step % every == 0) or step == total:
        state.step_metrics.update(evaluate(run))
    if step == total:
        full = evaluate(run, run.data.valid_set)
        state.step_metrics.update({f"full_{key}": value for key, value in full.items()})
    state.metrics.update(state.step_metrics)


def train_loop(run: TrainingRun, emit: Emit) -> str:
    """Phase 2: optimise from ``run.state.position`` to the end, or until a pause is requested.

    Emits a ``metrics`` event every ``spec.log_every`` steps, on the last step and whenever
    validation ran (``valid_*`` merged in; ``full_valid_*`` on the last step), a ``checkpoint``
    event after each epoch-end checkpoint, and, when pausing, the ``checkpoint`` of the pause.

    Args:
        run: the prepared (possibly resumed) run.
        emit: receives each event.

    Returns:
        ``"done"`` when every step ran, ``"paused"`` when the pause file stopped the run.
    """
    spec, data, state = run.spec, run.data, run.state
    hp, pos, total = data.hyperparameters, state.position, data.total_steps
    params = [p for p in run.model.peft.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(spec.seed)
    if pos.generator_state is not None:
        generator.set_state(pos.generator_state)
    if state.resume_rng is not None:
        ckpt.restore_rng(state.resume_rng)
    first_step, started = pos.step, time.monotonic()
    run.model.peft.train()
    while pos.epoch <= hp.n_epochs:
        if pos.order is None:
            pos.order = torch.randperm(len(data.train_set), generator=generator).tolist()
        batches = _batches(pos.order, hp.batch_size)
        while pos.batch_index < len(batches):
            if _pause_requested(run):
                if pos.step > 0 and pos.step != state.last_checkpoint_step:
                    _checkpoint(run, ckpt.PAUSE, generator, emit)
                return PAUSED
            _train_step(run, _rows(data.train_set, batches[pos.batch_index]), params)
            pos.step += 1
            pos.batch_index += 1
            _validate(run, epoch_end=pos.batch_index == len(batches))
            if "valid_loss" in state.step_metrics or pos.step % spec.log_every == 0 or pos.step == total:
                metrics = StepMetrics.model_validate(state.step_metrics)
                emit(MetricsEvent(step=pos.step, total_steps=total, epoch=pos.epoch, metrics=metrics))
        # The epoch checkpoint's position is the start of the next epoch (its order not drawn yet).
        pos.epoch, pos.batch_index, pos.order = pos.epoch + 1, 0, None
        _checkpoint(run, ckpt.EPOCH, generator, emit)
    logger.info(
        "trained steps %d-%d in %.2f s, final %s",
        first_step + 1,
        pos.step,
        time.monotonic() - started,
        state.metrics,
    )
    return DONE
