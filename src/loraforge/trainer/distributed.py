"""What the trainer needs to know and do when it runs as several processes (``accelerate launch``).

With one process every function here is a plain pass-through, so the single-device path has no
collective and no extra copy. Under FSDP the LoRA parameters are DTensor shards: the adapter and
optimizer state are gathered (a collective every rank joins) and only rank 0 writes files.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def world_size() -> int:
    """Processes in this run (1 when torch.distributed is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 when torch.distributed is not initialised)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on the process that writes metrics, checkpoints and the adapter."""
    return rank() == 0


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``sum`` or ``max``) across ranks; a no-op with one process.

    Args:
        tensor: the local value (on the process's device).
        op: ``sum`` or ``max``.

    Returns:
        ``tensor``, now holding the reduced value.
    """
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def barrier() -> None:
    """Wait for every rank (no-op with one process)."""
    if world_size() > 1:
        dist.barrier()


def adapter_state_dict(peft_model: Any) -> dict[str, torch.Tensor] | None:
    """The trainable (LoRA) parameters as full CPU tensors, or None with one process.

    Every rank must call this (gathering a DTensor is a collective); the result is only used on
    rank 0. None tells ``save_pretrained`` to read the model's own state dict.

    Args:
        peft_model: the PEFT model (its parameters may be FSDP shards).

    Returns:
        ``{name: tensor}`` keyed like ``peft_model.state_dict()``, or None.
    """
    if world_size() == 1:
        return None
    state = {}
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            full = param.full_tensor() if hasattr(param, "full_tensor") else param
            state[name] = full.detach().to("cpu", copy=True)
    return state


def optimizer_state(model: Any, optimizer: Any) -> dict[str, Any]:
    """The optimizer's state dict; under FSDP the full (gathered) one, on every rank's CPU.

    Args:
        model: the prepared module the optimizer's parameters belong to.
        optimizer: the (possibly accelerate-wrapped) optimizer.

    Returns:
        A state dict :func:`load_optimizer_state` accepts.
    """
    if world_size() == 1:
        state: dict[str, Any] = optimizer.state_dict()
        return state
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, inner, options=options)


def load_optimizer_state(model: Any, optimizer: Any, state: dict[str, Any]) -> None:
    """Put back what :func:`optimizer_state` returned (under FSDP each rank keeps its shard).

    Args:
        model: the prepared module.
        optimizer: the (possibly accelerate-wrapped) optimizer.
        state: the saved state dict.
    """
    if world_size() == 1:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    set_optimizer_state_dict(model, inner, state, options=StateDictOptions(full_state_dict=True))
