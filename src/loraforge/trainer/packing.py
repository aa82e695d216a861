"""A step's examples as micro-batches: padding-free packed rows, or padded rows (the old layout).

OpenAI's ``batch_size`` is examples per optimizer step. The step's examples are split into
micro-batches of at most ``token_budget`` real tokens (None: all of them in one micro-batch); the
loop accumulates gradients over them and normalises by the step's labelled tokens, so how a step
is cut into micro-batches never changes its loss or its gradient (up to float rounding).

Packed layout: one row per micro-batch, the documents concatenated with no padding,
``position_ids`` restarting at 0 for each document and no ``attention_mask``. transformers turns the
restarts into a per-document causal mask (``masking_utils.find_packed_sequence_indices``) for
sdpa, eager and flex_attention, but only when no KV cache is built: the forward must get
``use_cache=False`` (with a cache it silently attends across documents; a test pins this).

Targets are shifted per document (``targets[i]`` is the label of token ``i + 1`` of the same
document, -100 at each document's last token), so no document's first token is ever the target
of the previous document's last token, whatever the layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loraforge.trainer.data import IGNORE_INDEX, TokenizedExample

if TYPE_CHECKING:
    import torch


@dataclass
class MicroBatch:
    """One forward/backward's inputs; ``targets`` are already shifted (see the module docstring)."""

    input_ids: torch.Tensor  # [rows, width]
    targets: torch.Tensor  # [rows, width], -100 where no loss is taken
    position_ids: torch.Tensor | None  # packed: restarting per document; padded: None (0..n-1)
    attention_mask: torch.Tensor | None  # padded: 1 on real tokens; packed: None
    lengths: list[int] = field(default_factory=list)  # real documents' token counts
    n_targets: int = 0  # labelled positions (the loss's denominator contribution)

    @property
    def n_tokens(self) -> int:
        """Real (non-padding, non-filler) tokens."""
        return sum(self.lengths)

    def model_inputs(self, device: Any) -> dict[str, torch.Tensor]:
        """The tensors the loss module takes, moved to ``device``.

        Args:
            device: target device.

        Returns:
            ``input_ids``, ``targets`` and, where set, ``position_ids`` / ``attention_mask``.
        """
        out = {"input_ids": self.input_ids, "targets": self.targets}
        if self.position_ids is not None:
            out["position_ids"] = self.position_ids
        if self.attention_mask is not None:
            out["attention_mask"] = self.attention_mask
        return {key: value.to(device, non_blocking=True) for key, value in out.items()}


def shifted_targets(labels: list[int]) -> list[int]:
    """Next-token targets within one document: ``labels[1:] + [-100]``.

    Args:
        labels: the document's labels (-100 where no loss is taken).

    Returns:
        A list as long as ``labels``.
    """
    return [*labels[1:], IGNORE_INDEX] if labels else []


def first_fit_decreasing(lengths: list[int], budget: int | None) -> list[list[int]]:
    """Bin-pack document indices into groups of at most ``budget`` tokens.

    Longest first, each into the first group it fits (a document longer than the budget gets a
    group of its own); within a group the indices stay in ascending order, so the layout is
    deterministic. ``budget=None`` gives one group with every index in order.

    Args:
        lengths: token count per document.
        budget: most tokens per group, or None.

    Returns:
        The groups, as lists of indices into ``lengths``.
    """
    if budget is None:
        return [list(range(len(lengths)))] if lengths else []
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for g, free in enumerate(room):
            if lengths[i] <= free:
                groups[g].append(i)
                room[g] -= lengths[i]
                break
        else:
            groups.append([i])
            room.append(budget - lengths[i])
    return [sorted(group) for group in groups]


def padded_groups(lengths: list[int], budget: int | None) -> list[list[int]]:
    """Group documents for padded micro-batches: rows x longest row <= ``budget``.

    Sorted by length so that each group pads little; ``budget=None`` keeps the old behaviour (the
    whole step in one padded batch, in the step's order).

    Args:
        lengths: token count per document.
        budget: most padded tokens (rows x width) per group, or None.

    Returns:
        The groups, as lists of indices into ``lengths``.
    """
    if budget is None:
        return [list(range(len(lengths)))] if lengths else []
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        # Sorted longest first, so a group's first document sets its width.
        if groups and lengths[groups[-1][0]] * (len(groups[-1]) + 1) <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def pack(
    examples: list[TokenizedExample], *, pad_token_id: int = 0, pad_to_multiple: int | None = None
) -> MicroBatch:
    """Concatenate documents into one padding-free row.

    Args:
        examples: the documents of this micro-batch.
        pad_token_id: token of the filler document (only with ``pad_to_multiple``).
        pad_to_multiple: round the row up to a multiple of this with a filler document of its own
            (no targets, its own restarting positions, so nothing attends to it); fewer distinct
            shapes for compiled kernels and flex_attention's 128-token blocks. None: no filler.

    Returns:
        The packed micro-batch (``[1, total]`` tensors).
    """
    import torch

    ids: list[int] = []
    targets: list[int] = []
    positions: list[int] = []
    for ex in examples:
        ids += ex.input_ids
        targets += shifted_targets(ex.labels)
        positions += range(len(ex.input_ids))
    if pad_to_multiple and len(ids) % pad_to_multiple:
        filler = pad_to_multiple - len(ids) % pad_to_multiple
        ids += [pad_token_id] * filler
        targets += [IGNORE_INDEX] * filler
        positions += range(filler)
    return MicroBatch(
        input_ids=torch.tensor([ids], dtype=torch.long),
        targets=torch.tensor([targets], dtype=torch.long),
        position_ids=torch.tensor([positions], dtype=torch.long),
        attention_mask=None,
        lengths=[len(ex.input_ids) for ex in examples],
        n_targets=sum(1 for t in targets if t != IGNORE_INDEX),
    )


def pad(examples: list[TokenizedExample], *, pad_token_id: int) -> MicroBatch:
    """Right-pad documents into rows (``attention_mask`` marks real tokens), targets shifted per row.

    Args:
        examples: the documents of this micro-batch.
        pad_token_id: id written into padding positions.

    Returns:
        The padded micro-batch (``[len(examples), longest]`` tensors).
    """
    import torch

    width = max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    n_targets = 0
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        shifted = shifted_targets(ex.labels)
        input_ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        targets[row, :n] = torch.tensor(shifted, dtype=torch.long)
        attention_mask[row, :n] = 1
        n_targets += sum(1 for t in shifted if t != IGNORE_INDEX)
    return MicroBatch(
        input_ids=input_ids,
        targets=targets,
        position_ids=None,
        attention_mask=attention_mask,
        lengths=[len(ex.input_ids) for ex in examples],
        n_targets=n_targets,
    )


def shard_for_rank(examples: list[TokenizedExample], rank: int, world: int) -> list[TokenizedExample]:
    """This rank's share of a step's examples: longest first, dealt round-robin (balanced tokens).

    Args:
        examples: the whole step's examples.
        rank: this process's rank.
        world: number of processes.

    Returns:
        The examples this rank trains on (all of them, in order, when ``world == 1``).
    """
    if world <= 1:
        return list(examples)
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    return [examples[i] for i in sorted(order[rank::world])]


def step_micro_batches(
    examples: list[TokenizedExample],
    *,
    packing: bool,
    token_budget: int | None,
    pad_token_id: int,
    pad_to_multiple: int | None = None,
) -> list[MicroBatch]:
    """Cut one step's examples into micro-batches.

    Args:
        examples: the step's examples (this rank's share of them).
        packing: padding-free packed rows (True) or padded rows (False).
        token_budget: most tokens per micro-batch (packed: real tokens; padded: rows x width);
            None: one micro-batch.
        pad_token_id: the tokenizer's pad id (padding / filler).
        pad_to_multiple: packed rows only; see :func:`pack`.

    Returns:
        The micro-batches (empty when ``examples`` is).
    """
    lengths = [len(ex.input_ids) for ex in examples]
    if packing:
        return [
            pack([examples[i] for i in group], pad_token_id=pad_token_id, pad_to_multiple=pad_to_multiple)
            for group in first_fit_decreasing(lengths, token_budget)
        ]
    return [
        pad([examples[i] for i in group], pad_token_id=pad_token_id)
        for group in padded_groups(lengths, token_budget)
    ]
