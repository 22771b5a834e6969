#!/usr/bin/env bash
# The phased GPU check of issue 13 (scripts/gpu_check.py): tests, kernel microbenchmarks, engine serving,
# exactness; one JSON per phase under $OUT, written as each phase ends (a cut-off run keeps the first ones).
#   Prepare here first:  bash train/gpu_prepare.sh   (the 98 MB GGUF split into data/gpu_a + data/gpu_b, the
#                        prompt files and the pure-Python gguf package; data/ is git-ignored)
#   Device call 1:       carry ["data/gpu_a"]  command: ls data/gpu_a
#   Device call 2 (same warm machine, within its 30 s):  carry ["data/gpu_b"]  timeout_s: 600
#                        command: bash scripts/gpu_check.sh
#   Dry run anywhere:    OUT=/tmp/gpu_check bash scripts/gpu_check.sh --dry-run
# gpu_check.py reassembles the model and puts the carried gguf package on the path itself. Extra arguments
# go to it (--window 1|2|3, --skip PHASE..., --budget-PHASE SECONDS, --policies, --concurrency).
# Device windows on one warm machine (issue 26), each its own call with timeout_s a little above its budget:
#   window 1 (<= 120 s, nothing carried): probe (tiny-engine smoke), CUDA-only tests -x, exactness
#     command: OUT=$OUT bash scripts/gpu_check.sh --window 1
#   window 2 (<= 150 s): kernel microbenchmarks, serving c=1/16/64/256 (none, dspark, fixed:7), staircase
#   window 3 (<= 150 s, the model carried in the two calls above): serving none vs dspark on real weights
# Dry run of a window anywhere: OUT=/tmp/w1 PYTHON=.venv/bin/python bash scripts/gpu_check.sh --dry-run --window 1
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the results folder}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"  # the device image's python3 holds torch; here pass PYTHON=.../.venv/bin/python
set +e
PYTHONUNBUFFERED=1 "$PY" scripts/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
status=${PIPESTATUS[0]}
set -e
ls -la "$OUT"
exit "$status"
