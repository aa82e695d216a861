"""GPU detection (``planner/gpus.py``) with fake ``nvidia-smi`` scripts on PATH: a hang returns
within a bound and is retried later, unusable memory readings are dropped with a log line, a
success is cached and concurrent first callers share one run."""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loraforge.planner import gpus
from loraforge.planner.pools import resolve_pools
from loraforge.settings import Settings, TrainPool


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpus.forget()
    yield
    gpus.forget()


def fake_smi(folder: Path, body: str) -> Path:
    """An ``nvidia-smi`` that counts its runs in ``runs`` and then does ``body``."""
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\necho run >> {folder / 'runs'}\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return folder / "runs"


def runs(counter: Path) -> int:
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def test_a_hung_nvidia_smi_returns_within_the_bound_and_is_retried_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    counter = fake_smi(tmp_path, "exec sleep 60")
    monkeypatch.setattr(gpus, "DETECT_TIMEOUT_SECONDS", 0.5)
    caplog.set_level(logging.WARNING, logger="loraforge.planner.gpus")
    start = time.monotonic()
    assert gpus.detect_gpus() == ()
    assert time.monotonic() - start < 0.5 + gpus.KILL_WAIT_SECONDS + 1
    assert "did not answer within 0.5 s" in caplog.text
    # Within the retry interval the failure is answered without running nvidia-smi again ...
    assert gpus.detect_gpus() == () and runs(counter) == 1
    assert [p.name for p in resolve_pools(Settings(home=tmp_path))] == ["cpu"]
    # ... and after it detection runs again: a transient failure is not kept for the process life.
    fake_smi(tmp_path, "echo 81559")
    monkeypatch.setattr(gpus, "RETRY_SECONDS", 0.0)
    assert gpus.detect_gpus() == (gpus.Gpu("0", 79.6),) and runs(counter) == 2


def test_a_failing_nvidia_smi_is_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = fake_smi(tmp_path, "echo 'NVIDIA-SMI has failed' >&2; exit 9")
    monkeypatch.setattr(gpus, "RETRY_SECONDS", 0.0)
    assert gpus.detect_gpus() == () and gpus.detect_gpus() == ()
    assert runs(counter) == 2


def test_garbage_and_zero_memory_readings_are_dropped_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake_smi(tmp_path, "printf '81559\\n[N/A]\\n0\\n3\\n143771\\n'")
    caplog.set_level(logging.INFO, logger="loraforge.planner.gpus")
    # The indices of the usable GPUs are kept: they are what CUDA_VISIBLE_DEVICES must name.
    assert gpus.detect_gpus() == (gpus.Gpu("0", 79.6), gpus.Gpu("4", 140.4))
    for index in (1, 2, 3):
        assert f"GPU {index}" in caplog.text
    assert "GPU detection: cuda 0 79.6 GiB, cuda 4 140.4 GiB" in caplog.text
    pools = resolve_pools(Settings(home=tmp_path))
    assert pools[0].count == 2 and pools[0].memory_gib == 79.6 and pools[0].devices == ("0", "4")


def test_only_unusable_readings_give_a_cpu_pool_not_an_error(tmp_path: Path) -> None:
    fake_smi(tmp_path, "printf '0\\n0\\n'")
    assert [p.name for p in resolve_pools(Settings(home=tmp_path))] == ["cpu"]


def test_a_success_is_cached_and_concurrent_first_callers_share_one_run(tmp_path: Path) -> None:
    counter = fake_smi(tmp_path, "sleep 0.5; printf '81559\\n81559\\n'")
    results: list[tuple[gpus.Gpu, ...]] = []
    threads = [threading.Thread(target=lambda: results.append(gpus.detect_gpus())) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == [(gpus.Gpu("0", 79.6), gpus.Gpu("1", 79.6))] * 4
    assert gpus.detect_gpus() == results[0] and runs(counter) == 1


def test_no_nvidia_smi_means_no_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert gpus.detect_gpus() == ()


@pytest.mark.slow  # the default pauses between start-up attempts
def test_at_start_a_failing_nvidia_smi_is_retried_then_raised_not_taken_as_no_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What serve and worker fix their pools with: before, a failure answered () ("no GPU") and
    the process served CPU-only for its whole life."""
    counter = fake_smi(tmp_path, "echo 'NVIDIA-SMI has failed' >&2; exit 9")
    with pytest.raises(gpus.GpuDetectionError, match="failed 3 times: nvidia-smi exited with 9"):
        gpus.detect_gpus_at_start(attempts=3, pause_seconds=0.0)
    assert runs(counter) == 3
    with pytest.raises(gpus.GpuDetectionError):
        resolve_pools(Settings(home=tmp_path), at_start=True)
    # Configured pools are never detected: the way to run deliberately without a GPU.
    configured = Settings(home=tmp_path, train_pools=[TrainPool(name="cpu", device="cpu", memory_gib=8)])
    assert [p.name for p in resolve_pools(configured, at_start=True)] == ["cpu"]


def test_at_start_a_transient_failure_is_retried_until_it_answers(tmp_path: Path) -> None:
    # Fails on its first run (a driver still loading), answers on the second.
    counter = fake_smi(tmp_path, f'[ "$(wc -l < {tmp_path / "runs"})" -gt 1 ] || exit 9\necho 81559')
    assert gpus.detect_gpus_at_start(attempts=3, pause_seconds=0.0) == (gpus.Gpu("0", 79.6),)
    assert runs(counter) == 2


def test_at_start_no_nvidia_smi_is_still_no_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert gpus.detect_gpus_at_start(attempts=3, pause_seconds=0.0) == ()


def test_a_driver_with_no_devices_is_no_gpu_not_a_failure(tmp_path: Path) -> None:
    # nvidia-smi's answer on a host whose driver sees no GPU (exit code 6): serve must start CPU-only.
    counter = fake_smi(tmp_path, "echo 'No devices were found'; exit 6")
    assert gpus.detect_gpus_at_start(attempts=3, pause_seconds=0.0) == ()
    assert runs(counter) == 1
