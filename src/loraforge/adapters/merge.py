"""``python -m loraforge.adapters.merge ADAPTER_DIR OUT_DIR``: base + LoRA merged into full weights.

Runs in its own process (it imports torch; the API that asks for a merged export never does).
Writes ``config.json``, ``generation_config.json``, safetensors shards (+ index), the tokenizer
with the adapter's chat template, and the adapter's ``manifest.json`` into OUT_DIR.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from loraforge.adapters.format import MANIFEST, validate_adapter_dir
from loraforge.catalog.catalog import load_catalog


def merge(
    adapter_dir: Path,
    out_dir: Path,
    *,
    models_config: Path | None = None,
    models_dir: Path,
    device: str = "auto",
    max_shard_size: str = "5GB",
) -> Path:
    """Load the adapter's base model, merge the LoRA into it and save the result.

    Args:
        adapter_dir: the adapter directory (PEFT pair + manifest).
        out_dir: where to write (created; must not hold another model).
        models_config: the catalog file (default: the repository's).
        models_dir: where builtin models are built.
        device: ``auto`` (cuda if available), ``cpu`` or ``cuda``.
        max_shard_size: safetensors shard size.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: the adapter's base model is not in the catalog.
    """
    import torch
    from peft import PeftModel

    from loraforge.catalog.loading import load_model, load_tokenizer

    manifest = validate_adapter_dir(adapter_dir)
    entry = load_catalog(models_config).get(manifest.base_model)
    if entry is None:
        raise ValueError(f"base model {manifest.base_model!r} is not in the model catalog")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(entry, models_dir)
    if "{" in manifest.chat_template:
        tokenizer.chat_template = manifest.chat_template
    base = load_model(entry, models_dir, device=device)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    vocab = tokenizer.get_vocab()
    eos = [vocab[t] for t in manifest.stop_tokens if t in vocab]
    if eos:  # the merged model stops where the served adapter stops
        merged.generation_config.eos_token_id = eos if len(eos) > 1 else eos[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out_dir)
    shutil.copyfile(adapter_dir / MANIFEST, out_dir / MANIFEST)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m loraforge.adapters.merge", description=__doc__)
    parser.add_argument("adapter_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--models-config", type=Path, default=None)
    parser.add_argument("--models-dir", type=Path, required=True)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args(argv)
    try:
        merge(
            args.adapter_dir,
            args.out_dir,
            models_config=args.models_config,
            models_dir=args.models_dir,
            device=args.device,
            max_shard_size=args.max_shard_size,
        )
    except Exception as exc:  # noqa: BLE001 - reported on stderr for the caller
        print(f"merge failed: {exc!r}", file=sys.stderr)  # noqa: T201
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
