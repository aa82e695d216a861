"""bench/train_throughput.py runs the trainer's own path end to end (CPU smoke, tiny shapes)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "train_throughput.py"
SHARED_BASELINE = ROOT.parent / "shared" / "bench" / "naive_lora_baseline.py"


@pytest.mark.slow  # runs the benchmark script
def test_cpu_smoke_prints_the_baseline_metrics() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "LORAFORGE_KERNELS": "auto"}
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--arch", "tiny", "--device", "cpu", "--steps", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1
    result = json.loads(lines[0][len("RESULT ") :])
    assert result["device"] == "cpu" and result["arch"] == "tiny" and result["token_budget"] == 2048
    (config,) = result["configs"]
    assert config["layers"] == 2 and config["loss_mode"] == "full" and config["attn"] == "sdpa"
    assert config["kernels"] == "torch"  # LORAFORGE_KERNELS=auto is a no-op on CPU
    assert config["real_tok_s"] > 0 and config["tokens"] > 0 and config["peak_gib"] is None
    assert config["lora_mfu"] >= 0 and config["t_eff"] > 0
    # n_mm = L (2h^2 + 2h kv + 3h I) + h V for the tiny shapes (h 64, kv 32, I 128, V 1024).
    assert config["n_mm"] == 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128) + 64 * 1024


def _load_bench():
    spec = importlib.util.spec_from_file_location("train_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_architecture_and_documents_are_the_baselines() -> None:
    bench = _load_bench()
    cfg = bench.make_config("llama-3.1-8b", 32)
    # PERF.md §1: 7.505e9 matmul params per token for Llama-3.1-8B, 69.50e9 for Llama-3.3-70B.
    assert bench.n_mm(cfg, 32) == pytest.approx(7.505e9, rel=1e-3)
    assert bench.n_mm(bench.make_config("llama-3.3-70b", 80), 80) == pytest.approx(69.50e9, rel=1e-3)
    lengths = bench.doc_lengths()
    assert len(lengths) == 4000 and min(lengths) >= 32 and max(lengths) <= 4096
    if SHARED_BASELINE.is_file():
        # The fallback copies must stay identical to the baseline's definitions.
        spec = importlib.util.spec_from_file_location("naive", SHARED_BASELINE)
        naive = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(naive)
        # With the file present the bench uses the baseline's own functions ...
        assert bench.doc_lengths.__module__ == "naive_lora_baseline"
        # ... and the fallback copies stay identical to them.
        assert bench._doc_lengths_copy() == naive.doc_lengths()
        assert bench._llama31_8b_copy(32).to_dict() == naive.llama31_8b(32).to_dict()


def test_70b_extrapolation_is_linear_in_layers() -> None:
    bench = _load_bench()
    four = {"layers": 4, "s_per_tok": 1e-3, "peak_gib": 20.0, "frozen_weight_gib": 10.0, "t_eff": 900.0}
    eight = {"layers": 8, "s_per_tok": 1.5e-3, "peak_gib": 30.0, "frozen_weight_gib": 16.0, "t_eff": 900.0}
    out = bench.extrapolate([eight, four], "llama-3.3-70b", "lora")
    # t(80) = t4 + (t8 - t4) / 4 * 76 ; same for memory.
    assert out["real_tok_s_per_gpu"] == pytest.approx(1 / (1e-3 + 0.5e-3 / 4 * 76), rel=1e-3)
    assert out["peak_gib_one_gpu"] == pytest.approx(20 + 10 / 4 * 76)
    weights = 10 + 6 / 4 * 76
    assert out["fsdp_peak_gib_per_gpu"]["8"] == pytest.approx(weights / 8 + (20 + 190 - weights), abs=0.1)


def test_ckpt_layers_recomputes_only_the_first_k_layers(capsys: pytest.CaptureFixture[str]) -> None:
    """``--ckpt-layers K`` goes through the trainer's plan: the layers' own flags are read back."""
    bench = _load_bench()
    argv = ["--arch", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--kernels", "torch"]
    assert bench.main([*argv, "--ckpt-layers", "1"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    (config,) = result["configs"]
    assert result["ckpt_layers"] == 1 and config["ckpt_layers"] == 1 and config["layers"] == 2
    assert "_ac1" in config["config"] and config["real_tok_s"] > 0
    with pytest.raises(SystemExit):
        bench.main([*argv, "--grad-ckpt", "--ckpt-layers", "0"])
