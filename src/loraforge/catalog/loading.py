"""Load a catalog base model (tokenizer + weights) by hub id, local path or builtin name.

Imports torch/transformers lazily: only the trainer and the engine call this.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loraforge.catalog.catalog import BaseModelEntry

BUILTIN_PREFIX = "builtin:"


def resolve_weights(entry: BaseModelEntry, models_dir: Path) -> str:
    """Where ``from_pretrained`` should look for ``entry``: a local path or a hub id.

    Builtin models (``builtin:tiny-llama``) are built under ``models_dir`` on first use.
    """
    if not entry.weights.startswith(BUILTIN_PREFIX):
        return entry.weights
    name = entry.weights.removeprefix(BUILTIN_PREFIX)
    if name != "tiny-llama":
        raise ValueError(f"unknown builtin model {name!r}")
    from loraforge.catalog.tiny_llama import build_tiny_llama

    return str(build_tiny_llama(models_dir / name, entry.chat_template_text))


def load_tokenizer(entry: BaseModelEntry, models_dir: Path) -> Any:
    """The base model's tokenizer, with the catalog's chat template applied."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_weights(entry, models_dir))
    tokenizer.chat_template = entry.chat_template_text
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    entry: BaseModelEntry, models_dir: Path, *, device: str = "cpu", dtype: str | None = None
) -> Any:
    """The base model's weights as an ``AutoModelForCausalLM`` on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype or entry.training.dtype)
    if device == "cpu" and torch_dtype is torch.bfloat16 and entry.weights.startswith(BUILTIN_PREFIX):
        torch_dtype = torch.float32
    model = AutoModelForCausalLM.from_pretrained(resolve_weights(entry, models_dir), dtype=torch_dtype)
    return model.to(device)
