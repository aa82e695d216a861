"""Local copies of what is in the blob store, checked against its checksums.

A worker reads training files and parent adapters, an engine reads adapters, the API reads
adapters for export: each through a :class:`LocalCache` under its own home
(``$LORAFORGE_HOME/cache``). The cache may be deleted at any time; what is missing is fetched
again. A copy is trusted only if it was checked when it was fetched:

* a file against its ``.sha256`` sidecar (:meth:`BlobStore.write_stream`), and its size;
* a sealed directory file by file against its seal (:mod:`loraforge.storage.sealed`).

Downloads go to a temporary sibling that is renamed into place, so a crash never leaves a copy
that looks whole. A cached copy is reused while the store still has the same checksum (a key
rewritten in the store is fetched again). With a local store (the embedded default) nothing is
copied: the store's own files are the ones read.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from loraforge.storage.blobs import BlobStore
from loraforge.storage.sealed import Seal, read_seal


class StorageIntegrityError(ValueError):
    """What was fetched does not match the checksum the store recorded for it."""


@contextlib.contextmanager
def store_errors() -> Iterator[None]:
    """Report a store that does not answer as an ``OSError`` whatever the client raised.

    s3fs turns S3's answers into ``FileNotFoundError``/``PermissionError``, but a connection that
    fails surfaces as botocore's own exceptions; callers tell "missing" (fail) from "unreachable"
    (wait and retry) by ``OSError`` alone.
    """
    try:
        yield
    except (OSError, ValueError):
        raise
    except Exception as exc:
        raise OSError(f"the object store did not answer: {type(exc).__name__}: {exc}") from exc


class LocalCache:
    """Copies of blobs (:meth:`file`) and sealed directories (:meth:`directory`) under ``root``.

    Args:
        store: the blob store the copies come from.
        root: the cache directory on this machine.
    """

    def __init__(self, store: BlobStore, root: Path) -> None:
        self.store = store
        self.root = root
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    # -------------------------------------------------------------------------------- files
    def file(self, key: str) -> Path:
        """A local, checked copy of the blob ``key``.

        Raises:
            FileNotFoundError: the store has no such blob.
            StorageIntegrityError: the download does not match the blob's recorded checksum.
            OSError: the store did not answer.
        """
        with store_errors():
            return self._file(key)

    def _file(self, key: str) -> Path:
        if self.store.is_local:
            path = Path(self.store.local_path(key))
            if not path.is_file():
                raise FileNotFoundError(f"no blob {key!r} in the store")
            return path
        expected = self.store.checksum(key)
        size = self.store.size(key)  # FileNotFoundError when absent
        final = self.root / "blobs" / key
        record = final.with_name(final.name + ".sha256")
        with self._lock(key):
            if (
                expected is not None
                and final.is_file()
                and final.stat().st_size == size
                and _read(record) == expected
            ):
                return final
            final.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{final.name}.partial-", dir=final.parent)
            tmp = Path(name)
            try:
                digest = self.store.get_file(key, tmp)
                if expected is not None and digest != expected:
                    raise StorageIntegrityError(f"blob {key!r} does not match its recorded checksum")
                if tmp.stat().st_size != size:
                    raise StorageIntegrityError(f"blob {key!r} is {tmp.stat().st_size} bytes, not {size}")
                tmp.replace(final)
                record.write_text(digest)
            finally:
                tmp.unlink(missing_ok=True)
                _close(fd)
            return final

    # -------------------------------------------------------------------------- directories
    def directory(self, key: str) -> Path:
        """A local, checked copy of the sealed directory ``key``.

        Raises:
            FileNotFoundError: the store has no complete (sealed) directory there.
            StorageIntegrityError: a file does not match the seal.
            OSError: the store did not answer.
        """
        with store_errors():
            return self._directory(key)

    def _directory(self, key: str) -> Path:
        seal = read_seal(self.store, key)
        if seal is None:
            raise FileNotFoundError(f"no complete directory {key!r} in the store")
        if self.store.is_local:
            path = Path(self.store.local_path(key))
            _check_sizes(path, seal, key)
            return path
        final = self.root / "dirs" / key
        marker = final.with_name(final.name + ".sealed.json")
        with self._lock(key):
            if _read(marker) == seal.to_json().decode() and _sizes_match(final, seal):
                return final
            marker.unlink(missing_ok=True)
            self._download(key, seal, final)
            marker.write_text(seal.to_json().decode())
            return final

    def copy_directory(self, key: str, dest: Path) -> int:
        """A checked copy of the sealed directory ``key`` at ``dest`` (which it replaces), not cached.

        Args:
            key: the sealed directory.
            dest: where it goes (e.g. a run's ``checkpoints/step-0000010``).

        Returns:
            The bytes copied.

        Raises:
            FileNotFoundError: the store has no complete directory there.
            StorageIntegrityError: a file does not match the seal.
            OSError: the store did not answer.
        """
        with store_errors():
            seal = read_seal(self.store, key)
            if seal is None:
                raise FileNotFoundError(f"no complete directory {key!r} in the store")
            self._download(key, seal, dest)
        return sum(f.size for f in seal.files.values())

    def _download(self, key: str, seal: Seal, final: Path) -> None:
        """Fetch every file of ``key`` into a temporary sibling of ``final``, check it, rename it."""
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
        try:
            for name, expected in seal.files.items():
                digest = self.store.get_file(f"{key}/{name}", tmp / name)
                if digest != expected.sha256:
                    raise StorageIntegrityError(f"{key}/{name} does not match its seal")
            tmp.chmod(0o755)  # mkdtemp makes it private; an engine may run as another user
            _replace_dir(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def forget(self, key: str) -> None:
        """Drop the cached copy of ``key`` (a file or a directory), if any."""
        for path in (self.root / "blobs" / key, self.root / "dirs" / key):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            path.with_name(path.name + ".sha256").unlink(missing_ok=True)
            path.with_name(path.name + ".sealed.json").unlink(missing_ok=True)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _sizes_match(folder: Path, seal: Seal) -> bool:
    try:
        return all((folder / name).stat().st_size == f.size for name, f in seal.files.items())
    except OSError:
        return False


def _check_sizes(folder: Path, seal: Seal, key: str) -> None:
    if not _sizes_match(folder, seal):
        raise StorageIntegrityError(f"{key} does not match its seal (a file is missing or truncated)")


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first, then removed."""
    if final.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        final.rename(trash / final.name)
        tmp.rename(final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        try:
            tmp.rename(final)
        except OSError:
            # Another process (the engine and a worker share a home under ``serve``) put the same
            # sealed directory there first: keep its copy.
            if not final.is_dir():
                raise


__all__ = ["LocalCache", "StorageIntegrityError"]
