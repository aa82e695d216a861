"""Reading an adapter directory for serving: contract checks, template and stop tokens (no torch)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from loraforge.adapters.export import serving_problems
from loraforge.adapters.format import (
    ADAPTER_CONFIG,
    AdapterManifest,
    InvalidAdapterError,
    validate_adapter_dir,
)
from loraforge.catalog import BaseModelEntry
from loraforge.serving.errors import AdapterNotFound, BaseModelMismatch, InvalidAdapter


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter attached to the model, with what it needs at generation time."""

    name: str
    path: Path
    peft_name: str  # the adapter's key inside PEFT (public names may hold '.', which PEFT refuses)
    manifest: AdapterManifest
    chat_template: str
    eos_ids: tuple[int, ...]
    stop_strings: tuple[str, ...]
    loaded_at: int


def peft_adapter_name(name: str) -> str:
    """A PEFT-safe, stable adapter key for the public model ``name``.

    PEFT stores adapters in ``nn.ModuleDict``s, whose keys cannot contain ``.``; public names such
    as ``ft:klusterai/Meta-Llama-3.1-8B-Instruct-Turbo:org::abcd1234`` do.
    """
    return "lf_" + hashlib.sha256(name.encode()).hexdigest()[:20]


def split_stop_tokens(
    vocab: Mapping[str, int], stop_tokens: Sequence[str]
) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Split stop tokens into vocabulary ids (eos ids) and plain strings (not single tokens)."""
    ids = [vocab[t] for t in stop_tokens if t in vocab]
    strings = [t for t in stop_tokens if t not in vocab]
    return tuple(dict.fromkeys(ids)), tuple(strings)


def manifest_template(manifest: AdapterManifest, entry: BaseModelEntry) -> str:
    """The Jinja text of the manifest's chat template.

    Raises:
        InvalidAdapter: the manifest holds a file name other than the catalog entry's own.
    """
    template = manifest.chat_template
    if "{{" in template or "{%" in template:
        return template
    # A template *file name* instead of its text: accept only the catalog's own file.
    if template == entry.chat_template:
        return entry.chat_template_text
    raise InvalidAdapter(f"manifest chat_template must be a Jinja template, got {template!r}.")


def read_adapter(name: str, path: Path, entry: BaseModelEntry, vocab: Mapping[str, int]) -> LoadedAdapter:
    """Validate ``path`` for serving on ``entry`` and describe it (nothing is loaded into a model).

    Args:
        name: the model name the adapter will answer to.
        path: the adapter directory (PEFT pair + ``manifest.json``).
        entry: the catalog entry of the engine's base model.
        vocab: the base tokenizer's vocabulary, to turn stop tokens into ids.

    Raises:
        AdapterNotFound: ``path`` is not a directory.
        InvalidAdapter: missing files, bad manifest, or beyond the base's serving limits (rank,
            target modules, DoRA, modules_to_save: ``catalog.ServingTarget``).
        BaseModelMismatch: the manifest names another base model.
    """
    if not path.is_dir():
        raise AdapterNotFound(f"No adapter found for '{name}'.")
    try:
        manifest = validate_adapter_dir(path)
        peft_config = json.loads((path / ADAPTER_CONFIG).read_text())
    except (InvalidAdapterError, ValueError) as exc:
        raise InvalidAdapter(str(exc)) from exc
    if manifest.base_model not in {entry.id, *entry.aliases}:
        raise BaseModelMismatch(
            f"Adapter '{name}' was trained on '{manifest.base_model}', but this engine serves '{entry.id}'."
        )
    problems = serving_problems(peft_config, entry.serving)
    if problems:
        raise InvalidAdapter(f"Adapter '{name}' cannot be served: {'; '.join(problems)}.")
    eos_ids, stop_strings = split_stop_tokens(vocab, manifest.stop_tokens)
    return LoadedAdapter(
        name=name,
        path=path,
        peft_name=peft_adapter_name(name),
        manifest=manifest,
        chat_template=manifest_template(manifest, entry),
        eos_ids=eos_ids,
        stop_strings=stop_strings,
        loaded_at=int(time.time()),
    )
