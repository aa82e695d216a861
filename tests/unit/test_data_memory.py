"""The trainer's resident memory does not grow with the training file (issue 14).

The real trainer (``recipe.train`` in a child process, as ``bench/data_pipeline.py`` runs it) trains
until its first step on 40 generated chats and on a generated file of millions of tokens; its peak
RSS is sampled from ``/proc``. The old path's memory for the same file is measured on a sample of
it (``tracemalloc`` over main's read-and-tokenize, kept in the bench) and scaled to the file.
"""

from __future__ import annotations

import json
import sys
import tracemalloc
from pathlib import Path

import pytest

from loraforge.catalog import load_catalog

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from data_pipeline import TINY, generate, old_read_and_tokenize, run_trainer  # noqa: E402

# Allowed growth of the trainer's peak RSS from 40 chats to the generated file.
GROWTH_BOUND_MIB = 50


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from loraforge.catalog.loading import resolve_weights

    path = tmp_path_factory.mktemp("models")
    resolve_weights(load_catalog().get(TINY), path)
    return path


def _run(folder: Path, data: Path, models_dir: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    spec = {
        "job_id": "ftjob-memory",
        "base_model": TINY,
        "models_dir": str(models_dir),
        "training_file": str(data),
        "output_dir": str(folder / "adapter"),
        "hyperparameters": {"n_epochs": 1, "batch_size": 8, "learning_rate_multiplier": 1},
        "device": "cpu",
        "checkpoint_dir": str(folder / "checkpoints"),
        "pause_file": str(folder / "pause"),
        "data_dir": str(folder / "data"),
    }
    path = folder / "spec.json"
    path.write_text(json.dumps(spec))
    return run_trainer("new", path)


def _old_bytes_per_token(data: Path, models_dir: Path, tmp_path: Path) -> float:
    """Python heap the old path holds per token, measured on the file's first 400 examples."""
    from loraforge.catalog.loading import load_tokenizer

    tokenizer = load_tokenizer(load_catalog().get(TINY), models_dir)
    sample = tmp_path / "sample.jsonl"
    with data.open() as fh:
        sample.write_text("".join(next(fh) for _ in range(400)))
    tracemalloc.start()
    try:
        examples = old_read_and_tokenize(str(sample), tokenizer, 1 << 30)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return held / sum(len(ex.input_ids) for ex in examples)


@pytest.mark.slow
def test_trainer_peak_rss_is_flat_in_file_size(tmp_path: Path, models_dir: Path) -> None:
    big = tmp_path / "big.jsonl"
    generate(big, 24, seed=3)  # ~10,000 chats, ~5 M tokens after the 512-token cut
    # The base: 40 chats of the same kind, so the first step (its activations) weighs the same.
    small = tmp_path / "small.jsonl"
    with big.open() as fh:
        small.write_text("".join(next(fh) for _ in range(40)))

    base = _run(tmp_path / "small", small, models_dir)
    large = _run(tmp_path / "big", big, models_dir)
    assert base["exit"] == large["exit"] == 0 and base["first_step_s"] > 0 and large["first_step_s"] > 0
    assert not large["cache_hit"] and large["prep_s"] > 0

    from loraforge.catalog.loading import load_tokenizer
    from loraforge.trainer.dataset import prepare

    entry = load_catalog().get(TINY)
    tokenizer = load_tokenizer(entry, models_dir)
    max_len = min(entry.max_seq_length, entry.context_length)  # the trainer's cut for this spec
    prepared = prepare(big, tokenizer, max_len, tmp_path / "big" / "data")
    assert prepared.cached  # the run's own cache, opened again
    tokens = sum(prepared.examples.lengths())
    assert tokens > 4_500_000

    growth_mib = large["peak_rss_trainer_mib"] - base["peak_rss_trainer_mib"]
    old_mib = _old_bytes_per_token(big, models_dir, tmp_path) * tokens / 2**20
    print(f"peak RSS {base} -> {large}; {tokens} tokens; the old path ~{old_mib:.0f} MiB")
    assert growth_mib < GROWTH_BOUND_MIB
    # The old path would have held several times that in Python lists for the same file.
    assert old_mib > 4 * max(growth_mib, 10)
