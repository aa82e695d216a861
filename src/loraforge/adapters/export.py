"""Export a fine-tuned model: the PEFT adapter, merged full weights or GGUF (``gguf_export.py``),
as a streamed tar (no torch).

PEFT export (``format=peft``)::

    <name>/adapter_config.json        normalised for vLLM's LoRA loader (see below)
    <name>/adapter_model.safetensors  PEFT's weights, unchanged
    <name>/manifest.json              ours: base model, chat template, stop tokens, LoRA, metrics
    <name>/chat_template.jinja        the template the adapter was trained and is served with
    <name>/README.md                  how to load it

``adapter_config.json`` normalisation. vLLM builds a ``PEFTHelper`` from the config
(``vllm/lora/peft_helper.py``): it keeps only the keys it knows (``r``, ``lora_alpha``,
``target_modules``, ``bias``, ``modules_to_save``, ``use_rslora``, ``use_dora``,
``context_length``), and refuses ``use_dora``, non-empty ``modules_to_save``, ``bias != "none"``
(without ``--enable-lora-bias``) and ``r`` above ``--max-lora-rank``. Keys it drops silently
(``rank_pattern``, ``alpha_pattern``, ``lora_bias``, ``trainable_token_indices``,
``target_parameters``) would make it serve something else than PEFT does, so an adapter using them
is refused rather than exported. What is written: the PEFT keys both loaders read, with
``target_modules`` reduced to sorted module names (PEFT may save full module paths),
``base_model_name_or_path`` set to the catalog's public weights id instead of the trainer's local
path, and ``inference_mode: true``. PEFT fills every other field with its defaults on load.

Merged export (``format=merged``) runs ``python -m loraforge.adapters.merge`` in a subprocess
(the API never imports torch) once per model: the result is sealed into the blob store
(``exports/{job_id}/{name}/merged``), and each API machine keeps a local copy under
``$LORAFORGE_HOME/exports`` (fetched from the store when another machine built it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from loraforge import storage
from loraforge.adapters.format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MANIFEST,
    AdapterManifest,
    InvalidAdapterError,
    validate_adapter_dir,
)
from loraforge.catalog.catalog import BaseModelEntry, Catalog, ServingTarget
from loraforge.errors import InvalidRequestError, ServiceUnavailableError
from loraforge.storage.cache import StorageIntegrityError
from loraforge.storage.sealed import is_sealed, put_dir

if TYPE_CHECKING:  # the engine imports this module for serving_problems: keep it free of settings
    from loraforge.settings import Settings

CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHUNK = 1024 * 1024
_BLOCK = tarfile.BLOCKSIZE  # 512
# PEFT config keys vLLM ignores; a non-default value changes what PEFT serves.
_UNSERVABLE_IF_SET = ("rank_pattern", "alpha_pattern", "trainable_token_indices", "target_parameters")


class AdapterExportError(ValueError):
    """The adapter cannot be exported (or served) as asked."""


class ExportRefusedError(AdapterExportError):
    """The model cannot be written in the asked format (a 400, not a failure of the service)."""


def lora_modules(config: dict[str, Any]) -> list[str]:
    """The sorted module names (last path segment) a PEFT config targets.

    Raises:
        AdapterExportError: ``target_modules`` is a regular expression.
    """
    targets = config.get("target_modules") or []
    if isinstance(targets, str):  # a regex: PEFT matches it against full module names
        raise AdapterExportError(f"target_modules is a regular expression ({targets!r}); list the modules.")
    return sorted({str(t).rsplit(".", 1)[-1] for t in targets})


def serving_problems(config: dict[str, Any], target: ServingTarget) -> list[str]:
    """Why a PEFT ``adapter_config.json`` could not be served on ``target`` (empty: it can).

    Args:
        config: the parsed ``adapter_config.json``.
        target: the base model's serving limits.

    Returns:
        Human-readable problems, one per broken limit.
    """
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"only LoRA adapters are served, got {config.get('peft_type')!r}")
    rank = int(config.get("r", 0))
    if rank > target.max_lora_rank:
        problems.append(
            f"LoRA rank {rank} is greater than the serving target's max_lora_rank {target.max_lora_rank}"
        )
    try:
        unsupported = [m for m in lora_modules(config) if not target.supports_module(m)]
    except AdapterExportError as exc:
        unsupported, problems = [], [*problems, str(exc)]
    if unsupported:
        problems.append(f"target modules {unsupported} are not supported by the serving target")
    if config.get("use_dora") and not target.dora:
        problems.append("DoRA adapters are not supported by the serving target")
    if config.get("modules_to_save") and not target.modules_to_save:
        problems.append("modules_to_save is not supported by the serving target")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("LoRA bias terms are not supported by the serving target")
    problems += [
        f"{key} is not supported by the serving target" for key in _UNSERVABLE_IF_SET if config.get(key)
    ]
    return problems


def vllm_adapter_config(config: dict[str, Any], entry: BaseModelEntry) -> dict[str, Any]:
    """The ``adapter_config.json`` written into a PEFT export (see the module docstring).

    Args:
        config: PEFT's saved config.
        entry: the base model's catalog entry (public weights id, serving limits).

    Raises:
        AdapterExportError: the adapter uses something vLLM would drop or refuse.
    """
    problems = serving_problems(config, entry.serving)
    if problems:
        raise AdapterExportError("; ".join(problems))
    base_ref = entry.id if entry.weights.startswith("builtin:") else entry.weights
    return {
        "peft_type": "LORA",
        "task_type": config.get("task_type") or "CAUSAL_LM",
        "base_model_name_or_path": base_ref,
        "r": int(config["r"]),
        "lora_alpha": config["lora_alpha"],
        "lora_dropout": float(config.get("lora_dropout") or 0.0),
        "target_modules": lora_modules(config),
        "bias": "none",
        "modules_to_save": None,
        "use_rslora": bool(config.get("use_rslora", False)),
        "use_dora": False,
        "fan_in_fan_out": bool(config.get("fan_in_fan_out", False)),
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": config.get("layers_to_transform"),
        "layers_pattern": config.get("layers_pattern"),
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
        "peft_version": config.get("peft_version"),
    }


@dataclass(frozen=True)
class TarEntry:
    """One file of an export: ``data`` in memory, or the file at ``path``."""

    name: str
    path: Path | None = None
    data: bytes | None = None

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else (self.path.stat().st_size if self.path else 0)


def tar_stream(entries: Iterable[TarEntry], *, mtime: int | None = None) -> Iterator[bytes]:
    """A POSIX tar of ``entries``, yielded in chunks of at most 1 MiB; files are never read whole.

    Args:
        entries: the files, in archive order.
        mtime: modification time recorded for every file (default: now).
    """
    stamp = int(time.time()) if mtime is None else mtime
    for entry in entries:
        info = tarfile.TarInfo(entry.name)
        info.size, info.mtime, info.mode = entry.size, stamp, 0o644
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        if entry.data is not None:
            yield entry.data
        elif entry.path is not None:
            with entry.path.open("rb") as fh:
                while chunk := fh.read(CHUNK):
                    yield chunk
        if remainder := entry.size % _BLOCK:
            yield b"\0" * (_BLOCK - remainder)
    yield b"\0" * (2 * _BLOCK)  # end-of-archive marker


def archive_root(model_name: str, suffix: str = "") -> str:
    """A directory name for ``model_name`` (``ft:a/b:org:s:id`` -> ``ft-a-b-org-s-id``)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in model_name).strip("-.")
    return (safe or "model") + suffix


def _readme(model_name: str, entry: BaseModelEntry, merged: bool) -> bytes:
    base_ref = entry.id if entry.weights.startswith("builtin:") else entry.weights
    if merged:
        body = (
            f"Full weights of `{model_name}` (base `{entry.id}` with its LoRA merged in), safetensors.\n\n"
            "    AutoModelForCausalLM.from_pretrained(DIR); AutoTokenizer.from_pretrained(DIR)\n"
        )
    else:
        body = (
            f"LoRA adapter `{model_name}` for `{base_ref}` (PEFT format, vLLM-compatible config).\n\n"
            "    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), DIR)\n"
            "    vllm serve BASE --enable-lora --max-lora-rank 64 --lora-modules NAME=DIR\n"
        )
    return (body + f"\nChat template: {CHAT_TEMPLATE_FILE} (the one it was trained with).\n").encode()


def peft_export(
    adapter_dir: Path, manifest: AdapterManifest, entry: BaseModelEntry, model_name: str
) -> list[TarEntry]:
    """The files of a PEFT export of ``adapter_dir``.

    Raises:
        AdapterExportError: the adapter config cannot be made vLLM-compatible.
    """
    root = archive_root(model_name)
    config = vllm_adapter_config(json.loads((adapter_dir / ADAPTER_CONFIG).read_text()), entry)
    template = manifest.chat_template if "{" in manifest.chat_template else entry.chat_template_text
    return [
        TarEntry(f"{root}/{ADAPTER_CONFIG}", data=(json.dumps(config, indent=2) + "\n").encode()),
        TarEntry(f"{root}/{ADAPTER_WEIGHTS}", path=adapter_dir / ADAPTER_WEIGHTS),
        TarEntry(f"{root}/{MANIFEST}", path=adapter_dir / MANIFEST),
        TarEntry(f"{root}/{CHAT_TEMPLATE_FILE}", data=template.encode()),
        TarEntry(f"{root}/README.md", data=_readme(model_name, entry, merged=False)),
    ]


def merged_export(merged_dir: Path, entry: BaseModelEntry, model_name: str) -> list[TarEntry]:
    """The files of a merged export: every file of ``merged_dir`` (weights shards, tokenizer...)."""
    root = archive_root(model_name, "-merged")
    files = sorted(p for p in merged_dir.rglob("*") if p.is_file())
    entries = [TarEntry(f"{root}/{p.relative_to(merged_dir).as_posix()}", path=p) for p in files]
    return [*entries, TarEntry(f"{root}/README.md", data=_readme(model_name, entry, merged=True))]


_merge_locks: dict[Path, threading.Lock] = {}
_merge_locks_guard = threading.Lock()


def ensure_merged(
    adapter_dir: Path,
    cache_dir: Path,
    *,
    python: str,
    models_config: Path | None,
    models_dir: Path,
    timeout: float = 3600.0,
) -> Path:
    """Merged weights of ``adapter_dir`` under ``cache_dir/merged``, building them once.

    The merge runs as ``python -m loraforge.adapters.merge`` (torch lives there, not in the API);
    it writes to a temporary directory that is renamed into place, so a crash never leaves a
    half-written cache and concurrent requests (threads or processes) do not clash.

    Raises:
        AdapterExportError: the merge failed (its stderr tail is in the message).
    """
    final = cache_dir / "merged"
    with _merge_locks_guard:
        lock = _merge_locks.setdefault(final, threading.Lock())
    with lock:
        if (final / "config.json").is_file():
            return final
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_dir / f".merged-{os.getpid()}-{threading.get_ident()}"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [
            python,
            "-m",
            "loraforge.adapters.merge",
            str(adapter_dir),
            str(tmp),
            "--models-dir",
            str(models_dir),
        ]
        if models_config is not None:
            cmd += ["--models-config", str(models_config)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise AdapterExportError(f"merging the adapter took more than {timeout:.0f} s") from exc
        if done.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise AdapterExportError(f"merging the adapter failed: {done.stderr.strip()[-600:]}")
        try:
            tmp.rename(final)
        except OSError:  # another process finished first: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
        return final


__all__ = [
    "AdapterExportError",
    "ExportRefusedError",
    "ExportableModel",
    "TarEntry",
    "archive_root",
    "drop_cached_exports",
    "ensure_merged",
    "export_archive",
    "lora_modules",
    "merged_export",
    "peft_export",
    "serving_problems",
    "tar_stream",
    "vllm_adapter_config",
]


class ExportableModel(Protocol):
    """What an export needs to know of a model (``registry.ServedModel``: fine-tuned or checkpoint)."""

    @property
    def name(self) -> str: ...
    @property
    def base_model(self) -> str: ...
    @property
    def adapter_path(self) -> str: ...
    @property
    def job_id(self) -> str: ...


def export_archive(
    settings: Settings, catalog: Catalog, model: ExportableModel, export_format: str
) -> tuple[str, list[TarEntry]]:
    """The download name and files of an export of ``model`` (``peft``, ``merged`` or ``gguf``).

    Args:
        settings: where exports are cached and how to run the merge subprocess.
        catalog: the model catalog (the base's entry).
        model: a fine-tuned or checkpoint model (already checked to belong to the caller).
        export_format: ``peft``, ``merged`` or ``gguf`` (``adapters/gguf_export.py``).

    Raises:
        InvalidRequestError: the adapter cannot be exported in a vLLM-compatible form.
        ServiceUnavailableError: the adapter is unreadable or the merge failed.
    """
    try:
        adapter_dir = storage.adapter_dir(settings, model.adapter_path)
        manifest = validate_adapter_dir(adapter_dir)
    except (InvalidAdapterError, OSError, StorageIntegrityError) as exc:
        # OSError: not in the store (or unreachable); the message names no path or key.
        reason = exc if isinstance(exc, InvalidAdapterError) else "it could not be fetched from storage"
        raise ServiceUnavailableError(f"The adapter of `{model.name}` is not readable: {reason}") from exc
    entry = catalog.get(model.base_model)
    if entry is None:
        raise ServiceUnavailableError(f"The base model `{model.base_model}` is no longer in the catalog.")
    try:
        if export_format == "peft":
            return archive_root(model.name) + ".tar", peft_export(adapter_dir, manifest, entry, model.name)
        merged = _stored_merge(settings, model, adapter_dir)
        if export_format == "gguf":
            from loraforge.adapters import gguf_export

            built = gguf_export.stored_gguf(settings, model, adapter_dir, merged)
            return archive_root(model.name, "-gguf") + ".tar", gguf_export.gguf_entries(
                built, entry, model.name
            )
    except AdapterExportError as exc:
        if export_format == "peft" or isinstance(exc, ExportRefusedError):
            raise InvalidRequestError(
                f"`{model.name}` cannot be exported: {exc}", param="model", code="model_not_exportable"
            ) from exc
        raise ServiceUnavailableError(f"Exporting `{model.name}` failed: {exc}") from exc
    return archive_root(model.name, "-merged") + ".tar", merged_export(merged, entry, model.name)


def _stored_merge(settings: Settings, model: ExportableModel, adapter_dir: Path) -> Path:
    """The merged weights of ``model``: this machine's copy, else the store's, else built now
    (and sealed into the store for the other machines)."""
    root = archive_root(model.name)
    local = settings.exports_dir / model.job_id / root
    key = f"{storage.EXPORTS}/{model.job_id}/{root}/merged"
    store = storage.open_store(settings)
    if not (local / "merged" / "config.json").is_file() and is_sealed(store, key):
        try:
            storage.local_cache(settings).copy_directory(key, local / "merged")
        except (OSError, StorageIntegrityError):
            shutil.rmtree(local / "merged", ignore_errors=True)  # built again below
    built = not (local / "merged" / "config.json").is_file()
    merged = ensure_merged(
        adapter_dir,
        local,
        python=settings.trainer_python or sys.executable,
        models_config=settings.models_config,
        models_dir=settings.models_dir,
    )
    if built or not is_sealed(store, key):
        put_dir(store, merged, key)
    return merged


def drop_cached_exports(settings: Settings, job_id: str) -> None:
    """Remove the exports of a job's models, here and in the store (its model was deleted)."""
    shutil.rmtree(settings.exports_dir / job_id, ignore_errors=True)
    storage.open_store(settings).delete_prefix(f"{storage.EXPORTS}/{job_id}")
