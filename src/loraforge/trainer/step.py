"""One optimizer step's forward/backward over its micro-batches (shared by the loop and the bench).

The step's loss is the mean cross-entropy over all its labelled tokens. Each micro-batch's summed
loss is divided by the step's (global) labelled-token count before its backward, so the gradients
accumulated over the micro-batches are exactly those of the whole step at once: packed, padded,
one micro-batch or many give the same loss and gradient up to float rounding.

Several processes (``accelerate launch``): each rank has its own share of the step's examples;
DDP/FSDP average gradients over ranks, so the local loss is scaled by ``world / global_count``.
Every rank runs the same number of micro-batches (collectives in FSDP's forward and backward must
pair up): a rank with fewer runs filler micro-batches that contribute zero.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from loraforge.trainer import distributed as dist
from loraforge.trainer.data import IGNORE_INDEX
from loraforge.trainer.packing import MicroBatch


@dataclass(frozen=True)
class StepStats:
    """A step's (global) loss, accuracy, labelled tokens and real tokens.

    A DPO step (:mod:`loraforge.trainer.dpo`) counts pairs in ``n_targets`` and reports its
    rewards in ``extra``.
    """

    loss: float
    accuracy: float
    n_targets: int
    n_tokens: int
    extra: dict[str, float] = field(default_factory=dict)


def autocast(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` to ``dtype`` on ``device_type``, or a no-op when ``dtype`` is None.

    Args:
        device_type: ``cpu`` or ``cuda``.
        dtype: the compute dtype (bf16 on CUDA with a bf16 base), or None for no autocast.

    Returns:
        A context manager.
    """
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def _filler(pad_token_id: int) -> MicroBatch:
    """A one-token micro-batch with no target (keeps ranks' collectives paired)."""
    return MicroBatch(
        input_ids=torch.tensor([[pad_token_id]], dtype=torch.long),
        targets=torch.tensor([[IGNORE_INDEX]], dtype=torch.long),
        position_ids=torch.tensor([[0]], dtype=torch.long),
        attention_mask=None,
        lengths=[],
        n_targets=0,
    )


def forward_backward(
    loss_module: Any,
    micro_batches: list[MicroBatch],
    *,
    device: torch.device,
    backward: Callable[[torch.Tensor], None] | None,
    compute_dtype: torch.dtype | None = None,
    pad_token_id: int = 0,
) -> StepStats:
    """Run the step's micro-batches; with ``backward`` accumulate the step's mean-loss gradient.

    Args:
        loss_module: a :class:`~loraforge.trainer.loss.CausalLMLoss` (possibly accelerate-prepared).
        micro_batches: this rank's micro-batches of the step.
        device: where the tensors go.
        backward: called with each micro-batch's scaled loss (``accelerator.backward`` or
            ``Tensor.backward``); None for evaluation (call under ``torch.no_grad()``).
        compute_dtype: autocast dtype (None: none).
        pad_token_id: token of filler micro-batches.

    Returns:
        The step's statistics over all ranks.
    """
    world = dist.world_size()
    local = torch.tensor(
        [sum(mb.n_targets for mb in micro_batches), sum(mb.n_tokens for mb in micro_batches)],
        dtype=torch.float64,
        device=device,
    )
    counts = dist.all_reduce(local.clone())
    n_steps = torch.tensor([len(micro_batches)], dtype=torch.long, device=device)
    n_micro = int(dist.all_reduce(n_steps, op="max").item()) if world > 1 else len(micro_batches)
    global_targets = int(counts[0].item())
    # DDP/FSDP average over ranks; multiplying by world turns that average into the global sum.
    scale = world / max(global_targets, 1)
    loss_total = torch.zeros((), dtype=torch.float32, device=device)
    correct_total = torch.zeros((), dtype=torch.long, device=device)
    for i in range(n_micro):
        mb = micro_batches[i] if i < len(micro_batches) else _filler(pad_token_id)
        with autocast(device.type, compute_dtype):
            loss_sum, correct = loss_module(**mb.model_inputs(device))
        if backward is not None:
            backward(loss_sum * scale)
        # Accumulated on the device: one host sync per step, not one per micro-batch.
        loss_total += loss_sum.detach().float()
        correct_total += correct
    totals = dist.all_reduce(torch.stack([loss_total.double(), correct_total.double()]))
    denominator = max(global_targets, 1)
    return StepStats(
        loss=float(totals[0].item()) / denominator,
        accuracy=float(totals[1].item()) / denominator,
        n_targets=global_targets,
        n_tokens=int(counts[1].item()),
    )
