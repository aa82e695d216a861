"""``GET /v1/models/{model}/export?format=gguf``: the GGUF files of a fine-tuned model (no torch here).

Archive::

    <name>-gguf/model-f16.gguf    merged weights, f16 (norms f32)
    <name>-gguf/model-q8_0.gguf   merged weights, q8_0
    <name>-gguf/lora-f32.gguf     the LoRA alone, for llama.cpp's --lora over the base's GGUF
    <name>-gguf/Modelfile         ollama create NAME -f Modelfile
    <name>-gguf/README.md         how to run them

The files are built from the merged export (``export._stored_merge``) by
``python -m loraforge.adapters.gguf_convert`` in a subprocess, once per model: like the merged
weights they are sealed into the blob store (``exports/{job_id}/{name}/gguf``) and kept under
``$LORAFORGE_HOME/exports`` on each API machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from loraforge import storage
from loraforge.adapters.export import AdapterExportError, ExportRefusedError, TarEntry, archive_root
from loraforge.catalog.catalog import BaseModelEntry
from loraforge.storage.cache import StorageIntegrityError
from loraforge.storage.sealed import is_sealed, put_dir

if TYPE_CHECKING:
    from loraforge.adapters.export import ExportableModel
    from loraforge.settings import Settings

# The converter (``gguf_convert``, torch) writes these; this module only names them.
F16_FILE, Q8_FILE, LORA_FILE, MODELFILE = "model-f16.gguf", "model-q8_0.gguf", "lora-f32.gguf", "Modelfile"
_FILES = (F16_FILE, Q8_FILE, LORA_FILE, MODELFILE)
_locks: dict[Path, threading.Lock] = {}
_locks_guard = threading.Lock()


def _readme(model_name: str, entry: BaseModelEntry) -> bytes:
    return (
        f"`{model_name}` (base `{entry.id}` with its LoRA) as GGUF, for llama.cpp, Ollama and LM Studio.\n\n"
        f"    llama-cli -m {Q8_FILE} -cnv            # or {F16_FILE}; the chat template is in the file\n"
        f"    llama-cli -m BASE-f16.gguf --lora {LORA_FILE} -cnv   # the adapter over the base's GGUF\n"
        "    ollama create my-model -f Modelfile && ollama run my-model\n\n"
        "Each model file carries the tokenizer, the chat template the model was trained with\n"
        "(tokenizer.chat_template) and its stop token; the Modelfile gives Ollama the same template\n"
        "and stop tokens.\n"
    ).encode()


def ensure_gguf(
    merged_dir: Path, adapter_dir: Path, cache_dir: Path, *, python: str, name: str, timeout: float = 3600.0
) -> Path:
    """The GGUF files of ``merged_dir`` under ``cache_dir/gguf``, building them once.

    Like :func:`loraforge.adapters.export.ensure_merged`: a subprocess writes a temporary
    directory that is renamed into place.

    Raises:
        ExportRefusedError: the model cannot be written as GGUF (architecture, tokenizer, LoRA).
        AdapterExportError: the conversion failed.
    """
    final = cache_dir / "gguf"
    with _locks_guard:
        lock = _locks.setdefault(final, threading.Lock())
    with lock:
        if all((final / f).is_file() for f in _FILES):
            return final
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_dir / f".gguf-{os.getpid()}-{threading.get_ident()}"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [python, "-m", "loraforge.adapters.gguf_convert", str(merged_dir), str(adapter_dir), str(tmp)]
        try:
            done = subprocess.run(
                [*cmd, "--name", name], capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise AdapterExportError(f"the GGUF conversion took more than {timeout:.0f} s") from exc
        if done.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            reason = done.stderr.strip().splitlines()[-1:] or ["no output"]
            if done.returncode == 2:  # the converter's "not exportable" (a ValueError)
                raise ExportRefusedError(reason[0].removeprefix("GGUF export failed: "))
            raise AdapterExportError(f"the GGUF conversion failed: {done.stderr.strip()[-600:]}")
        try:
            tmp.rename(final)
        except OSError:  # another process finished first: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
        return final


def stored_gguf(settings: Settings, model: ExportableModel, adapter_dir: Path, merged_dir: Path) -> Path:
    """The GGUF files of ``model``: this machine's copy, else the store's, else built now (and
    sealed into the store for the other machines)."""
    import sys

    root = archive_root(model.name)
    local = settings.exports_dir / model.job_id / root
    key = f"{storage.EXPORTS}/{model.job_id}/{root}/gguf"
    store = storage.open_store(settings)
    have = lambda: all((local / "gguf" / f).is_file() for f in _FILES)  # noqa: E731
    if not have() and is_sealed(store, key):
        try:
            storage.local_cache(settings).copy_directory(key, local / "gguf")
        except (OSError, StorageIntegrityError):
            shutil.rmtree(local / "gguf", ignore_errors=True)  # built again below
    built = not have()
    out = ensure_gguf(
        merged_dir, adapter_dir, local, python=settings.trainer_python or sys.executable, name=model.name
    )
    if built or not is_sealed(store, key):
        put_dir(store, out, key)
    return out


def gguf_entries(gguf_dir: Path, entry: BaseModelEntry, model_name: str) -> list[TarEntry]:
    """The files of a GGUF export."""
    root = archive_root(model_name, "-gguf")
    files = [TarEntry(f"{root}/{name}", path=gguf_dir / name) for name in _FILES]
    return [*files, TarEntry(f"{root}/README.md", data=_readme(model_name, entry))]
