#!/usr/bin/env bash
# Download, on a machine with PyPI access, the wheels bench/gpu_checks.sh needs on the lent GPU
# machine (no registry there: they travel with the working tree, `carry: ["gpu_wheels"]`).
#
#   bash bench/fetch_gpu_wheels.sh              # pydantic stack + liger-kernel   (3.7 MB)
#   bash bench/fetch_gpu_wheels.sh --with-bnb   # + bitsandbytes for the QLoRA step (+43 MB)
#
# Target: CPython 3.12, manylinux x86-64 (the GPU machine's Python, FACTS_GPU.md). What and why:
#   pydantic, pydantic-core, annotated-types, typing-inspection  the trainer's spec and catalog,
#       and adapters/format.py (bench/serve_adapters.py), use pydantic; nothing else outside
#       torch/transformers/peft/accelerate/safetensors/tokenizers/numpy/yaml is imported on the
#       trainer and bench paths (no pydantic-settings / python-dotenv: loraforge.settings is only
#       imported under TYPE_CHECKING there);
#   typing-extensions  torch brings one, but pydantic pins a minimum (>= 4.16 for pydantic 2.14)
#       that torch's may not meet; newer typing-extensions is backward compatible, so shadowing
#       torch's copy is harmless (44 KB);
#   liger-kernel 0.8.x  pure Python + Triton (triton is on the GPU machine): fused linear
#       cross-entropy (loss "auto") and RMSNorm/SwiGLU/RoPE kernels (LORAFORGE_KERNELS=auto);
#   bitsandbytes  only with --with-bnb: 43 MB of the 64 MiB a call may carry, tree included.
# Not needed there: PyYAML (transformers depends on it), numpy, safetensors, tokenizers.
#
# pydantic and its dependencies are pinned to the versions installed in .venv (the ones the test
# suite ran with); without a .venv pip resolves pydantic's own pins for the target.
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=${GPU_WHEELS_DIR:-gpu_wheels}
PY=${PYTHON:-.venv/bin/python}
read -r -a PIP <<<"${PIP:-$PY -m pip}"
LIGER_SPEC=${LIGER_SPEC:-"liger-kernel>=0.8,<0.9"}
BNB_SPEC=${BNB_SPEC:-bitsandbytes}
WITH_BNB=0
for arg in "$@"; do
  case $arg in
    --with-bnb) WITH_BNB=1 ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "unknown option: $arg (see --help)" >&2
      exit 2
      ;;
  esac
done

# Every platform tag a cp312 x86-64 wheel of these packages is published under; pip picks the
# best match per package. --only-binary: nothing is built here for another interpreter.
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux_2_24_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_28_x86_64 --disable-pip-version-check --quiet)

# The pydantic stack at the versions .venv has (pydantic-core is pinned exactly by pydantic).
pinned=$("$PY" - <<'EOF' 2>/dev/null || true
from importlib.metadata import version

names = ["pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions"]
print(" ".join(f"{n}=={version(n)}" for n in names))
EOF
)
mkdir -p "$DEST"
rm -f "$DEST"/*.whl # a rerun must not leave two versions of a package for gpu_checks.sh to install
if [ -n "$pinned" ]; then
  echo "pydantic stack from $PY: $pinned"
  # shellcheck disable=SC2086  # word splitting of the requirement list is intended
  "${PIP[@]}" download "${TARGET[@]}" --no-deps --dest "$DEST" $pinned
else
  # No interpreter with pydantic here: let pip resolve pydantic's dependencies for the target.
  echo "no pydantic in $PY: resolving pydantic's dependencies for cp312"
  "${PIP[@]}" download "${TARGET[@]}" --dest "$DEST" pydantic
fi
"${PIP[@]}" download "${TARGET[@]}" --no-deps --dest "$DEST" "$LIGER_SPEC"
if [ "$WITH_BNB" = 1 ]; then
  "${PIP[@]}" download "${TARGET[@]}" --no-deps --dest "$DEST" "$BNB_SPEC"
fi

echo
echo "wheels in $DEST/:"
for whl in "$DEST"/*.whl; do
  printf '  %-72s %8.2f MB\n' "$(basename "$whl")" "$(stat -c %s "$whl" | awk '{print $1 / 1e6}')"
done
total=$(cat "$DEST"/*.whl | wc -c)
# What travels in one device call: the tracked + untracked-not-ignored files, plus the carry.
tree=$(git ls-files -co --exclude-standard -z | xargs -0 cat 2>/dev/null | wc -c)
awk -v w="$total" -v t="$tree" 'BEGIN {
  printf "total: %.2f MB (%.2f MiB)\n", w / 1e6, w / 1048576
  printf "working tree: %.2f MiB; with the wheels: %.2f MiB (a call carries at most 64 MiB)\n",
    t / 1048576, (t + w) / 1048576
}'
echo "device call: carry [\"$DEST\"], command: bash bench/gpu_checks.sh"
