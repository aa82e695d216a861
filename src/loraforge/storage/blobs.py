"""A blob store over fsspec: a local directory in the embedded default, any fsspec URL
(``s3://bucket/prefix``) at scale. Writes are atomic: a blob is either whole or absent."""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from typing import IO, Any

import fsspec

from loraforge.ids import random_token

CHUNK = 1024 * 1024


class BlobStore:
    """Keys are relative POSIX paths (``files/file-abc``) under ``root``."""

    def __init__(self, root: str) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(root)
        self.fs.makedirs(self.root, exist_ok=True)

    def _path(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"bad blob key {key!r}")
        return posixpath.join(self.root, key)

    def local_path(self, key: str) -> str:
        """The path a local process can open (only meaningful for a local root)."""
        return self._path(key)

    def write_stream(self, key: str, chunks: Iterator[bytes]) -> int:
        """Write ``chunks`` to ``key`` atomically; return the byte count.

        If the iterator raises (size limit, bad content), nothing is left behind.
        """
        final = self._path(key)
        tmp = posixpath.join(posixpath.dirname(final), f".tmp-{random_token(12)}")
        self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
        total = 0
        try:
            with self.fs.open(tmp, "wb") as out:
                for chunk in chunks:
                    out.write(chunk)
                    total += len(chunk)
            self.fs.mv(tmp, final)
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
            raise
        return total

    def open(self, key: str) -> IO[Any]:
        return self.fs.open(self._path(key), "rb")

    def iter_bytes(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        with self.open(key) as fh:
            while chunk := fh.read(chunk_size):
                yield chunk

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self._path(key)))

    def delete(self, key: str) -> None:
        path = self._path(key)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)
