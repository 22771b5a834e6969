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
# go to it (--skip PHASE..., --budget-PHASE SECONDS, --policies, --concurrency); the default budgets
# (120 + 120 + 200 + 90 s) keep the whole command inside the device's 600 s.
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
