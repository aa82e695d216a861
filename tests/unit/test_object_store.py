"""The blob store (local folder and S3 through moto's server), sealed directories, checked caches,
and the worker's side of the store: checkpoints mirrored while a job runs and restored on a
machine that has never seen the job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from loraforge.contracts.trainer_events import CheckpointEvent, StepMetrics
from loraforge.db.models import JobCheckpoint, JobEvent
from loraforge.db.session import make_engine, make_sessionmaker, session_scope
from loraforge.ids import now
from loraforge.serving.adapter_store import AdapterStore
from loraforge.serving.errors import AdapterNotFound, InvalidAdapter
from loraforge.settings import Settings
from loraforge.storage import BlobStore, LocalCache, StorageIntegrityError, is_adapter_ref
from loraforge.storage.sealed import SEAL, drop_file, put_dir, read_seal, sealed_children
from loraforge.worker import store_sync
from tests.s3 import S3Server
from tests.unit.test_lifecycle import new_job, set_job


def make_dir(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


def checkpoint(root: Path, step: int) -> Path:
    """A checkpoint directory as the trainer writes it (contents are opaque to the store)."""
    return make_dir(
        root / f"step-{step:07d}",
        {
            "adapter_config.json": b"{}",
            "adapter_model.safetensors": b"w" * 100 + bytes([step]),
            "manifest.json": b"{}",
            "checkpoint.json": json.dumps({"step": step}).encode(),
            "trainer_state.pt": b"s" * 50 + bytes([step]),
        },
    )


# --------------------------------------------------------------------------- local folder


def test_local_writes_are_atomic_with_a_checksum_sidecar(tmp_path: Path) -> None:
    store = BlobStore(str(tmp_path / "store"))
    assert store.write_stream("files/o/f1", iter([b"ab", b"cd"])) == 4
    assert store.read_bytes("files/o/f1") == b"abcd"
    assert store.checksum("files/o/f1") == "88d4266fd4e6338d13b845fcf289579d209c897823b9217da3e161936f031589"

    def failing() -> Iterator[bytes]:
        yield b"half"
        raise ValueError("too big")

    with pytest.raises(ValueError):
        store.write_stream("files/o/f2", failing())
    assert store.names("files/o") == ["f1", "f1.sha256"]  # nothing of f2, not even a temp file
    store.delete("files/o/f1")
    assert store.names("files/o") == []
    with pytest.raises(ValueError):
        store.write_bytes("../escape", b"x")


def test_sealed_directory_is_trusted_only_once_complete(tmp_path: Path) -> None:
    store = BlobStore(str(tmp_path / "store"))
    local = checkpoint(tmp_path / "run", 5)
    seal = put_dir(store, local, "checkpoints/ftjob-1/step-0000005")
    assert set(seal.files) == {p.name for p in local.iterdir()}
    # A hard link on the same disk: the embedded default copies nothing.
    stored = Path(store.local_path("checkpoints/ftjob-1/step-0000005/trainer_state.pt"))
    assert stored.stat().st_ino == (local / "trainer_state.pt").stat().st_ino
    # An upload that died before its seal: files, no seal -> not a checkpoint.
    for name in ("adapter_model.safetensors", "manifest.json"):
        store.put_file(local / name, f"checkpoints/ftjob-1/step-0000010/{name}")
    assert sealed_children(store, "checkpoints/ftjob-1") == ["step-0000005"]
    drop_file(store, "checkpoints/ftjob-1/step-0000005", "trainer_state.pt")
    assert "trainer_state.pt" not in read_seal(store, "checkpoints/ftjob-1/step-0000005").files
    assert not stored.exists() and (local / "trainer_state.pt").exists()  # only the store's name went
    store.delete_prefix("checkpoints/ftjob-1")
    assert store.names("checkpoints") == []


def test_adapter_refs_are_keys_never_paths() -> None:
    good = ["adapters/ftjob-abc", "checkpoints/ftjob-abc/step-0000010"]
    bad = ["/tmp/x", "adapters/../x", "adapters/a/b", "files/o/f", "checkpoints/j/7", "", "adapters/"]
    assert all(map(is_adapter_ref, good)) and not any(map(is_adapter_ref, bad))


def test_serve_gives_its_children_an_engine_key(settings: Settings) -> None:
    from loraforge.cli import serve_children_env

    envs = serve_children_env(settings.model_copy(update={"engine_api_key": ""}))
    keys = {envs[child]["LORAFORGE_ENGINE_API_KEY"] for child in ("api", "worker", "engine")}
    assert len(keys) == 1 and len(keys.pop()) >= 32
    # A configured key is not replaced: the children read it from the same environment.
    again = serve_children_env(settings.model_copy(update={"engine_api_key": "mine"}))
    assert again["engine"].get("LORAFORGE_ENGINE_API_KEY") == os.environ.get("LORAFORGE_ENGINE_API_KEY")


# --------------------------------------------------------------------------- S3 (moto)


@pytest.fixture
def s3_store(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> BlobStore:
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return BlobStore(s3_server.new_url())


@pytest.mark.slow  # moto's server
def test_s3_store_and_checked_cache(s3_store: BlobStore, tmp_path: Path) -> None:
    s3_store.ping()
    s3_store.write_stream("files/o/data.jsonl", iter([b'{"a": 1}\n'] * 1000))
    cache = LocalCache(s3_store, tmp_path / "cache")
    copy = cache.file("files/o/data.jsonl")
    assert copy.read_bytes() == b'{"a": 1}\n' * 1000 and copy.is_relative_to(tmp_path / "cache")
    assert cache.file("files/o/data.jsonl") == copy  # reused while the store's checksum holds
    # Corrupt the cached copy: it is fetched again, not trusted.
    copy.write_bytes(b"garbage")
    assert cache.file("files/o/data.jsonl").read_bytes() == b'{"a": 1}\n' * 1000
    # A blob whose bytes do not match what the writer recorded is refused.
    s3_store.write_stream("files/o/bad", iter([b"original"]))
    s3_store.write_bytes("files/o/bad", b"tampered")
    with pytest.raises(StorageIntegrityError):
        cache.file("files/o/bad")
    assert not (tmp_path / "cache" / "blobs" / "files" / "o" / "bad").exists()
    with pytest.raises(FileNotFoundError):
        cache.file("files/o/none")
    # Large blobs go up as one multipart upload: visible when complete, absent after a failure.
    block = b"x" * (1024 * 1024)

    def big(fail: bool) -> Iterator[bytes]:
        for _ in range(10):
            yield block
        if fail:
            raise ValueError("the client went away")

    with pytest.raises(ValueError):
        s3_store.write_stream("files/o/big-failed", big(fail=True))
    assert not s3_store.exists("files/o/big-failed")
    assert s3_store.write_stream("files/o/big", big(fail=False)) == 10 * len(block)
    assert cache.file("files/o/big").stat().st_size == 10 * len(block)

    local = checkpoint(tmp_path / "run", 10)
    put_dir(s3_store, local, "checkpoints/ftjob-2/step-0000010")
    got = cache.directory("checkpoints/ftjob-2/step-0000010")
    assert {p.name: p.read_bytes() for p in got.iterdir()} == {
        p.name: p.read_bytes() for p in local.iterdir()
    }
    s3_store.write_bytes("checkpoints/ftjob-2/step-0000010/trainer_state.pt", b"flipped")
    with pytest.raises(StorageIntegrityError):
        cache.copy_directory("checkpoints/ftjob-2/step-0000010", tmp_path / "restore")
    assert not (tmp_path / "restore").exists()  # nothing half-copied


@pytest.mark.slow  # moto's server
def test_engine_adapter_store_fetches_checks_and_hides_locations(s3_store: BlobStore, tmp_path: Path) -> None:
    store = AdapterStore(LocalCache(s3_store, tmp_path / "engine-cache"))
    local = make_dir(tmp_path / "adapter", {"adapter_config.json": b"{}", "manifest.json": b"{}"})
    put_dir(s3_store, local, "adapters/ftjob-3")
    assert store.resolve("ft:x", "adapters/ftjob-3").is_relative_to(tmp_path / "engine-cache")
    with pytest.raises(InvalidAdapter) as refused:
        store.resolve("ft:x", str(local))
    assert refused.value.code == "invalid_lora_path" and str(tmp_path) not in refused.value.message
    with pytest.raises(AdapterNotFound) as missing:
        store.resolve("ft:y", "adapters/ftjob-none")
    assert "ftjob-none" not in missing.value.message
    s3_store.write_bytes(f"adapters/ftjob-3/{SEAL}", s3_store.read_bytes(f"adapters/ftjob-3/{SEAL}"))
    s3_store.write_bytes("adapters/ftjob-3/manifest.json", b"{ }")  # one byte more than sealed
    (tmp_path / "engine-cache").rename(tmp_path / "gone")  # a cache deleted: fetched again
    with pytest.raises(InvalidAdapter):
        store.resolve("ft:x", "adapters/ftjob-3")


@pytest.mark.slow  # moto's server
def test_unreachable_store_fails_ping_with_a_reason(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tests.net import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    code = (
        "from loraforge.storage import BlobStore\n"
        "import sys\n"
        "try:\n    BlobStore('s3://nobody-here/x').ping()\n"
        "except OSError as exc:\n    print('OSError', exc); sys.exit(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stdout + done.stderr


# --------------------------------------------------------------------------- the worker's side


@pytest.fixture
def s3_settings(settings: Settings, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return settings.model_copy(update={"storage_url": s3_server.new_url("worker")})


@pytest.mark.slow  # moto's server
def test_checkpoints_are_mirrored_then_restored_on_an_empty_home(
    s3_settings: Settings, api: TestClient, make_key, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(s3_settings)
    sessions = make_sessionmaker(engine)
    job_id = new_job(api, make_key("acme"))
    set_job(sessions, job_id, status="running", worker_id="a:1", heartbeat_at=now(), reserved_model="ft:m")
    run = s3_settings.runs_dir / job_id / "checkpoints"
    mirror = store_sync.CheckpointMirror(s3_settings, sessions, job_id)
    metrics = StepMetrics(train_loss=1.0, train_mean_token_accuracy=0.5)
    for step, removed in ((5, []), (10, []), (15, [run / "step-0000005"])):
        path = checkpoint(run, step)
        mirror.submit(
            CheckpointEvent(
                kind="epoch",
                step=step,
                epoch=step // 5,
                path=str(path),
                metrics=metrics,
                removed=[str(p) for p in removed],
            )
        )
    assert mirror.drain(lambda: True, 0.1) and mirror.uploaded == [5, 10, 15]
    store = BlobStore(s3_settings.blob_store_url)
    assert sealed_children(store, f"checkpoints/{job_id}") == ["step-0000010", "step-0000015"]
    with session_scope(sessions) as session:
        rows = session.execute(select(JobCheckpoint.step_number, JobCheckpoint.adapter_path)).all()
    # Rows hold store keys; the pruned step 5 is no model any more.
    assert sorted(rows) == [
        (10, f"checkpoints/{job_id}/step-0000010"),
        (15, f"checkpoints/{job_id}/step-0000015"),
    ]

    # Host B: another home, nothing on its disk. The newest checkpoint comes from the store.
    other = s3_settings.model_copy(update={"home": tmp_path / "host-b"})
    assert store_sync.restore_checkpoint(other, sessions, job_id) == 15
    restored = other.runs_dir / job_id / "checkpoints" / "step-0000015"
    assert {p.name: p.read_bytes() for p in restored.iterdir()} == {
        p.name: p.read_bytes() for p in (run / "step-0000015").iterdir()
    }
    assert store_sync.restore_checkpoint(other, sessions, job_id) is None  # already here
    with session_scope(sessions) as session:
        last = session.execute(
            select(JobEvent.message, JobEvent.data)
            .where(JobEvent.job_id == job_id)
            .order_by(JobEvent.seq.desc())
        ).first()
    assert last.message.startswith("Fetched the checkpoint at step 15 from the object store")
    assert last.data["checkpoint"] == f"checkpoints/{job_id}/step-0000015"
    # A finished job keeps servable checkpoints, without their training state.
    store_sync.strip_training_state(s3_settings, job_id)
    seal = read_seal(store, f"checkpoints/{job_id}/step-0000015")
    assert (
        seal is not None
        and "trainer_state.pt" not in seal.files
        and "adapter_model.safetensors" in seal.files
    )
    assert (
        store_sync.restore_checkpoint(
            s3_settings.model_copy(update={"home": tmp_path / "c"}), sessions, job_id
        )
        is None
    )
    engine.dispose()


def test_rows_from_before_the_store_are_adopted_by_the_worker_on_their_host(
    settings: Settings, api: TestClient, make_key, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from loraforge.adapters.format import AdapterManifest, LoraSettings, write_manifest
    from loraforge.db.models import FineTunedModel, Organization
    from loraforge.worker.legacy import adopt_legacy_adapters

    sessions = make_sessionmaker(make_engine(settings))
    job_id = new_job(api, make_key("acme"))
    old = make_dir(
        settings.adapters_dir / job_id, {"adapter_config.json": b"{}", "adapter_model.safetensors": b"w"}
    )
    manifest = AdapterManifest(
        job_id=job_id,
        base_model="loraforge/tiny-llama",
        base_weights="builtin:tiny-llama",
        chat_template="{{ x }}",
        stop_tokens=[],
        lora=LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj"]),
        hyperparameters={},
    )
    write_manifest(old, manifest)
    with session_scope(sessions) as session:
        org = session.execute(select(Organization)).scalars().first()
        session.add(
            FineTunedModel(
                id="ft:old",
                org_id=org.id,
                job_id=job_id,
                base_model="loraforge/tiny-llama",
                adapter_path=str(old),
                created_at=now(),
            )
        )
        session.add(
            FineTunedModel(
                id="ft:elsewhere",
                org_id=org.id,
                job_id="ftjob-x",
                base_model="loraforge/tiny-llama",
                adapter_path="/another/host/adapters/ftjob-x",
                created_at=now(),
            )
        )
    assert adopt_legacy_adapters(settings, sessions) == ["ft:old"]
    with session_scope(sessions) as session:
        paths = dict(session.execute(select(FineTunedModel.id, FineTunedModel.adapter_path)).all())
    assert paths == {"ft:old": f"adapters/{job_id}", "ft:elsewhere": "/another/host/adapters/ftjob-x"}
    store = BlobStore(settings.blob_store_url)
    assert set(read_seal(store, f"adapters/{job_id}").files) == {p.name for p in old.iterdir()}
    assert adopt_legacy_adapters(settings, sessions) == []  # idempotent
