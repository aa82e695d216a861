"""The training loss: summed next-token cross-entropy over labelled positions, and argmax hits.

Three ways to compute the same sum (``TrainPlan.loss``):

* ``full``: the model's logits for every position, upcast to fp32, then cross-entropy (the
  CPU path; with packing the same sums as the padded batches it replaced, up to rounding).
* ``chunked``: the decoder's hidden states, only the labelled rows gathered, then the lm_head and
  cross-entropy chunk by chunk (``CHUNK_ROWS`` rows), each chunk under activation checkpointing.
  With a 128k vocabulary the logits are the largest activation of a step (fp32, 0.5 MB per
  token); this way at most one chunk's logits exist at a time, in forward and in backward.
* ``fused``: Liger's fused linear cross-entropy kernel (CUDA, one process, Liger usable: a real
  import, ``trainer/kernels.py``, the check ``device_setup`` shares; not ``LORAFORGE_KERNELS=torch``);
  the maintained kernel when it works, the chunked path otherwise.

``auto`` is ``full`` on CPU and ``fused``/``chunked`` on CUDA.

:class:`CausalLMLoss` is an ``nn.Module`` on purpose: under FSDP it is the module accelerate
prepares (the root), so the lm_head it calls directly is gathered like any other root parameter.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias
from torch import nn
from torch.utils.checkpoint import checkpoint

from loraforge.contracts.trainer_launch import requested_kernels
from loraforge.trainer.data import IGNORE_INDEX
from loraforge.trainer.kernels import liger_usable

LossMode = Literal["full", "chunked", "fused"]
# Rows of hidden states per lm_head chunk: 4096 x 128,256 fp32 logits = 2.1 GB, small next to an
# 8B step's activations, and large enough that the lm_head matmul runs at full speed.
CHUNK_ROWS = 4096


def resolve_loss_mode(
    requested: str, device_type: str, world_size: int = 1, kernels: str | None = None
) -> LossMode:
    """The loss computation a run uses.

    Args:
        requested: ``TrainPlan.loss`` (``auto``, ``chunked`` or ``full``).
        device_type: ``cpu`` or ``cuda``.
        world_size: processes in the run (the fused kernel reads the lm_head weight directly,
            which under FSDP is a shard outside the root's forward: one process only).
        kernels: ``auto``/``liger``/``torch``; None reads ``$LORAFORGE_KERNELS``. ``torch``
            means no Liger anywhere, so no fused loss either.

    Returns:
        ``full``, ``chunked`` or ``fused``.

    Raises:
        ValueError: an unknown ``kernels`` choice.
    """
    if requested == "full" or (requested == "auto" and device_type != "cuda"):
        return "full"
    fused_allowed = requested_kernels(kernels) != "torch" and world_size == 1
    if device_type == "cuda" and fused_allowed and liger_usable():
        return "fused"
    return "chunked"


def _ce_chunk(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Summed CE and argmax hits of one chunk of rows (recomputed in backward, never stored)."""
    logits = lm_head(hidden).float()
    loss = F.cross_entropy(logits, targets, reduction="sum")
    correct = (logits.argmax(dim=-1) == targets).sum()
    return loss, correct


def chunked_linear_cross_entropy(
    lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_rows: int = CHUNK_ROWS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of ``lm_head(hidden)`` against ``targets``, chunk by chunk.

    Args:
        lm_head: the output projection (any module: a LoRA-wrapped head works too).
        hidden: ``[n, hidden_size]`` rows, all labelled (gather them first).
        targets: ``[n]`` target ids.
        chunk_rows: rows per chunk.

    Returns:
        ``(loss_sum, correct)``: fp32 scalar with grad, and the number of argmax hits.
    """
    loss = hidden.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_rows):
        part_loss, part_correct = checkpoint(
            _ce_chunk,
            lm_head,
            hidden[start : start + chunk_rows],
            targets[start : start + chunk_rows],
            use_reentrant=False,
        )
        loss = loss + part_loss
        correct = correct + part_correct
    return loss, correct


class _FusedCE:
    """Liger's ``LigerFusedLinearCrossEntropyLoss`` with ``reduction="sum"``, across its versions."""

    def __init__(self) -> None:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        params = inspect.signature(LigerFusedLinearCrossEntropyLoss.__init__).parameters
        # Newer releases count argmax hits inside the kernel; older ones need a pass of our own.
        self.kernel_accuracy = "return_token_accuracy" in params
        kwargs: dict[str, Any] = {"reduction": "sum", "ignore_index": IGNORE_INDEX}
        if self.kernel_accuracy:
            kwargs["return_token_accuracy"] = True
        self.loss = LigerFusedLinearCrossEntropyLoss(**kwargs)

    def __call__(
        self, lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out: Any = self.loss(lm_head.weight, hidden, targets)
        accuracy: Any = None
        if isinstance(out, torch.Tensor):
            loss = out
        else:  # a CrossEntropyOutput (newer releases) or a tuple (loss first)
            loss = out.loss if getattr(out, "loss", None) is not None else out[0]
            accuracy = getattr(out, "token_accuracy", None)
        if accuracy is not None:
            correct = (accuracy.detach().float() * targets.numel()).round().long()
        else:
            with torch.no_grad():
                correct = torch.zeros((), dtype=torch.long, device=hidden.device)
                for start in range(0, hidden.shape[0], CHUNK_ROWS):
                    rows = slice(start, start + CHUNK_ROWS)
                    correct += (lm_head(hidden[rows]).argmax(dim=-1) == targets[rows]).sum()
        return loss.float(), correct


class CausalLMLoss(nn.Module):
    """Wraps the (PEFT) causal LM: ``forward`` returns ``(loss_sum, correct)`` for one micro-batch.

    Args:
        model: the PEFT model (or a plain causal LM).
        mode: ``full``, ``chunked`` or ``fused`` (see the module docstring).
        chunk_rows: rows per lm_head chunk (``chunked``).
    """

    def __init__(self, model: nn.Module, mode: LossMode = "full", chunk_rows: int = CHUNK_ROWS) -> None:
        super().__init__()
        self.model = model
        self.mode: LossMode = mode
        self.chunk_rows = chunk_rows
        self._fused = _FusedCE() if mode == "fused" else None

    def _causal_lm(self) -> Any:
        get_base = getattr(self.model, "get_base_model", None)
        return get_base() if callable(get_base) else self.model

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed CE over positions whose target is not -100, and how many argmax hits.

        Args:
            input_ids: ``[rows, width]``.
            targets: ``[rows, width]`` next-token targets (already shifted per document).
            position_ids: packed rows' restarting positions (None for padded rows).
            attention_mask: padded rows' mask (None for packed rows).

        Returns:
            ``(loss_sum, correct)``: fp32 scalar with grad, long scalar.
        """
        # use_cache=False: with a KV cache transformers ignores the position-id restarts and
        # packed documents attend to each other (FACTS_GPU: "a silent trap").
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "use_cache": False,
        }
        if self.mode == "full":
            logits = self.model(**inputs).logits
            # The row's last position never has a target, so dropping it changes nothing; it
            # keeps this the exact computation the trainer always did on CPU.
            logits = logits[:, :-1, :].float()
            shifted = targets[:, :-1]
            loss = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)),
                shifted.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            correct = ((logits.argmax(dim=-1) == shifted) & (shifted != IGNORE_INDEX)).sum()
            return loss, correct
        causal_lm = self._causal_lm()
        hidden = causal_lm.get_decoder()(**inputs).last_hidden_state
        flat_targets = targets.reshape(-1)
        rows = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)
        if rows.numel() == 0:
            # Nothing labelled (e.g. a rank's filler micro-batch under FSDP): a zero that still
            # depends on the forward, so every rank runs the same backward collectives.
            return hidden.float().sum() * 0.0, torch.zeros((), dtype=torch.long, device=hidden.device)
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
        selected_targets = flat_targets.index_select(0, rows)
        lm_head = causal_lm.get_output_embeddings()
        if self._fused is not None:
            return self._fused(lm_head, selected, selected_targets)
        return chunked_linear_cross_entropy(lm_head, selected, selected_targets, self.chunk_rows)
