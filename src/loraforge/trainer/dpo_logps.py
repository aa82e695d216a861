"""Per-sequence log-probabilities of completions: DPO's forward, in micro-batches of whole pairs.

A DPO step needs, for each pair, ``log pi(chosen | prompt)`` and ``log pi(rejected | prompt)``:
the sums of the completion tokens' log-probabilities. Both sequences of a pair go into the same
micro-batch (the pair's loss needs both), in the order ``[chosen_0, rejected_0, chosen_1, ...]``,
laid out like supervised micro-batches (:mod:`loraforge.trainer.packing`: padding-free packed rows
with restarting positions, or padded rows). ``seq_index`` maps every position to its sequence
(-1 on padding and filler), and the per-token log-probabilities are summed per sequence.

:class:`SequenceLogps` is an ``nn.Module`` for the same reason as ``CausalLMLoss``: under FSDP it
is the module accelerate prepares. ``full`` mode takes the model's logits; ``chunked`` (CUDA)
gathers the labelled rows of the decoder's hidden states and runs the lm_head chunk by chunk under
activation checkpointing, so that at most one chunk's fp32 logits exist at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias
from torch import nn
from torch.utils.checkpoint import checkpoint

from loraforge.trainer.data import IGNORE_INDEX
from loraforge.trainer.dpo_data import PreferencePair
from loraforge.trainer.loss import CHUNK_ROWS
from loraforge.trainer.packing import MicroBatch, first_fit_decreasing, pack, pad, padded_groups

LogpsMode = Literal["full", "chunked"]


@dataclass
class PairBatch:
    """One micro-batch of whole pairs: the layout, each position's sequence, and the pairs."""

    micro: MicroBatch
    seq_index: torch.Tensor  # [rows, width] long: 2*k (chosen of pair k), 2*k+1 (rejected), -1
    pairs: list[PreferencePair]
    # Labelled positions of each sequence (chosen/rejected interleaved), for token accuracy.
    seq_targets: torch.Tensor

    def model_inputs(self, device: Any) -> dict[str, Any]:
        """The tensors :class:`SequenceLogps` takes, on ``device``."""
        return {
            **self.micro.model_inputs(device),
            "seq_index": self.seq_index.to(device, non_blocking=True),
            "n_seqs": 2 * len(self.pairs),
        }


def _seq_index(micro: MicroBatch, packed: bool) -> torch.Tensor:
    index = torch.full(micro.input_ids.shape, -1, dtype=torch.long)
    if packed:
        start = 0
        for seq, length in enumerate(micro.lengths):
            index[0, start : start + length] = seq
            start += length
    else:
        for seq, length in enumerate(micro.lengths):
            index[seq, :length] = seq
    return index


def pair_batch(
    pairs: list[PreferencePair], *, packed: bool, pad_token_id: int, pad_to_multiple: int | None
) -> PairBatch:
    """Lay out ``pairs`` as one micro-batch (chosen then rejected of each pair, in order).

    Args:
        pairs: the pairs of this micro-batch.
        packed: one padding-free row (True) or one padded row per sequence.
        pad_token_id: padding / filler token.
        pad_to_multiple: packed rows only (see :func:`loraforge.trainer.packing.pack`).

    Returns:
        The micro-batch.
    """
    docs = [side for pair in pairs for side in (pair.chosen, pair.rejected)]
    micro = (
        pack(docs, pad_token_id=pad_token_id, pad_to_multiple=pad_to_multiple)
        if packed
        else pad(docs, pad_token_id=pad_token_id)
    )
    # A sequence's targets are its labels shifted by one: as many as its labels less the first's.
    counts = [sum(1 for t in doc.labels[1:] if t != IGNORE_INDEX) for doc in docs]
    return PairBatch(
        micro=micro,
        seq_index=_seq_index(micro, packed),
        pairs=list(pairs),
        seq_targets=torch.tensor(counts, dtype=torch.long),
    )


def pair_micro_batches(
    pairs: list[PreferencePair],
    *,
    packing: bool,
    token_budget: int | None,
    pad_token_id: int,
    pad_to_multiple: int | None = None,
) -> list[PairBatch]:
    """Cut one step's pairs into micro-batches of whole pairs (first-fit on the pairs' tokens).

    Args:
        pairs: the step's pairs (this rank's share).
        packing: packed rows (True) or padded rows.
        token_budget: most tokens per micro-batch (padded: rows x width); None: one micro-batch.
        pad_token_id: the tokenizer's pad id.
        pad_to_multiple: packed rows only.

    Returns:
        The micro-batches (empty when ``pairs`` is).
    """
    if packing:
        groups = first_fit_decreasing([p.n_tokens for p in pairs], token_budget)
    else:
        # Two padded rows per pair, as wide as its longer side.
        widths = [max(len(p.chosen.input_ids), len(p.rejected.input_ids)) for p in pairs]
        groups = padded_groups([2 * w for w in widths], token_budget)
    return [
        pair_batch(
            [pairs[i] for i in sorted(group)],
            packed=packing,
            pad_token_id=pad_token_id,
            pad_to_multiple=pad_to_multiple,
        )
        for group in groups
    ]


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Logits in fp32 at least (bf16 under autocast; an fp64 model keeps fp64)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _logps_chunk(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Target log-probabilities and argmax hits of one chunk of rows (recomputed in backward)."""
    logits = _upcast(lm_head(hidden))
    logps = torch.log_softmax(logits, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
    return logps, logits.argmax(dim=-1) == targets


class SequenceLogps(nn.Module):
    """Wraps the (PEFT) causal LM: ``forward`` returns each sequence's summed completion log-prob.

    Args:
        model: the PEFT model.
        mode: ``full`` (logits of every position) or ``chunked`` (labelled rows only, lm_head in
            chunks).
        chunk_rows: rows per lm_head chunk.
    """

    def __init__(self, model: nn.Module, mode: LogpsMode = "full", chunk_rows: int = CHUNK_ROWS) -> None:
        super().__init__()
        self.model = model
        self.mode: LogpsMode = mode
        self.chunk_rows = chunk_rows

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        seq_index: torch.Tensor,
        n_seqs: int,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Summed target log-probabilities per sequence, argmax hits per sequence, and an anchor.

        Args:
            input_ids: ``[rows, width]``.
            targets: ``[rows, width]``, shifted per sequence, -100 outside completions.
            seq_index: ``[rows, width]`` sequence of each position (-1: none).
            n_seqs: sequences in the micro-batch.
            position_ids: packed rows' restarting positions.
            attention_mask: padded rows' mask.

        Returns:
            ``(logps [n_seqs] fp32 with grad, correct [n_seqs] long, anchor)``; ``anchor`` is a
            zero that depends on the forward (add it to the loss: a rank's filler micro-batch
            then still runs FSDP's backward collectives).
        """
        # use_cache=False: with a KV cache packed documents attend to each other (see packing).
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "use_cache": False,
        }
        flat_targets = targets.reshape(-1)
        rows = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)
        selected_targets = flat_targets.index_select(0, rows)
        seqs = seq_index.reshape(-1).index_select(0, rows)
        if self.mode == "full":
            logits = self.model(**inputs).logits
            anchor = logits.sum() * 0.0
            selected = _upcast(logits.reshape(-1, logits.shape[-1]).index_select(0, rows))
            token_logps = (
                torch.log_softmax(selected, dim=-1).gather(1, selected_targets.unsqueeze(1)).squeeze(1)
            )
            hits = selected.argmax(dim=-1) == selected_targets
        else:
            get_base = getattr(self.model, "get_base_model", None)
            causal_lm = get_base() if callable(get_base) else self.model
            hidden = causal_lm.get_decoder()(**inputs).last_hidden_state
            anchor = hidden.float().sum() * 0.0
            selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
            lm_head = causal_lm.get_output_embeddings()
            parts = [
                checkpoint(
                    _logps_chunk,
                    lm_head,
                    selected[start : start + self.chunk_rows],
                    selected_targets[start : start + self.chunk_rows],
                    use_reentrant=False,
                )
                for start in range(0, selected.shape[0], self.chunk_rows)
            ]
            token_logps = (
                torch.cat([p[0] for p in parts]) if parts else selected.new_zeros(0, dtype=torch.float32)
            )
            hits = (
                torch.cat([p[1] for p in parts])
                if parts
                else torch.zeros(0, dtype=torch.bool, device=rows.device)
            )
        logps = token_logps.new_zeros(n_seqs).index_add(0, seqs, token_logps)
        correct = torch.zeros(n_seqs, dtype=torch.long, device=input_ids.device).index_add(
            0, seqs, hits.long()
        )
        return logps, correct, anchor


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's sigmoid loss per pair and the implicit rewards (TRL's ``loss_type="sigmoid"``).

    ``loss = -log sigmoid(beta * ((log pi_c - log ref_c) - (log pi_r - log ref_r)))``, rewards
    ``beta * (log pi - log ref)`` (detached).

    Args:
        chosen_logps: policy log-probs of the chosen completions ``[n]``.
        rejected_logps: of the rejected ones.
        ref_chosen_logps: the reference's, chosen.
        ref_rejected_logps: the reference's, rejected.
        beta: DPO's beta.

    Returns:
        ``(losses [n], chosen_rewards [n], rejected_rewards [n])``.
    """
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
