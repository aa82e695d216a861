"""Checkpoints: a servable adapter directory plus everything needed to continue training exactly.

::

    step-0000042/
        adapter_config.json, adapter_model.safetensors, manifest.json   (a valid adapter dir)
        checkpoint.json     step, epoch, kind ("epoch" | "pause"), fingerprint, metrics
        trainer_state.pt    optimizer, scheduler, data-order position, RNG states

One format serves crash recovery, pause/resume and checkpoint models. A checkpoint is written to a
hidden ``.step-….partial-*`` sibling and renamed, so a ``step-*`` directory is always complete.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraforge.adapters.format import REQUIRED_FILES, AdapterManifest, write_manifest

logger = logging.getLogger(__name__)

CHECKPOINT_INFO = "checkpoint.json"
TRAINER_STATE = "trainer_state.pt"
PREFIX = "step-"
EPOCH = "epoch"
PAUSE = "pause"


@dataclass
class Position:
    """Where a run is in its data: the next batch it will train on."""

    step: int = 0  # optimizer steps done
    epoch: int = 1  # epoch (1-based) of the next batch
    batch_index: int = 0  # index of the next batch within that epoch
    order: list[int] | None = None  # that epoch's example order; None: not drawn yet
    generator_state: Any = None  # data-order generator state right after drawing ``order``


@dataclass(frozen=True)
class CheckpointInfo:
    """What ``checkpoint.json`` says about one complete checkpoint directory."""

    path: Path
    step: int
    epoch: int
    kind: str
    fingerprint: str
    metrics: dict[str, float] = field(default_factory=dict)


def dir_name(step: int) -> str:
    """The directory name of the checkpoint at ``step`` (zero-padded so names sort by step)."""
    return f"{PREFIX}{step:07d}"


def _read_info(path: Path) -> CheckpointInfo | None:
    needed = (*REQUIRED_FILES, CHECKPOINT_INFO, TRAINER_STATE)
    if not all((path / name).is_file() for name in needed):
        return None
    try:
        raw = json.loads((path / CHECKPOINT_INFO).read_text())
        return CheckpointInfo(
            path=path,
            step=int(raw["step"]),
            epoch=int(raw["epoch"]),
            kind=str(raw["kind"]),
            fingerprint=str(raw["fingerprint"]),
            metrics=dict(raw.get("metrics") or {}),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def list_checkpoints(root: Path) -> list[CheckpointInfo]:
    """The complete checkpoints under ``root``, oldest step first (partial ones are skipped).

    Args:
        root: the run's checkpoint directory (may not exist yet).

    Returns:
        One entry per complete ``step-*`` directory.
    """
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith(PREFIX):
            info = _read_info(path)
            if info is not None:
                found.append(info)
    return sorted(found, key=lambda info: info.step)


def latest_checkpoint(root: Path, fingerprint: str) -> CheckpointInfo | None:
    """The newest complete checkpoint of a run with this fingerprint, if any.

    Args:
        root: the run's checkpoint directory.
        fingerprint: :meth:`TrainSpec.fingerprint` of the run that wants to resume.

    Returns:
        The checkpoint to resume from, or None to start from the beginning.
    """
    matching = [info for info in list_checkpoints(root) if info.fingerprint == fingerprint]
    ignored = len(list_checkpoints(root)) - len(matching)
    if ignored:
        logger.warning("ignoring %d checkpoint(s) in %s written by a different spec", ignored, root)
    return matching[-1] if matching else None


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from (dropout uses torch's global generator)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python": random.getstate(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` (a re-run) is moved aside first and removed
    after, so ``final`` is never half-written."""
    if final.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        final.rename(trash / final.name)
        tmp.rename(final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(final)


def save_checkpoint(
    root: Path,
    *,
    model: Any,
    manifest: AdapterManifest,
    info: dict[str, Any],
    state: dict[str, Any],
    adapter_state: dict[str, Any] | None = None,
) -> CheckpointInfo:
    """Write one checkpoint atomically.

    Args:
        root: the run's checkpoint directory (created if missing).
        model: the unwrapped PEFT model (its adapter is saved).
        manifest: the adapter manifest for this checkpoint (metrics and steps so far).
        info: ``step``, ``epoch``, ``kind``, ``fingerprint``, ``metrics`` for ``checkpoint.json``.
        state: optimizer/scheduler state, :class:`Position` fields and RNG states.
        adapter_state: the LoRA weights when the model's own are FSDP shards (gathered by
            :func:`loraforge.trainer.distributed.adapter_state_dict`); None: the model's.

    Returns:
        The checkpoint written.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / dir_name(int(info["step"]))
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=root))
    try:
        model.save_pretrained(tmp, state_dict=adapter_state)
        (tmp / "README.md").unlink(missing_ok=True)
        write_manifest(tmp, manifest)
        torch.save(state, tmp / TRAINER_STATE)
        (tmp / CHECKPOINT_INFO).write_text(json.dumps(info, indent=2))
        # mkdtemp creates 0700 entries; the engine may serve checkpoints as another user.
        tmp.chmod(0o755)
        for path in tmp.iterdir():
            path.chmod(0o644)
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    written = _read_info(final)
    assert written is not None, f"checkpoint {final} is incomplete right after writing it"
    return written


def load_training_state(info: CheckpointInfo) -> dict[str, Any]:
    """Read ``trainer_state.pt`` (our own file: full unpickling is intended)."""
    state: dict[str, Any] = torch.load(info.path / TRAINER_STATE, map_location="cpu", weights_only=False)
    return state


def _discard(path: Path) -> None:
    """Delete a checkpoint directory so that no half-deleted ``step-*`` directory is ever seen.

    It is first renamed to a hidden sibling (atomic), then removed: a trainer killed in between
    leaves a hidden leftover that the next :func:`prune` removes, never a ``step-*`` directory that
    is no longer a checkpoint yet still looks like one to the worker, whose checkpoint row then
    outlived pruning (the row stays while the directory exists).
    """
    trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.trash-", dir=path.parent))
    path.rename(trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)


def prune(root: Path, keep: int, newest_step: int) -> list[Path]:
    """Keep the newest ``keep`` epoch checkpoints; drop pause checkpoints older than the newest one.

    Also removes temp directories left by a run that was killed while writing or deleting, and
    ``step-*`` directories that are not complete checkpoints (a deletion interrupted before
    deletions went through :func:`_discard`): nothing but this run's trainer writes here.

    Args:
        root: the run's checkpoint directory.
        keep: how many epoch-end checkpoints to keep.
        newest_step: the step of the checkpoint just written.

    Returns:
        The checkpoint directories removed.
    """
    removed = []
    checkpoints = list_checkpoints(root)
    epochs = [info for info in checkpoints if info.kind == EPOCH]
    doomed = [info.path for info in (epochs[:-keep] if len(epochs) > keep else [])]
    doomed += [info.path for info in checkpoints if info.kind == PAUSE and info.step < newest_step]
    complete = {info.path for info in checkpoints}
    doomed += [
        path
        for path in sorted(root.glob(f"{PREFIX}*"))
        if path.is_dir() and path not in complete and path.name != dir_name(newest_step)
    ]
    for path in doomed:
        _discard(path)
        removed.append(path)
    for leftover in root.glob(f".{PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return removed
