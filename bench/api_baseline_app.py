"""The baseline of ``bench/api_load.py``: a bare FastAPI app that checks a bearer key against one
SQLite row per request and answers a small JSON list, on the same four paths loraforge serves.

It is what any FastAPI + SQLite service costs on this machine: one uvicorn process, sync routes
on Starlette's thread pool, one SQLite connection per thread (WAL), no middleware. Run by
``api_load.py`` as ``uvicorn api_baseline_app:app`` with ``BASELINE_DB`` naming the database file.
"""

from __future__ import annotations

import os
import sqlite3
import threading

from fastapi import FastAPI, Header, HTTPException

app = FastAPI()
_local = threading.local()


def _db() -> sqlite3.Connection:
    conn = getattr(_local, "conn", None)
    if conn is None:
        conn = _local.conn = sqlite3.connect(os.environ["BASELINE_DB"], check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
    return conn


def init_db(path: str, key: str) -> None:
    """Create the one table and the key's row."""
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS keys (key TEXT PRIMARY KEY, org TEXT)")
        conn.execute("INSERT OR REPLACE INTO keys VALUES (?, ?)", (key, "org-bench"))


def _page(authorization: str | None, kind: str) -> dict[str, object]:
    key = (authorization or "").removeprefix("Bearer ").strip()
    row = _db().execute("SELECT org FROM keys WHERE key = ?", (key,)).fetchone()
    if row is None:
        raise HTTPException(401, "bad key")
    return {"object": "list", "data": [{"id": f"{kind}-1", "object": kind, "owned_by": row[0]}]}


@app.get("/v1/models")
def models(authorization: str | None = Header(None)) -> dict[str, object]:
    return _page(authorization, "model")


@app.get("/v1/files")
def files(authorization: str | None = Header(None)) -> dict[str, object]:
    return _page(authorization, "file")


@app.get("/v1/fine_tuning/jobs")
def jobs(authorization: str | None = Header(None)) -> dict[str, object]:
    return _page(authorization, "fine_tuning.job")


@app.get("/v1/fine_tuning/jobs/{job_id}/events")
def events(job_id: str, authorization: str | None = Header(None)) -> dict[str, object]:
    return _page(authorization, "fine_tuning.job.event")


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}
