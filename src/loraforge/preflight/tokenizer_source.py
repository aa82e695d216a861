"""Find a base model's ``tokenizer.json`` and special tokens without transformers or torch.

* ``builtin:tiny-llama``: the full build's ``tokenizer.json`` when the model was built, else the
  raw tokenizer is trained (deterministically, the same bytes) into ``models_dir/tiny-llama-tokenizer``.
* a local directory: its ``tokenizer.json`` and ``tokenizer_config.json``.
* a hub id: the files in the local ``huggingface_hub`` cache. Nothing is downloaded: a worker that
  trains on the model has it cached; elsewhere token counting is skipped with a warning.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from loraforge.catalog.catalog import BaseModelEntry

BUILTIN_PREFIX = "builtin:"
# Llama 3 defaults when a tokenizer_config.json does not name them.
_DEFAULT_SPECIAL = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}


class TokenizerUnavailable(LookupError):
    """The base model's tokenizer is not available locally."""


@dataclass(frozen=True)
class TokenizerFiles:
    """Where a base model's tokenizer lives and the special tokens its chat template sees."""

    tokenizer_json: Path
    special_tokens: tuple[tuple[str, str], ...]


def _special_tokens(config_path: Path | None) -> tuple[tuple[str, str], ...]:
    values = dict(_DEFAULT_SPECIAL)
    if config_path is not None and config_path.is_file():
        config: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            token = config.get(name)
            if isinstance(token, dict):  # AddedToken serialised as {"content": ...}
                token = token.get("content")
            if isinstance(token, str):
                values[name] = token
    return tuple(sorted(values.items()))


def _builtin(name: str, models_dir: Path) -> TokenizerFiles:
    if name != "tiny-llama":
        raise TokenizerUnavailable(f"unknown builtin model {name!r}")
    from loraforge.catalog.tiny_llama import TINY_BOS, TINY_EOS, TINY_PAD, save_tokenizer_json

    built = models_dir / name / "tokenizer.json"
    path = built if built.is_file() else save_tokenizer_json(models_dir / f"{name}-tokenizer")
    special = {"bos_token": TINY_BOS, "eos_token": TINY_EOS, "pad_token": TINY_PAD}
    return TokenizerFiles(path, tuple(sorted(special.items())))


def _from_hub_cache(repo_id: str) -> TokenizerFiles:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError as exc:  # pragma: no cover - huggingface_hub comes with tokenizers
        raise TokenizerUnavailable("huggingface_hub is not installed") from exc
    found = try_to_load_from_cache(repo_id, "tokenizer.json")
    if not isinstance(found, str):
        raise TokenizerUnavailable(
            f"the tokenizer of {repo_id} is not in the local Hugging Face cache (nothing is downloaded "
            "for validation)"
        )
    config = try_to_load_from_cache(repo_id, "tokenizer_config.json")
    return TokenizerFiles(Path(found), _special_tokens(Path(config) if isinstance(config, str) else None))


def locate_tokenizer(entry: BaseModelEntry, models_dir: Path) -> TokenizerFiles:
    """Where ``entry``'s tokenizer is, offline.

    Args:
        entry: the base model's catalog entry.
        models_dir: where builtin models are built (``Settings.models_dir``).

    Returns:
        The ``tokenizer.json`` path and special tokens.

    Raises:
        TokenizerUnavailable: it is neither built in, on disk, nor in the hub cache.
    """
    weights = entry.weights
    if weights.startswith(BUILTIN_PREFIX):
        return _builtin(weights.removeprefix(BUILTIN_PREFIX), models_dir)
    local = Path(weights).expanduser()
    if local.is_dir():
        if not (local / "tokenizer.json").is_file():
            raise TokenizerUnavailable(f"{local} has no tokenizer.json")
        return TokenizerFiles(local / "tokenizer.json", _special_tokens(local / "tokenizer_config.json"))
    return _from_hub_cache(weights)


@lru_cache(maxsize=8)
def load_tokenizer_json(path: Path) -> Any:
    """A ``tokenizers.Tokenizer`` read from ``path`` (cached per process; safe to share)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    # apply_chat_template encodes the rendered text with add_special_tokens=False and no padding or
    # truncation; make sure a tokenizer.json that enables them does not change our counts.
    tok.no_padding()
    tok.no_truncation()
    return tok


@lru_cache(maxsize=8)
def fast_counter(path: Path) -> Any:
    """The pre-token-cache counter for the tokenizer at ``path`` (None if its shape is unsupported).

    Shared per process, so its cache of pre-token counts warms up across files.
    """
    from loraforge.preflight.fastcount import fast_counter_for

    return fast_counter_for(load_tokenizer_json(path))
