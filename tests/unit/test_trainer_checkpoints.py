"""Trainer checkpoints: epoch checkpoints kept 3-deep as valid adapter directories; pause, crash
and resume reproduce the uninterrupted run exactly; continued fine-tuning; dying with the parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loraforge.catalog import load_catalog
from loraforge.contracts.train_spec import TrainSpec
from tests.unit.test_trainer import SRC, TINY, make_spec

# Every test here is a real training run on the tiny model, several of them in subprocesses.
pytestmark = pytest.mark.slow

AUTO = {"n_epochs": 4, "batch_size": 4, "learning_rate_multiplier": "auto"}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from loraforge.catalog.loading import resolve_weights

    path = tmp_path_factory.mktemp("models")
    resolve_weights(load_catalog().get(TINY), path)
    return path


def spec_in(folder: Path, models_dir: Path, **overrides: object) -> TrainSpec:
    """12 examples, batch 4, 4 epochs: 12 steps, an epoch every 3 steps."""
    folder.mkdir(parents=True, exist_ok=True)
    fields: dict[str, object] = {
        "n_examples": 12,
        "checkpoint_dir": str(folder / "ckpt"),
        "pause_file": str(folder / "pause"),
        # The run's tokenized data: a resumed or paused run reuses it (a cache hit).
        "data_dir": str(folder / "data"),
        "hyperparameters": AUTO,
    }
    fields.update(overrides)
    return make_spec(folder, models_dir, **fields)


def losses(events: list[dict]) -> dict[int, float]:
    return {e["step"]: e["train_loss"] for e in events if e["type"] == "metrics"}


def weights(adapter_dir: str | Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> tuple[TrainSpec, list[dict]]:
    """The uninterrupted run every interrupted one is compared with."""
    from loraforge.trainer import train

    spec = spec_in(tmp_path_factory.mktemp("reference"), models_dir)
    events: list[dict] = []
    train(spec, events.append)
    return spec, events


def test_epoch_checkpoints_are_adapters_and_the_last_three_are_kept(reference) -> None:  # type: ignore[no-untyped-def]
    from loraforge.adapters.format import validate_adapter_dir

    spec, events = reference
    lines = [e for e in events if e["type"] == "checkpoint"]
    assert [(c["step"], c["epoch"], c["kind"]) for c in lines] == [
        (3, 1, "epoch"),
        (6, 2, "epoch"),
        (9, 3, "epoch"),
        (12, 4, "epoch"),
    ]
    assert lines[-1]["removed"] == [str((Path(spec.checkpoint_dir) / "step-0000003").resolve())]
    assert lines[1]["metrics"]["step"] == 6
    assert lines[1]["metrics"]["train_loss"] == losses(events)[6]
    kept = sorted(p.name for p in Path(spec.checkpoint_dir).iterdir())
    assert kept == ["step-0000006", "step-0000009", "step-0000012"]
    for name in kept:
        manifest = validate_adapter_dir(Path(spec.checkpoint_dir) / name)  # servable as a model
        assert manifest.total_steps == int(name.split("-")[1]) and manifest.base_model == TINY
    assert same_weights(weights(Path(spec.checkpoint_dir) / "step-0000012"), weights(spec.output_dir))
    assert events[-1]["type"] == "done" and events[-1]["resumed_from_step"] is None


def test_pause_then_resume_with_resolved_hyperparameters_is_exact(
    tmp_path: Path, models_dir: Path, reference
) -> None:  # type: ignore[no-untyped-def]
    from loraforge.trainer import train

    ref_spec, ref_events = reference
    spec = spec_in(tmp_path, models_dir)
    first: list[dict] = []

    def pause_after_step_5(event: dict) -> None:
        first.append(event)
        if event["type"] == "metrics" and event["step"] == 5:
            Path(spec.pause_file).touch()

    assert train(spec, pause_after_step_5) is None
    assert first[-1] == {
        "type": "paused",
        "step": 5,
        "total_steps": 12,
        "checkpoint": str((Path(spec.checkpoint_dir) / "step-0000005").resolve()),
    }
    assert [e["kind"] for e in first if e["type"] == "checkpoint"] == ["epoch", "pause"]
    Path(spec.pause_file).unlink()
    # The worker writes the resolved values back to the job: the second spec says 1.0, not "auto".
    resolved = TrainSpec.model_validate(
        {**spec.model_dump(), "hyperparameters": {**AUTO, "learning_rate_multiplier": 1.0}}
    )
    second: list[dict] = []
    train(resolved, second.append)
    assert second[0]["type"] == "data_progress" and second[0]["cached"]  # the first run's data, reused
    assert second[2] == {
        "type": "resumed",
        "step": 5,
        "epoch": 2,
        "kind": "pause",
        "path": str((Path(spec.checkpoint_dir) / "step-0000005").resolve()),
    }
    assert sorted(losses(second)) == list(range(6, 13))
    assert {**losses(first), **losses(second)} == losses(ref_events)
    assert same_weights(weights(spec.output_dir), weights(ref_spec.output_dir))
    assert second[-1]["resumed_from_step"] == 5
    # The pause checkpoint is gone once a newer checkpoint exists.
    assert "step-0000005" not in {p.name for p in Path(spec.checkpoint_dir).iterdir()}


def test_crash_resumes_from_the_last_epoch_checkpoint_exactly(
    tmp_path: Path, models_dir: Path, reference
) -> None:  # type: ignore[no-untyped-def]
    from loraforge.trainer import train

    ref_spec, ref_events = reference
    spec = spec_in(tmp_path, models_dir)
    first: list[dict] = []

    def crash_at_step_8(event: dict) -> None:
        first.append(event)
        if event["type"] == "metrics" and event["step"] == 8:
            raise RuntimeError("worker died")

    with pytest.raises(RuntimeError):
        train(spec, crash_at_step_8)
    second: list[dict] = []
    train(spec, second.append)
    assert second[0]["type"] == "data_progress" and second[0]["cached"]
    assert second[2]["type"] == "resumed" and second[2]["step"] == 6 and second[2]["kind"] == "epoch"
    assert sorted(losses(second)) == list(range(7, 13))
    assert {**losses(first), **losses(second)} == losses(ref_events)  # steps 7-8 re-run identically
    assert same_weights(weights(spec.output_dir), weights(ref_spec.output_dir))


def test_a_checkpoint_of_another_spec_is_not_resumed(tmp_path: Path, models_dir: Path) -> None:
    from loraforge.trainer import train

    spec = spec_in(tmp_path, models_dir, hyperparameters={"n_epochs": 1, "batch_size": 4})
    train(spec, lambda _: None)
    other_seed = spec.model_copy(update={"seed": 43, "output_dir": str(tmp_path / "other")})
    events: list[dict] = []
    train(other_seed, events.append)
    assert not [e for e in events if e["type"] == "resumed"]
    assert min(e["step"] for e in events if e["type"] == "metrics") == 1


def test_continued_fine_tuning_starts_from_the_init_adapter(
    tmp_path: Path, models_dir: Path, reference
) -> None:  # type: ignore[no-untyped-def]
    from loraforge.trainer import train

    ref_spec, ref_events = reference
    spec = spec_in(tmp_path, models_dir, init_adapter=ref_spec.output_dir, seed=99, checkpoint_dir=None)
    events: list[dict] = []
    manifest = train(spec, events.append)
    assert manifest is not None and manifest.lora.r == 16
    fresh_first, continued_first = losses(ref_events)[1], losses(events)[1]
    assert continued_first < fresh_first / 4, (continued_first, fresh_first)
    with pytest.raises(ValueError, match="not an adapter directory"):
        train(spec.model_copy(update={"init_adapter": str(tmp_path)}), lambda _: None)


def test_trainer_dies_with_its_parent(tmp_path: Path, models_dir: Path) -> None:
    spec = spec_in(tmp_path, models_dir, hyperparameters={"n_epochs": 50, "batch_size": 1})
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(spec.model_dump_json())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    # A stand-in worker: starts the trainer telling it its pid, prints the trainer's pid, waits.
    parent_code = (
        "import os, subprocess, sys, time\n"
        f"env = dict(os.environ, LORAFORGE_TRAINER_PARENT_PID=str(os.getpid()))\n"
        f"p = subprocess.Popen([sys.executable, '-m', 'loraforge.trainer', {str(spec_path)!r}], env=env,\n"
        "                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)\n"
        "print(p.pid, flush=True)\n"
        "line = p.stdout.readline()\n"
        "while b'data_progress' in line:\n"
        "    line = p.stdout.readline()\n"
        "print(line.decode(), end='', flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        trainer_pid = int(parent.stdout.readline())
        assert json.loads(parent.stdout.readline())["type"] == "hyperparameters"  # it is training
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _alive(trainer_pid):
            time.sleep(0.05)
        assert not _alive(trainer_pid), "the trainer outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_second_trainer_of_the_same_run_waits_for_the_first(tmp_path: Path, models_dir: Path) -> None:
    spec = spec_in(tmp_path, models_dir, hyperparameters={"n_epochs": 50, "batch_size": 1})
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(spec.model_dump_json())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "loraforge.trainer", str(spec_path)]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    second = None
    try:
        assert first.stdout is not None
        while json.loads(first.stdout.readline())["type"] != "checkpoint":
            pass  # the first trainer has written its first epoch checkpoint
        log = tmp_path / "second.log"
        with log.open("w") as err:
            second = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        assert second.stdout is not None
        deadline = time.monotonic() + 30
        while "waiting for it to exit" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "waiting for it to exit" in log.read_text()
        time.sleep(1)
        assert second.poll() is None  # blocked on the lock, not training
        first.kill()
        first.wait(10)
        lines = [json.loads(second.stdout.readline()) for _ in range(3)]
        # The data the first run prepared is reused (same data directory), then it resumes.
        assert lines[0]["type"] == "data_progress" and lines[0]["cached"] is True
        assert lines[1]["type"] == "hyperparameters"
        assert lines[2]["type"] == "resumed" and lines[2]["step"] >= 12  # from the first one's checkpoint
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
