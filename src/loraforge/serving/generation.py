"""Generation plumbing for the engine: request/result types, stopping, streaming hooks (torch)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers import GenerationConfig, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from loraforge.serving.chat import find_stop


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


def generation_config(request: GenerationRequest, pad_token_id: int | None) -> GenerationConfig:
    """A complete ``GenerationConfig`` so nothing leaks in from the model's own defaults.

    ``temperature == 0`` (or ``top_p == 0``) is greedy; otherwise plain temperature/top-p sampling.
    """
    greedy = request.temperature <= 0 or request.top_p <= 0
    # top_k=0: OpenAI semantics, no top-k cut (transformers would default to 50).
    sampling = {} if greedy else {"temperature": request.temperature, "top_p": request.top_p, "top_k": 0}
    return GenerationConfig(
        max_new_tokens=request.max_new_tokens,
        do_sample=not greedy,
        eos_token_id=list(request.eos_ids) or None,
        pad_token_id=pad_token_id,
        **sampling,
    )


def finish(request: GenerationRequest, ids: list[int], text: str) -> GenerationResult:
    """Cut ``text`` (the decoded ``ids``) at the first stop string and name the finish reason."""
    cut = find_stop(text, request.stop)
    if cut is not None:
        text, reason = text[:cut], "stop"
    elif ids and ids[-1] in request.eos_ids:
        reason = "stop"
    elif len(ids) >= request.max_new_tokens:
        reason = "length"
    else:
        reason = "stop"  # cancelled
    return GenerationResult(text, len(request.input_ids), len(ids), reason, tuple(ids))


class QueueStreamer(BaseStreamer):
    """Push each new token id list onto a queue (the first ``put`` is the prompt: skipped)."""

    def __init__(self, sink: queue.SimpleQueue[Any]) -> None:
        self._sink = sink
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self._sink.put([int(i) for i in value.reshape(-1).tolist()])

    def end(self) -> None:
        """Nothing: the generate thread signals the end itself, even when generate raises."""


class StopCriteria(StoppingCriteria):
    """Stop when the decoded completion contains a stop string, or when ``cancel`` is set."""

    def __init__(
        self,
        decode: Callable[[Sequence[int]], str],
        prompt_len: int,
        stop: Sequence[str],
        cancel: threading.Event | None,
    ) -> None:
        self._decode, self._prompt_len, self._stop, self._cancel = decode, prompt_len, stop, cancel

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        done = self._cancel is not None and self._cancel.is_set()
        if not done and self._stop:
            done = find_stop(self._decode(input_ids[0, self._prompt_len :].tolist()), self._stop) is not None
        flags = torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)
        return cast(torch.BoolTensor, flags)
