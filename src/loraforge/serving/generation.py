"""Generation plumbing for the engine: request/result types and one batched ``generate`` (torch).

A batch is left-padded and run with one ``model.generate`` call; :class:`RowStopper` is the only
stopping rule, evaluated per row after every step: the row's own eos ids, stop strings, token
budget and cancel flag. It also collects each row's tokens (and streams them), so rows that
finished early are cut exactly where they would have stopped alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from loraforge.serving.batching import END, CancelledRow, Pending
from loraforge.serving.chat import find_stop
from loraforge.serving.grouped_lora import BASE_ROW, GroupedLora


@dataclass(frozen=True)
class GenerationResult:
    """One finished completion. ``token_ids`` are all generated ids (the stop token included)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    """A tokenised, validated request, ready for ``Engine.run`` / ``Engine.run_stream``."""

    model: str
    adapter: str | None  # None: the bare base model
    input_ids: tuple[int, ...]
    max_new_tokens: int
    eos_ids: tuple[int, ...]
    stop: tuple[str, ...]
    temperature: float
    top_p: float
    seed: int | None
    # Tool calling: the syntax of the template that rendered the prompt (None: no tools offered)
    # and the call prefix the prompt ends with (the completion continues it).
    tool_format: str | None = None
    prefill: str = ""

    @property
    def greedy(self) -> bool:
        """``temperature == 0`` (or ``top_p == 0``) means greedy decoding."""
        return self.temperature <= 0 or self.top_p <= 0

    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys can share a ``generate`` call (same decoding settings).

        A seeded request gets a key of its own: its samples must not depend on its batch mates.
        """
        if self.greedy:
            return ("greedy",)
        if self.seed is not None:
            return ("seeded", object())
        return ("sample", self.temperature, self.top_p)


def batch_generation_config(
    requests: Sequence[GenerationRequest], pad_token_id: int | None
) -> GenerationConfig:
    """One complete ``GenerationConfig`` for a batch of same-key requests.

    ``eos_token_id`` is the set of ids *every* row stops on, never None: None would pull in the
    model's own defaults, and the per-row stop sets are enforced by :class:`RowStopper` anyway.
    """
    first = requests[0]
    # top_k=0: OpenAI semantics, no top-k cut (transformers would default to 50).
    sampling = {} if first.greedy else {"temperature": first.temperature, "top_p": first.top_p, "top_k": 0}
    common = set(first.eos_ids).intersection(*(r.eos_ids for r in requests[1:]))
    return GenerationConfig(
        max_new_tokens=max(r.max_new_tokens for r in requests),
        do_sample=not first.greedy,
        eos_token_id=sorted(common),
        pad_token_id=pad_token_id,
        **sampling,
    )


def finish(
    request: GenerationRequest, ids: list[int], text: str, cancelled: bool = False
) -> GenerationResult:
    """Cut ``text`` (the decoded ``ids``) at the first stop string and name the finish reason."""
    cut = find_stop(text, request.stop)
    if cut is not None:
        text, reason = text[:cut], "stop"
    elif ids and ids[-1] in request.eos_ids:
        reason = "stop"
    elif len(ids) >= request.max_new_tokens and not cancelled:
        reason = "length"
    else:
        reason = "stop"  # cancelled
    return GenerationResult(text, len(request.input_ids), len(ids), reason, tuple(ids))


class RowStopper(StoppingCriteria):
    """Per-row stopping for a batch, and the collector of each row's generated tokens.

    Called by ``generate`` after each new column of tokens; a row is done after its eos token,
    its budget, a stop string in its decoded text, or its cancel flag. A done row is resolved at
    once (its caller need not wait for the longest row of the batch); tokens it produces after
    that, while the batch runs on for others, are ignored.
    """

    def __init__(self, rows: Sequence[Pending], decode: Callable[[Sequence[int]], str]) -> None:
        self.rows = list(rows)
        self.ids: list[list[int]] = [[] for _ in self.rows]
        self.done = [False] * len(self.rows)
        self.cancelled = [False] * len(self.rows)
        self._decode = decode

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        column = input_ids[:, -1].tolist()
        for i, row in enumerate(self.rows):
            if self.done[i]:
                continue
            request: GenerationRequest = row.request
            token = int(column[i])
            self.ids[i].append(token)
            if row.sink is not None:
                row.sink.put([token])
            if row.cancel.is_set():
                self.done[i] = self.cancelled[i] = True
            elif token in request.eos_ids or len(self.ids[i]) >= request.max_new_tokens:
                self.done[i] = True
            elif request.stop and find_stop(self._decode(self.ids[i]), request.stop) is not None:
                self.done[i] = True
            if self.done[i]:
                self.resolve(i)
        flags = torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)
        return cast(torch.BoolTensor, flags)

    def resolve(self, i: int) -> None:
        """Hand row ``i`` its result (a no-op if it already has one)."""
        row, ids = self.rows[i], self.ids[i]
        if not row.result.done():
            row.succeed(finish(row.request, ids, self._decode(ids), cancelled=self.cancelled[i]))


def left_pad(rows: Sequence[Pending], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` for the rows' prompts, padded on the left."""
    prompts = [row.request.input_ids for row in rows]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[i, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def generate_batch(
    model: Any,
    rows: Sequence[Pending],
    *,
    pad_token_id: int,
    device: torch.device,
    decode: Callable[[Sequence[int]], str],
    adapter_names: list[str] | None,
) -> RowStopper:
    """Run one ``generate`` for ``rows`` (same batch key) and return the per-row tokens.

    Args:
        model: the (PEFT-wrapped or bare) model, with the right adapter already active when
            ``adapter_names`` is None.
        rows: the batch.
        pad_token_id: left-padding id.
        device: where the model lives.
        decode: ids -> text (stop strings).
        adapter_names: PEFT adapter per row (``__base__`` for none) for a mixed batch, else None.

    Returns:
        The stopper: ``ids[i]`` and ``cancelled[i]`` for each row.
    """
    requests = [row.request for row in rows]
    config = batch_generation_config(requests, pad_token_id)
    stopper = RowStopper(rows, decode)
    input_ids, attention_mask = left_pad(rows, pad_token_id, device)
    extra = {} if adapter_names is None else {"adapter_names": adapter_names}
    with torch.inference_mode():
        if requests[0].seed is not None:
            torch.manual_seed(requests[0].seed)
        model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            stopping_criteria=StoppingCriteriaList([stopper]),
            **extra,
        )
    return stopper


def generate_rows(
    model: Any,
    rows: Sequence[Pending],
    keys: list[str],
    *,
    peft: bool,
    grouped: GroupedLora | None,
    pad_token_id: int,
    device: torch.device,
    decode: Callable[[Sequence[int]], str],
) -> RowStopper:
    """Run ``rows`` with the right adapters: ``keys[i]`` is row i's PEFT adapter (or ``__base__``).

    With ``grouped``, every batch (mixed, one adapter, or all base) runs through the slot-stacked
    LoRA path, whose cost does not grow with the number of distinct adapters. Without it (or for
    an adapter it cannot serve) PEFT's own paths run: a uniform batch with its adapter active (or
    all adapters disabled for the base), a mixed batch with the per-row ``adapter_names``. The
    caller holds the engine's model lock (no adapter may change meanwhile).

    Args:
        model: the base model, or the ``PeftModel`` wrapping it when ``peft``.
        rows: the batch.
        keys: per-row PEFT adapter names.
        peft: whether ``model`` is a ``PeftModel``.
        grouped: the model's grouped-LoRA slots, or None for PEFT's paths only.
        pad_token_id: left-padding id.
        device: where the model lives.
        decode: ids -> text (stop strings).

    Returns:
        The stopper holding each row's tokens.
    """
    common: dict[str, Any] = {"pad_token_id": pad_token_id, "device": device, "decode": decode}
    if peft and grouped is not None and grouped.supports(keys):
        with grouped.route(keys):
            return generate_batch(model, rows, adapter_names=None, **common)
    if len(set(keys)) > 1:
        return generate_batch(model, rows, adapter_names=keys, **common)
    if keys[0] == BASE_ROW:
        if not peft:
            return generate_batch(model, rows, adapter_names=None, **common)
        with model.disable_adapter():
            return generate_batch(model, rows, adapter_names=None, **common)
    if model.active_adapter != keys[0]:
        model.set_adapter(keys[0])
    return generate_batch(model, rows, adapter_names=None, **common)


def stream_text(row: Pending, decode: Callable[[Sequence[int]], str]) -> Iterator[str | GenerationResult]:
    """Turn a streaming row's tokens into text deltas, then yield its :class:`GenerationResult`.

    Text that could still become a stop string is held back; when a stop string appears the row
    is cancelled (it stops at its next token) and the text is cut there. Closing the iterator
    cancels the row too.

    Args:
        row: a submitted row with a ``sink``.
        decode: ids -> text.
    """
    assert row.sink is not None
    request: GenerationRequest = row.request
    holdback = max((len(s) for s in request.stop), default=1) - 1
    ids: list[int] = []
    emitted = ""
    try:
        while (item := row.sink.get()) is not END:  # END comes once the row is resolved
            if row.cancel.is_set():
                continue
            ids.extend(item)
            text = decode(ids)
            cut = find_stop(text, request.stop)
            safe = cut if cut is not None else len(text.rstrip("\ufffd")) - holdback
            if safe > len(emitted) and text.startswith(emitted):
                delta = text[len(emitted) : safe]
                emitted += delta
                yield delta
            if cut is not None:
                row.cancel.set()  # stops this row at its next token
        try:
            result: GenerationResult = row.result.result()
        except CancelledRow:
            return
        if result.text.startswith(emitted) and len(result.text) > len(emitted):
            yield result.text[len(emitted) :]
        yield result
    finally:
        row.cancel.set()
