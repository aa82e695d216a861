"""The serving engine: one base model, many hot-loaded PEFT LoRA adapters, batched chat generation.

Pure Python + torch, no HTTP. The adapter lifecycle copies vLLM's (STYLE.md P11): a lock per
adapter name around load/unload, an LRU of at most ``max_loaded_adapters``, and typed errors.
Each adapter is served with the chat template and stop tokens of ITS manifest, so it sees prompts
exactly as it was trained; the base model uses the catalog entry's.

Concurrent requests are coalesced by a :class:`~loraforge.serving.batching.BatchScheduler` into
one ``generate`` call per batch: rows for different adapters and for the base model share it
through grouped LoRA slots (:mod:`~loraforge.serving.grouped_lora`; PEFT's ``adapter_names``
with ``grouped_lora=False``); streaming requests join batches like the rest.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from loraforge.catalog import BaseModelEntry, load_catalog
from loraforge.catalog.loading import load_model, load_tokenizer
from loraforge.serving.adapter_host import AdapterHost
from loraforge.serving.batching import BatchScheduler, Pending
from loraforge.serving.chat import check_prompt_size, max_prompt_chars, normalize_messages
from loraforge.serving.errors import (
    AdapterConflict,
    AdapterNotLoaded,
    InvalidRequest,
    UnknownBaseModel,
)
from loraforge.serving.generation import (
    BASE_ROW,
    GenerationRequest,
    GenerationResult,
    generate_rows,
    stream_text,
)
from loraforge.serving.lora import LoadedAdapter, read_adapter, split_stop_tokens
from loraforge.serving.tools import NO_TOOLS, ToolPlan, tool_prompt

if TYPE_CHECKING:  # the benchmark runs the engine where pydantic-settings is not installed
    from loraforge.ops.metrics import EngineMetrics
    from loraforge.settings import Settings

__all__ = ["Engine", "GenerationRequest", "GenerationResult", "LoadedAdapter", "load_engine"]

logger = logging.getLogger(__name__)


class Engine:
    """A base model plus an LRU of hot-loaded LoRA adapters; thread-safe, batched generation.

    Args:
        model: the base ``PreTrainedModel`` (not yet wrapped by PEFT).
        tokenizer: its tokenizer.
        entry: the base model's catalog entry (id, aliases, template, stop tokens, context length).
        max_loaded_adapters: LRU capacity; loading one more evicts the least recently used.
        default_max_tokens: completion budget when a request gives none (capped by the context).
        max_batch_size: most requests in one ``generate`` call.
        batch_window_s: how long the first request of a batch waits for others to join.
        grouped_lora: run batches through grouped LoRA slots; False: PEFT's own paths (its
            per-adapter ``adapter_names`` loop). An attribute: it may be switched between batches.
        metrics: counts adapter loads, evictions and load latency (``/metrics``), if given.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        entry: BaseModelEntry,
        *,
        max_loaded_adapters: int = 16,
        default_max_tokens: int = 256,
        max_batch_size: int = 8,
        batch_window_s: float = 0.005,
        grouped_lora: bool = True,
        metrics: EngineMetrics | None = None,
    ) -> None:
        if max_loaded_adapters < 1:
            raise ValueError("max_loaded_adapters must be >= 1")
        self.entry = entry
        self.max_loaded_adapters = max_loaded_adapters
        self.default_max_tokens = default_max_tokens
        self.grouped_lora = grouped_lora
        self.metrics = metrics
        self._host = AdapterHost(model, max_loaded_adapters)
        self._device = next(model.parameters()).device
        self._tokenizer = tokenizer
        self._pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        self._adapters: OrderedDict[str, LoadedAdapter] = OrderedDict()  # LRU order, oldest first
        self._model_lock = threading.RLock()  # held for every generate and every PEFT mutation
        self._registry_lock = threading.Lock()  # guards ``_adapters`` (short critical sections)
        self._tokenizer_lock = threading.Lock()  # HF fast tokenizers are not safe across threads
        self._name_locks: dict[str, threading.Lock] = {}
        self._name_locks_guard = threading.Lock()
        self._base_eos, self._base_stop = split_stop_tokens(tokenizer.get_vocab(), entry.stop_tokens)
        # Prompts longer than this are refused before the tokenizer (and its lock) sees them.
        self._max_prompt_chars = max_prompt_chars(tokenizer.get_vocab(), entry.context_length)
        self.scheduler = BatchScheduler(
            self._run_batch, max_batch_size=max_batch_size, window_s=batch_window_s
        )

    # ----------------------------------------------------------------------------- registry
    @property
    def _model(self) -> Any:
        """The model now: the bare base, or the ``PeftModel`` wrapping it while adapters are loaded."""
        return self._host.model

    @property
    def base_model(self) -> str:
        """The public id of the base model."""
        return self.entry.id

    @property
    def base_names(self) -> frozenset[str]:
        """Names that select the bare base model: its id and its aliases."""
        return frozenset([self.entry.id, *self.entry.aliases])

    def loaded_adapters(self) -> list[str]:
        """Names of the loaded adapters, least recently used first."""
        with self._registry_lock:
            return list(self._adapters)

    def describe_adapters(self) -> list[LoadedAdapter]:
        """The loaded adapters with their paths and manifests, least recently used first."""
        with self._registry_lock:
            return list(self._adapters.values())

    def has_model(self, name: str) -> bool:
        """Whether ``name`` is the base model (or an alias) or a loaded adapter."""
        with self._registry_lock:
            return name in self.base_names or name in self._adapters

    def stats(self) -> dict[str, int]:
        """Batching counters since start: batches run, requests (rows) served, largest batch."""
        sched = self.scheduler
        return {
            "batches": sched.batches_run,
            "requests": sched.rows_run,
            "largest_batch": sched.largest_batch,
        }

    def lora_parameter_names(self) -> list[str]:
        """Names of the LoRA parameters in the model now (tests: unload really removes them)."""
        with self._model_lock:
            return [n for n, _ in self._model.named_parameters() if ".lora_" in n]

    def load_adapter(self, name: str, path: str | Path) -> bool:
        """Hot-load the adapter in ``path`` under ``name``; a no-op if already loaded from there.

        Args:
            name: the model name requests will use (e.g. ``ft:<base>:<suffix>:<job>``).
            path: an adapter directory (PEFT pair + ``manifest.json``).

        Returns:
            True if the adapter was loaded now, False if it already was.

        Raises:
            AdapterConflict: ``name`` is the base model's, or is loaded from another path.
            AdapterNotFound: ``path`` is not a directory.
            InvalidAdapter: the directory breaks the adapter contract, the serving limits, or PEFT refused it.
            BaseModelMismatch: the manifest's base model is not this engine's.
        """
        path = Path(path).expanduser().resolve()
        if name in self.base_names:
            raise AdapterConflict(f"'{name}' is the base model's name; pick another adapter name.")
        # Ensure atomicity based on the lora name (vLLM's lora_resolver_lock).
        with self._name_lock(name):
            with self._registry_lock:
                existing = self._adapters.get(name)
            if existing is not None:
                if existing.path != path:
                    raise AdapterConflict(
                        f"The lora adapter '{name}' is already loaded from another adapter; unload it first."
                    )
                return False
            started = time.perf_counter()
            adapter = read_adapter(name, path, self.entry, self._tokenizer.get_vocab())  # no model lock
            with self._model_lock:
                while len(self._adapters) >= self.max_loaded_adapters:
                    oldest = next(iter(self._adapters))
                    logger.info("evicting least recently used adapter %s", oldest)
                    self._detach(oldest)
                    if self.metrics is not None:
                        self.metrics.adapter_evicted()
                self._attach(adapter)
            if self.metrics is not None:
                self.metrics.adapter_loaded(time.perf_counter() - started)
            logger.info("loaded adapter %s from %s", name, path)
            return True

    def unload_adapter(self, name: str) -> None:
        """Remove a loaded adapter and free its weights.

        Raises:
            AdapterNotLoaded: no adapter of that name is loaded (``param`` is ``lora_name``).
        """
        with self._name_lock(name), self._model_lock:
            if name not in self._adapters:
                raise AdapterNotLoaded(name, param="lora_name")
            self._detach(name)
        logger.info("unloaded adapter %s", name)

    def close(self) -> None:
        """Stop the batching thread (queued requests fail)."""
        self.scheduler.close()

    def _name_lock(self, name: str) -> threading.Lock:
        with self._name_locks_guard:
            return self._name_locks.setdefault(name, threading.Lock())

    def _attach(self, adapter: LoadedAdapter) -> None:
        """Add ``adapter`` to the model; caller holds the model lock."""
        self._host.attach(adapter)
        with self._registry_lock:
            self._adapters[adapter.name] = adapter

    def _detach(self, name: str) -> None:
        """Remove ``name`` from the model and release its memory; caller holds the model lock."""
        with self._registry_lock:
            last = len(self._adapters) == 1
            adapter = self._adapters.pop(name)
        self._host.detach(adapter, last)

    # --------------------------------------------------------------------------- generation
    def prepare(
        self,
        model_name: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        tools: ToolPlan = NO_TOOLS,
    ) -> GenerationRequest:
        """Resolve the model, render the chat template (with ``tools``) and tokenise.

        Raises:
            AdapterNotLoaded: ``model_name`` is neither the base model nor a loaded adapter.
            InvalidRequest: unsupported message content, tools for a template without a tool
                format, or the prompt fills the context.
        """
        with self._registry_lock:
            adapter = self._adapters.get(model_name)
        if adapter is None and model_name not in self.base_names:
            raise AdapterNotLoaded(model_name)
        if adapter is None:
            template, eos_ids, stops = self.entry.chat_template_text, self._base_eos, self._base_stop
        else:
            template, eos_ids, stops = adapter.chat_template, adapter.eos_ids, adapter.stop_strings
        chat = normalize_messages(messages)
        check_prompt_size(chat, self._max_prompt_chars, self.entry.context_length)
        fmt, prefill = tool_prompt(model_name, template, tools)
        try:
            with self._tokenizer_lock:
                # Rendered to text, then encoded whole: a forced call prefix is tokenized as the
                # trained text was (apply_chat_template encodes the same way, specials inline).
                text = self._tokenizer.apply_chat_template(
                    chat,
                    chat_template=template,
                    tools=tools.tools,
                    add_generation_prompt=True,
                    tokenize=False,
                )
                encoded = self._tokenizer(text + prefill, add_special_tokens=False)
        except Exception as exc:  # jinja raises on messages the template rejects
            raise InvalidRequest(f"The chat template rejected the messages: {exc}", param="messages") from exc
        input_ids = tuple(int(i) for i in encoded["input_ids"])
        room = self.entry.context_length - len(input_ids)
        if room <= 0:
            raise InvalidRequest(
                f"This model's maximum context length is {self.entry.context_length} tokens. "
                f"However, your messages resulted in {len(input_ids)} tokens.",
                param="messages",
                code="context_length_exceeded",
            )
        extra_stop = [stop] if isinstance(stop, str) else list(stop or [])
        return GenerationRequest(
            model=model_name,
            adapter=None if adapter is None else adapter.name,
            input_ids=input_ids,
            max_new_tokens=min(max_tokens or self.default_max_tokens, room),
            eos_ids=eos_ids,
            stop=tuple(dict.fromkeys(s for s in [*stops, *extra_stop] if s)),
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            tool_format=fmt,
            prefill=prefill,
        )

    def generate(
        self, model_name: str, messages: Sequence[Mapping[str, Any]], **kwargs: Any
    ) -> GenerationResult:
        """Generate one completion; ``kwargs`` are :meth:`prepare`'s sampling arguments.

        ``temperature == 0`` is greedy; ``seed`` seeds torch's RNG for sampling. ``stop`` strings cut
        the text at their first occurrence (finish_reason ``stop``); ``length`` when the budget ran out.
        """
        return self.run(self.prepare(model_name, messages, **kwargs))

    def generate_stream(
        self, model_name: str, messages: Sequence[Mapping[str, Any]], **kwargs: Any
    ) -> Iterator[str | GenerationResult]:
        """Like :meth:`generate`, but yield text deltas, then the final :class:`GenerationResult`."""
        return self.run_stream(self.prepare(model_name, messages, **kwargs))

    def run(self, request: GenerationRequest) -> GenerationResult:
        """Generate for a prepared request (blocking; batched with concurrent requests)."""
        pending = self.scheduler.submit(Pending(request, request.batch_key()))
        result: GenerationResult = pending.result.result()
        return result

    def run_many(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Submit several prepared requests at once and wait for all (they may share batches)."""
        rows = [self.scheduler.submit(Pending(r, r.batch_key())) for r in requests]
        return [row.result.result() for row in rows]

    def run_stream(
        self, request: GenerationRequest, cancel: threading.Event | None = None
    ) -> Iterator[str | GenerationResult]:
        """Queue ``request`` for a batch; yield text deltas, then the :class:`GenerationResult`.

        Text that could still turn into a stop string is held back. Setting ``cancel`` (or closing
        the iterator) stops this request at its next token; its batch mates carry on.
        """
        row = Pending(
            request, request.batch_key(), sink=queue.SimpleQueue(), cancel=cancel or threading.Event()
        )
        self.scheduler.submit(row)
        return stream_text(row, self._decode)

    def _run_batch(self, rows: Sequence[Pending]) -> None:
        """Generate for one batch on the scheduler thread and resolve every row."""
        with self._model_lock:
            live: list[Pending] = []
            keys: list[str] = []
            with self._registry_lock:
                for row in rows:
                    name = row.request.adapter
                    adapter = None if name is None else self._adapters.get(name)
                    if name is not None and adapter is None:  # evicted or unloaded since prepare()
                        row.fail(AdapterNotLoaded(row.request.model))
                        continue
                    if adapter is not None:
                        self._adapters.move_to_end(adapter.name)
                    live.append(row)
                    keys.append(BASE_ROW if adapter is None else adapter.peft_name)
            if not live:
                return
            stopper = generate_rows(
                self._host.model,
                live,
                keys,
                peft=self._host.peft,
                grouped=self._host.grouped if self.grouped_lora else None,
                pad_token_id=self._pad_id,
                device=self._device,
                decode=self._decode,
            )
        for i in range(len(live)):  # rows resolve as they finish; this catches any left over
            stopper.resolve(i)

    def _decode(self, ids: Sequence[int]) -> str:
        with self._tokenizer_lock:
            return str(self._tokenizer.decode(list(ids), skip_special_tokens=True))


def load_engine(
    settings: Settings,
    base_model: str,
    *,
    device: str | None = None,
    max_loaded_adapters: int = 16,
    max_batch_size: int = 8,
    batch_window_s: float = 0.005,
    metrics: EngineMetrics | None = None,
) -> Engine:
    """Build an :class:`Engine` for ``base_model`` (a catalog id or alias) from ``settings``.

    Args:
        settings: where the catalog and built models live; ``torch_threads`` if set.
        base_model: catalog id or alias.
        device: torch device; default ``cuda`` when available, else ``cpu``.
        max_loaded_adapters: LRU capacity.
        max_batch_size: most requests per ``generate`` call.
        batch_window_s: how long a batch waits for company.
        metrics: the engine's metrics (adapter loads and evictions), if served.

    Raises:
        UnknownBaseModel: the catalog has no such model.
    """
    entry = load_catalog(settings.models_config).get(base_model)
    if entry is None:
        raise UnknownBaseModel(f"The base model `{base_model}` is not in the model catalog.")
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(entry, settings.models_dir)
    model = load_model(entry, settings.models_dir, device=device)
    return Engine(
        model,
        tokenizer,
        entry,
        max_loaded_adapters=max_loaded_adapters,
        max_batch_size=max_batch_size,
        batch_window_s=batch_window_s,
        metrics=metrics,
    )
