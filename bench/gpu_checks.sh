#!/usr/bin/env bash
# Issue 6 device checks, in one go, on one lent H100/H200 (about 8 minutes of wall time).
#
#   bash bench/gpu_checks.sh            # from the repository root, on the GPU machine
#
# The device call (the machine has no registry; first, on a machine with PyPI, run
# `bash bench/fetch_gpu_wheels.sh` -- 3.7 MB of wheels into gpu_wheels/, `--with-bnb` adds 43 MB):
#
#   run(carry=["gpu_wheels"], command="bash bench/gpu_checks.sh", timeout_s=560)
#
# with the naive baseline reachable (../shared/bench/naive_lora_baseline.py, or copy it into
# bench/ before the call). The wheels are installed at the start into a scratch folder put first
# on PYTHONPATH (outside $OUT, so they do not come back with the results); env.txt lists them.
#
# Runs, most important first, each step under `timeout` and all under one deadline (steps that no
# longer fit are skipped, not started):
#   1. Llama-3.1-8B, loraforge path: packing + chunked CE + flex + bf16, token budget 16k, no
#      activation checkpointing -- with the naive baseline (LAYERS=32 BATCHES=8 STEPS=8, ~60 s on
#      an H200 per FACTS_GPU) in a subprocess on the same card: the ratio;
#   1b. token budget 4k, no checkpointing (small micro-batches instead of recompute);
#   1b'. token budget 8k, recompute on 16 of 32 layers (partial AC: what the planner picks between
#       no recompute and full recompute; docs/benchmarks.md predicts ~45 GiB eager, +~20 % compute);
#   1c. 1b and then 1 with --kernels torch, when Liger's kernels are in use (LORAFORGE_KERNELS=auto
#       picks them on CUDA when liger_kernel imports): what RMSNorm/SwiGLU/RoPE fusion buys;
#   2. the same with activation checkpointing (the <= 40 GiB configuration);
#   3. token budget 8k, no checkpointing;
#   3b. bench/serve_adapters.py on the 8B architecture (issue 7);
#   4. tests/gpu: a DPO step on the fast path vs the CPU reference (test_dpo_gpu.py, its own
#      step), then the rest (fast path vs CPU loss curve, flex document isolation, bf16 vs fp32);
#   5. Llama-3.3-70B truncated to 4 and 8 layers, bf16 LoRA + checkpointing, extrapolated to 80
#      layers (FSDP per-GPU memory = weights / N + the rest);
#   6. the same with QLoRA (NF4) -- only when bitsandbytes imports;
#   7. step 1 with torch.compile per decoder layer, if time is left.
# Every result line is kept in $OUT (or bench_out/) and a table is printed at the end.
#
# What bench/fetch_gpu_wheels.sh fetches, and why: pydantic, pydantic-core, annotated-types,
# typing-inspection, typing-extensions (the trainer's spec and catalog use pydantic);
# liger-kernel (0.9 MB; loss "auto" then uses its fused linear cross-entropy -- compare with
# LORAFORGE_LOSS=chunked -- and LORAFORGE_KERNELS=auto its RMSNorm/SwiGLU/RoPE), and with
# --with-bnb bitsandbytes (43 MB, for step 6).
# The naive baseline is found at $NAIVE_BASELINE, ../shared/bench/, shared/bench/ or bench/ (copy
# shared/bench/naive_lora_baseline.py into bench/ if the machine's copy of the tree lacks it).
set -u
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
PY=${PYTHON:-python}
OUT_DIR=${OUT:-bench_out}
mkdir -p "$OUT_DIR"
DEADLINE=${GPU_CHECKS_SECONDS:-480}
LOSS=${LORAFORGE_LOSS:-auto}
KERNELS=${LORAFORGE_KERNELS:-auto}
START=$(date +%s)

# Carried wheels (bench/fetch_gpu_wheels.sh): installed without index or dependency resolution
# (the machine has neither) into a scratch folder first on PYTHONPATH. pip when it is there,
# else unpacked (a wheel is a zip laid out for site-packages).
WHEELS_INSTALLED=""
SITE=""
if compgen -G "gpu_wheels/*.whl" >/dev/null; then
  SITE=${GPU_SITE:-$(mktemp -d /tmp/loraforge_gpu_site.XXXXXX)}
  if ! $PY -m pip install --quiet --no-index --no-deps --disable-pip-version-check \
    --target "$SITE" gpu_wheels/*.whl >"$OUT_DIR/wheels_install.log" 2>&1; then
    echo "pip install of gpu_wheels failed (see wheels_install.log); unpacking them instead"
    $PY -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
      "$SITE" gpu_wheels/*.whl
  fi
  WHEELS_INSTALLED=$(cd "$SITE" && ls -d ./*.dist-info | sed 's|^\./||; s|\.dist-info$||' | tr '\n' ' ')
fi
# src first (the tree's code), then the carried wheels, then whatever the caller had.
export PYTHONPATH="src${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"

remaining() { echo $((DEADLINE - ($(date +%s) - START))); }

# step NAME TIMEOUT COMMAND... : run COMMAND under min(TIMEOUT, time left); log to $OUT_DIR/NAME.log
step() {
  local name=$1 limit=$2
  shift 2
  local left
  left=$(remaining)
  if [ "$left" -lt 45 ]; then
    echo "== $name: skipped (${left}s left)" | tee -a "$OUT_DIR/summary.txt"
    return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "== $name (limit ${limit}s)"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $(($(date +%s) - t0))s" | tee -a "$OUT_DIR/summary.txt"
  grep -E '^(RESULT |\{)' "$OUT_DIR/$name.log" | tail -4
  [ $rc -ne 0 ] && tail -15 "$OUT_DIR/$name.log"
}

{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv
  $PY -c 'import torch, transformers, peft, accelerate; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "accelerate", accelerate.__version__)'
  $PY -c 'import pydantic; print("pydantic", pydantic.VERSION)' || echo "pydantic MISSING: carry its wheels (see the header)"
  echo "carried wheels installed: ${WHEELS_INSTALLED:-none (no gpu_wheels/)}"
  $PY -c 'import liger_kernel.transformers; print("liger_kernel imports")' ||
    echo "liger_kernel does not import (chunked CE, torch kernels)"
} 2>&1 | tee "$OUT_DIR/env.txt"

BENCH="$PY bench/train_throughput.py --loss $LOSS --kernels $KERNELS"
step 8b_tb16k_baseline 240 $BENCH --arch llama-3.1-8b --token-budget 16384 --steps 8 --baseline
# The <= 40 GiB candidate without recompute: the planner puts ~3,300 tokens per micro-batch there.
step 8b_tb4k 120 $BENCH --arch llama-3.1-8b --token-budget 4096 --steps 8
# Partial recompute (the first 16 of 32 layers): the planner's middle ground, same step budget as
# 8b_tb8k below so the two compare directly; a short step (~60 s), under the same deadline.
step 8b_tb8k_ckpt_half 120 $BENCH --arch llama-3.1-8b --token-budget 8192 --steps 5 --ckpt-layers 16
# The same two without Liger's RMSNorm/SwiGLU/RoPE, when the runs above had them: the difference
# is what the fused kernels buy (docs/benchmarks.md predicts -24 % activations, +5-10 % speed).
if grep -q '"kernels": "liger"' "$OUT_DIR/8b_tb4k.log" 2>/dev/null; then
  step 8b_tb4k_torch_kernels 120 $BENCH --arch llama-3.1-8b --token-budget 4096 --steps 8 --kernels torch
  # 16k without recompute needs ~86-109 GiB (docs/benchmarks.md): pointless where step 1 OOMed.
  if grep -q '"oom": true' "$OUT_DIR/8b_tb16k_baseline.log" 2>/dev/null; then
    echo "== 8b_tb16k_torch_kernels: skipped (8b_tb16k_baseline ran out of memory)" | tee -a "$OUT_DIR/summary.txt"
  else
    step 8b_tb16k_torch_kernels 150 $BENCH --arch llama-3.1-8b --token-budget 16384 --steps 8 --kernels torch
  fi
else
  echo "== kernel comparison: skipped (8b_tb4k did not use Liger's kernels)" | tee -a "$OUT_DIR/summary.txt"
fi
step 8b_tb16k_ac 120 $BENCH --arch llama-3.1-8b --token-budget 16384 --steps 5 --grad-ckpt
step 8b_tb8k 120 $BENCH --arch llama-3.1-8b --token-budget 8192 --steps 5
# Issue 7: serving an 8B base with synthetic r16 adapters (cold load -> first token; decode with
# 1/4/8 adapters vs the base, grouped and PEFT paths in the same run).
step serve_8b 180 $PY bench/serve_adapters.py --arch llama-3.1-8b --device cuda --dtype bfloat16 \
  --repeats 3 --cold 3 --json "$OUT_DIR/serve_8b.json"
# Issue 15: one DPO step on the fast path (packed pairs, flex, chunked log-probs) vs the CPU
# reference loss, rewards and gradients (tiny model, ~30 s); then the other GPU tests.
step gpu_dpo 90 $PY -m pytest tests/gpu/test_dpo_gpu.py -q -rs -p no:cacheprovider
step gpu_pytest 150 $PY -m pytest tests/gpu -q -rs -p no:cacheprovider --ignore=tests/gpu/test_dpo_gpu.py
step 70b_lora_L4_L8 150 $BENCH --arch llama-3.3-70b --layers 4,8 --token-budget 8192 --steps 4 --grad-ckpt
if $PY -c 'import bitsandbytes' 2>/dev/null; then
  step 70b_qlora_L4_L8 150 $BENCH --arch llama-3.3-70b --layers 4,8 --token-budget 8192 --steps 4 --grad-ckpt --strategy qlora
else
  echo "== 70b_qlora_L4_L8: skipped (bitsandbytes not importable: carry its wheel)" | tee -a "$OUT_DIR/summary.txt"
fi
step 8b_tb16k_compile 240 $BENCH --arch llama-3.1-8b --token-budget 16384 --steps 5 --compile

echo
echo "== summary ($(($(date +%s) - START))s)"
$PY - "$OUT_DIR" <<'EOF'
import json, pathlib, sys

rows = []
for log in sorted(pathlib.Path(sys.argv[1]).glob("*.log")):
    for line in log.read_text().splitlines():
        if not line.startswith("RESULT "):
            continue
        r = json.loads(line[7:])
        for c in r.get("configs", []):
            rows.append((log.stem, c.get("layers"), c.get("real_tok_s", "OOM"), c.get("peak_gib", "-"),
                         c.get("lora_mfu", "-"), f'{c.get("loss_mode", "-")} / {c.get("kernels", "-")}'))
        if r.get("baseline"):
            b = r["baseline"].get("naive_padded_bs8_ac", {})
            rows.append(("naive_baseline_bs8", r["baseline"].get("layers"), b.get("real_tok_s", "OOM"),
                         b.get("peak_gib", "-"), b.get("lora_mfu", "-"), "full (HF)"))
            print("ratio vs naive bs8:", r.get("ratio_vs_naive_bs8"), "on", r["device"])
        if r.get("extrapolated"):
            print(log.stem, "-> 80 layers:", json.dumps(r["extrapolated"]))
print(f"{'run':28} {'layers':>6} {'real tok/s':>11} {'peak GiB':>9} {'LoRA-MFU':>9}  loss / kernels")
for row in rows:
    print(f"{row[0]:28} {row[1]!s:>6} {row[2]!s:>11} {row[3]!s:>9} {row[4]!s:>9}  {row[5]}")
EOF
