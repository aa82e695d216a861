"""A blob store over fsspec: a local directory in the embedded default, an S3-compatible object
store (``s3://bucket/prefix``) at scale (``LORAFORGE_STORAGE_URL``).

Keys are relative POSIX paths (``files/org-1/file-abc``) under the store's root. Every write is
atomic -- a blob is whole or absent: on a local disk a temporary sibling is renamed into place; on
an object store the object is one PUT or one multipart upload, which the store makes visible only
when it completes (an upload that fails is aborted, never completed). Each blob written through
:meth:`BlobStore.write_stream` or :meth:`BlobStore.put_file` gets a ``<key>.sha256`` sidecar, so
a copy on another machine can be checked (:mod:`loraforge.storage.cache`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import fsspec

from loraforge.ids import random_token

CHUNK = 1024 * 1024
SIDECAR = ".sha256"
# Objects up to this size are written with one PUT; larger ones with a multipart upload.
SMALL = 8 * 1024 * 1024


class BlobStore:
    """Blobs under ``root``: a local directory or any fsspec URL.

    Args:
        root: a local path, ``file://...`` or ``s3://bucket/prefix``. An S3 store reads the standard
            ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and
            ``AWS_DEFAULT_REGION`` (botocore does); its bucket is created if it is missing and
            the credentials allow it.
    """

    def __init__(self, root: str) -> None:
        self.url = root
        # Many processes on many machines write the store: a listing cached here would go on
        # answering ``exists``/``names`` for what another process has since deleted or written.
        remote = "://" in root and not root.startswith("file://")
        self.fs, self.root = fsspec.core.url_to_fs(root, **({"use_listings_cache": False} if remote else {}))
        self.is_local = "file" in self.fs.protocol
        try:
            self.fs.makedirs(self.root, exist_ok=True)
        except Exception:  # noqa: BLE001 - unreachable or not ours to create: ping() says which
            # A process must start while the store is down (the API reports itself not ready).
            pass

    def _path(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"bad blob key {key!r}")
        return posixpath.join(self.root, key)

    def local_path(self, key: str) -> str:
        """The path a local process can open (only meaningful for a local root)."""
        return self._path(key)

    # ------------------------------------------------------------------------------ writing
    def write_stream(self, key: str, chunks: Iterator[bytes], *, checksum: bool = True) -> int:
        """Write ``chunks`` to ``key`` atomically; return the byte count.

        If the iterator raises (size limit, bad content), nothing is left behind.

        Args:
            key: the blob's key.
            chunks: its bytes.
            checksum: also write the ``<key>.sha256`` sidecar (not for transient blobs such as
                upload parts, whose assembled file gets one).
        """
        total, digest = self._write_atomic(key, chunks)
        if checksum:
            self._write_atomic(key + SIDECAR, iter([digest.encode()]))
        return total

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write a small blob atomically (no sidecar: for markers and seals)."""
        self._write_atomic(key, iter([data]))

    def put_file(self, local: Path, key: str, *, sidecar: bool = True) -> tuple[int, str]:
        """Copy the local file ``local`` to ``key`` (atomic; with its checksum sidecar if ``sidecar``).

        On a local store the file is hard-linked when it can be (same disk): the trainer never
        rewrites a file in place, so the link is a free copy.

        Returns:
            Its size and sha256.
        """
        if self.is_local and _try_link(local, Path(self._path(key))):
            size, digest = local.stat().st_size, _sha256_file(local)
        else:
            size, digest = self._write_atomic(key, _read_chunks(local))
        if sidecar:
            self._write_atomic(key + SIDECAR, iter([digest.encode()]))
        return size, digest

    def _write_atomic(self, key: str, chunks: Iterator[bytes]) -> tuple[int, str]:
        """Write ``key`` so that it is whole or absent; return its size and sha256."""
        final = self._path(key)
        digest = hashlib.sha256()
        total = 0

        def counted() -> Iterator[bytes]:
            nonlocal total
            for chunk in chunks:
                digest.update(chunk)
                total += len(chunk)
                yield chunk

        if self.is_local:
            self._write_local(final, counted())
        else:
            self._write_object(final, counted())
        return total, digest.hexdigest()

    def _write_local(self, final: str, chunks: Iterator[bytes]) -> None:
        # A temporary sibling renamed into place: rename is atomic on one disk.
        tmp = posixpath.join(posixpath.dirname(final), f".tmp-{random_token(12)}")
        self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
        try:
            with self.fs.open(tmp, "wb") as out:
                for chunk in chunks:
                    out.write(chunk)
            self.fs.mv(tmp, final)
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
            raise

    def _write_object(self, final: str, chunks: Iterator[bytes]) -> None:
        # Up to SMALL bytes: one PUT (an object store shows a PUT whole or not at all). Beyond: one
        # multipart upload that becomes visible only on commit, and is aborted on any error.
        head = bytearray()
        for chunk in chunks:
            head += chunk
            if len(head) >= SMALL:
                break
        else:
            self.fs.pipe_file(final, bytes(head))
            return
        out = self.fs.open(final, "wb", autocommit=False)
        try:
            out.write(bytes(head))
            for chunk in chunks:
                out.write(chunk)
            out.close()
            out.commit()
        except BaseException:
            with contextlib.suppress(Exception):  # best effort: the upload was never completed
                out.discard()
            raise

    # ------------------------------------------------------------------------------ reading
    def open(self, key: str) -> IO[Any]:
        """Open ``key`` for reading (binary)."""
        return self.fs.open(self._path(key), "rb")

    def iter_bytes(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """The blob's bytes in chunks."""
        with self.open(key) as fh:
            while chunk := fh.read(chunk_size):
                yield chunk

    def read_bytes(self, key: str) -> bytes:
        """A small blob's bytes.

        Raises:
            FileNotFoundError: no such blob.
        """
        data: bytes = self.fs.cat_file(self._path(key))
        return data

    def checksum(self, key: str) -> str | None:
        """The sha256 recorded when ``key`` was written, or None (a blob from before sidecars)."""
        try:
            return self.read_bytes(key + SIDECAR).decode().strip() or None
        except FileNotFoundError:
            return None

    def size(self, key: str) -> int:
        """The blob's size in bytes.

        Raises:
            FileNotFoundError: no such blob.
        """
        return int(self.fs.size(self._path(key)))

    def exists(self, key: str) -> bool:
        """Whether a blob (or, for a prefix, anything under it) exists."""
        return bool(self.fs.exists(self._path(key)))

    def names(self, prefix: str) -> list[str]:
        """The names directly under ``prefix`` (files and sub-prefixes), sorted; [] if none."""
        try:
            entries = self.fs.ls(self._path(prefix), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        names = {posixpath.basename(str(entry).rstrip("/")) for entry in entries}
        return sorted(name for name in names if name and not name.startswith(".tmp-"))

    def find(self, prefix: str) -> list[str]:
        """Every blob key under ``prefix`` (recursively), relative to the root, sorted."""
        try:
            found = self.fs.find(self._path(prefix))
        except FileNotFoundError:
            return []
        root = self.root.rstrip("/") + "/"
        return sorted(str(path).removeprefix(root) for path in found)

    def get_file(self, key: str, local: Path) -> str:
        """Download ``key`` to ``local`` (overwritten); return the sha256 of what was written."""
        digest = hashlib.sha256()
        local.parent.mkdir(parents=True, exist_ok=True)
        with local.open("wb") as out:
            for chunk in self.iter_bytes(key):
                digest.update(chunk)
                out.write(chunk)
        return digest.hexdigest()

    # ----------------------------------------------------------------------------- deleting
    def delete(self, key: str) -> None:
        """Remove the blob ``key`` and its sidecar, or everything under the prefix ``key``."""
        path = self._path(key)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)
        sidecar = path + SIDECAR
        if self.fs.exists(sidecar):
            self.fs.rm(sidecar)

    def delete_prefix(self, prefix: str) -> None:
        """Remove everything under ``prefix`` (e.g. ``checkpoints/ftjob-1``); nothing there is fine.

        Args:
            prefix: a key prefix, without trailing slash.
        """
        path = self._path(prefix)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)
        with contextlib.suppress(FileNotFoundError):  # a local store leaves the empty directory
            if self.is_local and os.path.isdir(path):
                shutil.rmtree(path)

    # ------------------------------------------------------------------------------- health
    def ping(self) -> None:
        """A cheap check that the store answers (the API's readiness probe).

        Raises:
            OSError: the store cannot be listed (unreachable, no such bucket, no permission).
        """
        if self.is_local:
            if not os.path.isdir(self.root):
                raise FileNotFoundError("the blob store's folder is missing")
            return
        try:
            # One listing of the bucket's top level: the bucket exists and the credentials work.
            self.fs.ls(self.root.split("/", 1)[0], detail=False, refresh=True)
        except OSError:
            raise
        except Exception as exc:  # botocore's own errors are not OSErrors
            raise OSError(f"the object store does not answer: {exc}") from exc


def _read_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            yield chunk


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    for chunk in _read_chunks(path):
        digest.update(chunk)
    return digest.hexdigest()


def _try_link(source: Path, target: Path) -> bool:
    """Hard-link ``source`` at ``target`` (replacing it atomically); False if links cannot be made."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{random_token(12)}"
    try:
        os.link(source, tmp)
    except OSError:
        return False
    os.replace(tmp, target)
    return True
