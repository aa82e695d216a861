#!/usr/bin/env bash
# Issue 6 device checks, in one go, on one lent H100/H200 (about 8 minutes of wall time).
#
#   bash bench/gpu_checks.sh            # from the repository root, on the GPU machine
#
# Runs, most important first, each step under `timeout` and all under one deadline (steps that no
# longer fit are skipped, not started):
#   1. Llama-3.1-8B, loraforge path: packing + chunked CE + flex + bf16, token budget 16k, no
#      activation checkpointing -- with the naive baseline (LAYERS=32 BATCHES=8 STEPS=8, ~60 s on
#      an H200 per FACTS_GPU) in a subprocess on the same card: the ratio;
#   1b. token budget 4k, no checkpointing (small micro-batches instead of recompute);
#   2. the same with activation checkpointing (the <= 40 GiB configuration);
#   3. token budget 8k, no checkpointing;
#   3b. bench/serve_adapters.py on the 8B architecture (issue 7);
#   4. tests/gpu (fast path vs CPU loss curve, flex document isolation, bf16 vs fp32);
#   5. Llama-3.3-70B truncated to 4 and 8 layers, bf16 LoRA + checkpointing, extrapolated to 80
#      layers (FSDP per-GPU memory = weights / N + the rest);
#   6. the same with QLoRA (NF4) -- only when bitsandbytes imports;
#   7. step 1 with torch.compile per decoder layer, if time is left.
# Every result line is kept in $OUT (or bench_out/) and a table is printed at the end.
#
# The machines have no registry. Carry (cp312 manylinux wheels, `pip install --no-deps` them into
# a folder on PYTHONPATH, or unpack them there): pydantic, pydantic-core, annotated-types,
# typing-inspection (the trainer's spec and catalog use pydantic; the same four the serving bench
# needed, docs/benchmarks.md). Optional: liger-kernel (0.9 MB; then loss "auto" uses its fused
# linear cross-entropy -- compare with LORAFORGE_LOSS=chunked), bitsandbytes (43 MB, for step 6).
# The naive baseline is found at $NAIVE_BASELINE, ../shared/bench/, shared/bench/ or bench/ (copy
# shared/bench/naive_lora_baseline.py into bench/ if the machine's copy of the tree lacks it).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
PY=${PYTHON:-python}
OUT_DIR=${OUT:-bench_out}
mkdir -p "$OUT_DIR"
DEADLINE=${GPU_CHECKS_SECONDS:-480}
LOSS=${LORAFORGE_LOSS:-auto}
START=$(date +%s)

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
  $PY -c 'import liger_kernel; print("liger_kernel present")' 2>/dev/null || echo "liger_kernel absent (chunked CE)"
} 2>&1 | tee "$OUT_DIR/env.txt"

BENCH="$PY bench/train_throughput.py --loss $LOSS"
step 8b_tb16k_baseline 240 $BENCH --arch llama-3.1-8b --token-budget 16384 --steps 8 --baseline
# The <= 40 GiB candidate without recompute: the planner puts ~3,300 tokens per micro-batch there.
step 8b_tb4k 120 $BENCH --arch llama-3.1-8b --token-budget 4096 --steps 8
step 8b_tb16k_ac 120 $BENCH --arch llama-3.1-8b --token-budget 16384 --steps 5 --grad-ckpt
step 8b_tb8k 120 $BENCH --arch llama-3.1-8b --token-budget 8192 --steps 5
# Issue 7: serving an 8B base with synthetic r16 adapters (cold load -> first token; decode with
# 1/4/8 adapters vs the base, grouped and PEFT paths in the same run).
step serve_8b 180 $PY bench/serve_adapters.py --arch llama-3.1-8b --device cuda --dtype bfloat16 \
  --repeats 3 --cold 3 --json "$OUT_DIR/serve_8b.json"
step gpu_pytest 150 $PY -m pytest tests/gpu -q -rs -p no:cacheprovider
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
                         c.get("lora_mfu", "-"), c.get("loss_mode", "-")))
        if r.get("baseline"):
            b = r["baseline"].get("naive_padded_bs8_ac", {})
            rows.append(("naive_baseline_bs8", r["baseline"].get("layers"), b.get("real_tok_s", "OOM"),
                         b.get("peak_gib", "-"), b.get("lora_mfu", "-"), "full (HF)"))
            print("ratio vs naive bs8:", r.get("ratio_vs_naive_bs8"), "on", r["device"])
        if r.get("extrapolated"):
            print(log.stem, "-> 80 layers:", json.dumps(r["extrapolated"]))
print(f"{'run':28} {'layers':>6} {'real tok/s':>11} {'peak GiB':>9} {'LoRA-MFU':>9}  loss")
for row in rows:
    print(f"{row[0]:28} {row[1]!s:>6} {row[2]!s:>11} {row[3]!s:>9} {row[4]!s:>9}  {row[5]}")
EOF
