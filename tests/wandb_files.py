"""Read an offline W&B run back from its files (``wandb/offline-run-*/run-*.wandb``).

The run file is W&B's record log: a 7-byte header (``:W&B``, magic, version) then LevelDB's log
format (32 KiB blocks of chunks, each ``crc32 | length | type``: full, first, middle, last), each
record a ``wandb_internal_pb2.Record``. wandb 0.31 no longer ships a Python reader, so this is it.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_BLOCK, _HEADER = 32768, 7


def records(path: Path) -> Iterator[Any]:
    """The records of a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # a block's trailer: padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        pending += data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


@dataclass
class OfflineRun:
    """What an offline run logged: its id, project, initial config, history rows, summary, config updates."""

    run_id: str = ""
    project: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def _key(item: Any) -> str:
    # wandb writes a plain key, or the path of a nested one.
    return str(item.key or "/".join(item.nested_key))


def _finished(files: list[Path]) -> bool:
    return bool(files) and any(r.WhichOneof("record_type") == "exit" for r in records(files[-1]))


def read_run(directory: Path, timeout: float = 30.0) -> OfflineRun:
    """The offline run under ``directory`` (its ``wandb/offline-run-*`` folders, oldest first),
    once its last file holds the run's exit record (wandb's service writes the file out shortly
    after ``run.finish()`` returns)."""
    run = OfflineRun()
    deadline = time.monotonic() + timeout
    files = sorted(directory.glob("wandb/offline-run-*/run-*.wandb"))
    while not _finished(files) and time.monotonic() < deadline:
        time.sleep(0.2)
        files = sorted(directory.glob("wandb/offline-run-*/run-*.wandb"))
    assert _finished(files), f"no finished offline W&B run under {directory}: {files}"
    for path in files:
        for record in records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.run_id, run.project, run.tags = (
                    record.run.run_id,
                    record.run.project,
                    list(record.run.tags),
                )
                for item in record.run.config.update:
                    run.config[item.key] = json.loads(item.value_json)
            elif kind == "config":
                for item in record.config.update:
                    run.config[item.key] = json.loads(item.value_json)
            elif kind == "history":
                run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
            elif kind == "summary":
                run.summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
    return run
