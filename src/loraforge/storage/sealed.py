"""Sealed directories: a directory in the blob store that readers trust only once it is complete.

An adapter, a checkpoint or a merged export is several files. They are uploaded one by one, then
``_sealed.json`` is written last, listing every file with its size and sha256::

    checkpoints/ftjob-abc/step-0000010/
        adapter_config.json  adapter_model.safetensors  manifest.json
        checkpoint.json  trainer_state.pt
        _sealed.json         {"format": 1, "files": {"adapter_model.safetensors": {"size", "sha256"}, ...}}

A crash mid-upload leaves files without a seal: never listed, never fetched, overwritten by the
next upload and swept by :func:`delete_dir`. Replacing a sealed directory removes its seal first,
so a reader never trusts a half-replaced one. Readers check every file they download against the
seal (:mod:`loraforge.storage.cache`).
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from pathlib import Path

from loraforge.storage.blobs import SIDECAR, BlobStore

SEAL = "_sealed.json"
FORMAT = 1


@dataclass(frozen=True)
class SealedFile:
    """One file of a sealed directory."""

    size: int
    sha256: str


@dataclass(frozen=True)
class Seal:
    """What ``_sealed.json`` says: the complete directory's files (relative POSIX names)."""

    files: dict[str, SealedFile]

    def to_json(self) -> bytes:
        """The seal's file content."""
        body = {
            "format": FORMAT,
            "files": {name: {"size": f.size, "sha256": f.sha256} for name, f in sorted(self.files.items())},
        }
        return json.dumps(body, indent=2).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Seal:
        """Parse a seal.

        Raises:
            ValueError: not a seal of a known format.
        """
        raw = json.loads(data)
        if not isinstance(raw, dict) or raw.get("format") != FORMAT or not isinstance(raw.get("files"), dict):
            raise ValueError("not a seal")
        files = {
            str(name): SealedFile(size=int(entry["size"]), sha256=str(entry["sha256"]))
            for name, entry in raw["files"].items()
        }
        for name in files:
            if name.startswith("/") or ".." in name.split("/"):
                raise ValueError(f"seal names a file outside its directory: {name!r}")
        return cls(files)


def _local_files(local_dir: Path) -> list[Path]:
    """The files of ``local_dir`` to upload (hidden temporaries of a writer are not part of it)."""
    return sorted(
        path
        for path in local_dir.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(local_dir).parts)
    )


def put_dir(store: BlobStore, local_dir: Path, key: str) -> Seal:
    """Upload ``local_dir`` to ``key`` and seal it (a sealed ``key`` is replaced).

    Args:
        store: the blob store.
        local_dir: a complete local directory (an adapter, a checkpoint, a merged model).
        key: where it goes, e.g. ``adapters/ftjob-abc``.

    Returns:
        The seal written.
    """
    unseal(store, key)
    files: dict[str, SealedFile] = {}
    for path in _local_files(local_dir):
        name = path.relative_to(local_dir).as_posix()
        size, digest = store.put_file(path, f"{key}/{name}", sidecar=False)  # the seal has it
        files[name] = SealedFile(size=size, sha256=digest)
    seal = Seal(files)
    store.write_bytes(f"{key}/{SEAL}", seal.to_json())
    return seal


def read_seal(store: BlobStore, key: str) -> Seal | None:
    """The seal of the directory at ``key``; None when it is absent, partial or unreadable."""
    try:
        return Seal.from_json(store.read_bytes(f"{key}/{SEAL}"))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def is_sealed(store: BlobStore, key: str) -> bool:
    """Whether ``key`` is a complete (sealed) directory."""
    return read_seal(store, key) is not None


def unseal(store: BlobStore, key: str) -> None:
    """Remove the seal of ``key``: from now on readers ignore the directory."""
    store.delete(f"{key}/{SEAL}")


def delete_dir(store: BlobStore, key: str) -> None:
    """Delete the directory at ``key``: the seal first, so a crash half-way leaves no trusted copy."""
    unseal(store, key)
    store.delete_prefix(key)


def drop_file(store: BlobStore, key: str, name: str) -> None:
    """Remove one file from a sealed directory (re-sealed without it first, then deleted).

    Args:
        store: the blob store.
        key: the sealed directory.
        name: the file's relative name; nothing happens if the seal does not list it.
    """
    seal = read_seal(store, key)
    if seal is None or name not in seal.files:
        return
    kept = Seal({n: f for n, f in seal.files.items() if n != name})
    store.write_bytes(f"{key}/{SEAL}", kept.to_json())
    store.delete(f"{key}/{name}")


def sealed_children(store: BlobStore, prefix: str) -> list[str]:
    """The names under ``prefix`` that are sealed directories, sorted.

    Args:
        store: the blob store.
        prefix: e.g. ``checkpoints/ftjob-abc``.
    """
    return [
        name
        for name in store.names(prefix)
        if not name.endswith(SIDECAR) and is_sealed(store, posixpath.join(prefix, name))
    ]


__all__ = [
    "SEAL",
    "Seal",
    "SealedFile",
    "delete_dir",
    "drop_file",
    "is_sealed",
    "put_dir",
    "read_seal",
    "sealed_children",
    "unseal",
]
