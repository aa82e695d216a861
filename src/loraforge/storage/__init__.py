"""Where everything durable lives: the blob store (``LORAFORGE_STORAGE_URL``) and the keys in it.

::

    files/{org_id}/{file_id}                 uploaded files and result files (+ ``.sha256``)
    uploads/{upload_id}/{part_id}            parts of a chunked upload, until it completes
    checkpoints/{job_id}/step-NNNNNNN/       sealed: adapter + training state of one checkpoint
    adapters/{job_id}/                       sealed: a job's final adapter
    exports/{job_id}/{name}/merged/          sealed: merged weights built for an export

The store is a directory under ``$LORAFORGE_HOME`` by default and an S3-compatible object store
with ``s3://bucket/prefix``. Every process keeps its own local copies under
``$LORAFORGE_HOME/cache`` (:class:`LocalCache`); they may be deleted at any time. The registry
and the checkpoint rows hold keys (``adapters/ftjob-…``), never a host's paths; the engines
resolve a key themselves (``lora_path`` of the adapter protocol is a key).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from loraforge.storage.blobs import BlobStore
from loraforge.storage.cache import LocalCache, StorageIntegrityError

if TYPE_CHECKING:  # the engine's benchmark runs without pydantic-settings
    from loraforge.settings import Settings

ADAPTERS = "adapters"
CHECKPOINTS = "checkpoints"
EXPORTS = "exports"
DATA = "data"
_ID = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"
# What an adapter reference may be: a final adapter or a checkpoint of a job; nothing else.
ADAPTER_REF = re.compile(rf"^(?:{ADAPTERS}/{_ID}|{CHECKPOINTS}/{_ID}/step-\d{{1,12}})$")


def adapter_key(job_id: str) -> str:
    """The key of a job's final adapter."""
    return f"{ADAPTERS}/{job_id}"


def checkpoints_prefix(job_id: str) -> str:
    """The prefix under which a job's checkpoints live."""
    return f"{CHECKPOINTS}/{job_id}"


def data_prefix(job_id: str) -> str:
    """The prefix under which a job's tokenized training data lives (one sealed directory per
    cache key: what a run resumed on another host reuses instead of tokenizing again)."""
    return f"{DATA}/{job_id}"


def checkpoint_key(job_id: str, dir_name: str) -> str:
    """The key of one checkpoint, by its directory name (``step-0000010``)."""
    return f"{CHECKPOINTS}/{job_id}/{dir_name}"


def is_adapter_ref(value: str) -> bool:
    """Whether ``value`` is an adapter key in the store (not a path, not anything else)."""
    return bool(ADAPTER_REF.match(value))


def working_copy(settings: Settings, ref: str) -> Path:
    """Where a trainer on this machine wrote the adapter ``ref`` before it went to the store
    (``adapters_dir/<job>``, ``runs_dir/<job>/checkpoints/step-N``); it may not exist here."""
    kind, job_id, *rest = ref.split("/")
    if kind == ADAPTERS:
        return settings.adapters_dir / job_id
    return settings.runs_dir / job_id / CHECKPOINTS / rest[0]


def is_legacy_path(value: str) -> bool:
    """A host path stored by a version before the object store (still read on that host)."""
    return value.startswith("/")


@lru_cache(maxsize=8)
def _store(url: str) -> BlobStore:
    return BlobStore(url)


def open_store(settings: Settings) -> BlobStore:
    """This process's blob store for ``settings`` (one per URL, kept for the process's life)."""
    return _store(settings.blob_store_url)


@lru_cache(maxsize=8)
def _cache(url: str, root: str) -> LocalCache:
    return LocalCache(_store(url), Path(root))


def local_cache(settings: Settings) -> LocalCache:
    """This process's cache of store contents (under ``$LORAFORGE_HOME/cache``)."""
    return _cache(settings.blob_store_url, str(settings.cache_dir))


def probe(settings: Settings) -> None:
    """Check that the object store answers (for readiness checks); cheap: one listing at most.

    Raises:
        OSError: it does not (the message says why).
    """
    open_store(settings).ping()


def adapter_dir(settings: Settings, ref: str) -> Path:
    """A local directory holding the adapter ``ref`` (a store key, or a legacy host path).

    Raises:
        FileNotFoundError: no complete adapter there.
        StorageIntegrityError: the download does not match the store's checksums.
    """
    if is_legacy_path(ref):
        path = Path(ref)
        if not path.is_dir():
            raise FileNotFoundError("the adapter's directory is not on this machine")
        return path
    return local_cache(settings).directory(ref)


__all__ = [
    "ADAPTERS",
    "ADAPTER_REF",
    "CHECKPOINTS",
    "EXPORTS",
    "BlobStore",
    "LocalCache",
    "StorageIntegrityError",
    "adapter_dir",
    "adapter_key",
    "checkpoint_key",
    "checkpoints_prefix",
    "is_adapter_ref",
    "is_legacy_path",
    "local_cache",
    "open_store",
    "probe",
]
