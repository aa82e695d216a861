"""The job's prepared (tokenized) data goes to the object store with its first checkpoint and
comes back on a host that has never seen the job; it leaves the store when the job ends."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import select

from loraforge.contracts.train_spec import DATA_PREPARED
from loraforge.db.models import JobEvent
from loraforge.db.session import make_engine, make_sessionmaker, session_scope
from loraforge.settings import Settings
from loraforge.storage import data_prefix, open_store
from loraforge.storage.sealed import sealed_children
from loraforge.worker import artefacts, data_sync
from tests.unit.test_recovery_races import new_job


def _prepare(settings: Settings, job_id: str, key: str, complete: bool = True) -> Path:
    folder = artefacts.data_dir(settings, job_id) / key
    folder.mkdir(parents=True)
    (folder / "part-00000.arrow").write_bytes(b"arrow rows " * 100)
    if complete:
        (folder / DATA_PREPARED).write_text('{"rows": 3, "parts": ["part-00000.arrow"]}')
    return folder


def test_prepared_data_travels_through_the_store_to_an_empty_host(
    tmp_path: Path, api: TestClient, make_key: Callable[[str], str], settings: Settings
) -> None:
    host_b = settings  # the API's home and database; host A shares only its store
    host_a = Settings(home=tmp_path / "host-a", storage_url=settings.blob_store_url)
    job_id = new_job(api, make_key("acme"))
    _prepare(host_a, job_id, "key1")
    _prepare(host_a, job_id, "half-written", complete=False)  # a trainer killed mid-preparation
    (artefacts.data_dir(host_a, job_id) / "checksums").mkdir()

    assert data_sync.upload_prepared(host_a, job_id) == [f"{data_prefix(job_id)}/key1"]
    assert data_sync.upload_prepared(host_a, job_id) == []  # a key's data never changes: stored once
    store = open_store(host_a)
    assert sealed_children(store, data_prefix(job_id)) == ["key1"]

    engine = make_engine(host_b)
    sessions = make_sessionmaker(engine)
    fetched = data_sync.restore_prepared(host_b, sessions, job_id)
    copy = artefacts.data_dir(host_b, job_id) / "key1"
    assert fetched > 0 and (copy / DATA_PREPARED).is_file()
    assert (copy / "part-00000.arrow").read_bytes() == b"arrow rows " * 100
    with session_scope(sessions) as session:
        messages = list(session.execute(select(JobEvent.message).where(JobEvent.job_id == job_id)).scalars())
    assert any(m.startswith("Fetched the prepared training data from the object store") for m in messages)
    assert data_sync.restore_prepared(host_b, sessions, job_id) == 0  # already here: nothing fetched

    engine.dispose()
    data_sync.drop_prepared(host_a, job_id)
    assert sealed_children(store, data_prefix(job_id)) == [] and not store.exists(data_prefix(job_id))
