#!/usr/bin/env bash
# One prepared GPU job (H200; ~9 minutes of a 10-minute command): regenerate data with the target on the
# GPU, train DSpark, DFlash and AR drafters for the same number of steps (hard wall-clock budget per
# phase), calibrate DSpark, evaluate tau offline, write everything under $OUT.
#   Prepare here first:  bash train/gpu_prepare.sh      (splits the 98 MB GGUF into data/gpu_a + data/gpu_b)
#   Device call 1:       carry ["data/gpu_a"]  command: ls data/gpu_a
#   Device call 2 (within 30 s, same warm machine): carry ["data/gpu_b"]  command: bash train/gpu_job.sh
# CPU smoke test:        SMOKE=1 OUT=/tmp/sparkserve_smoke bash train/gpu_job.sh
# Budgets (env): GEN_MIN TRAIN_MIN STEPS BATCH ANCHORS EVAL_PROMPTS EVAL_TOKENS (see train/pipeline.py).
set -euo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:?set OUT to the results folder}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && ! "$PY" -c 'import torch' 2>/dev/null; then PY=.venv/bin/python; fi
# carried extras: the gguf package (pure Python) and the split model / prompt files
if [ -d data/gpu_b/site ]; then export PYTHONPATH="$PWD/data/gpu_b/site:${PYTHONPATH:-}"; fi
if [ -z "${SPARKSERVE_MODEL_PATH:-}" ] && ls data/gpu_a/gguf.part.* >/dev/null 2>&1 && ls data/gpu_b/gguf.part.* >/dev/null 2>&1; then
  cat data/gpu_a/gguf.part.* data/gpu_b/gguf.part.* > /tmp/smollm2.gguf
  (cd /tmp && sha256sum -c "$OLDPWD/data/gpu_b/gguf.sha256") || { echo "model parts corrupt"; exit 3; }
  export SPARKSERVE_MODEL_PATH=/tmp/smollm2.gguf
fi
[ -f data/gpu_b/train_prompts_subset.jsonl ] && export PROMPTS="${PROMPTS:-$PWD/data/gpu_b/train_prompts_subset.jsonl}"
[ -d data/gpu_b/prompts ] && export EVAL_PROMPTS_DIR="${EVAL_PROMPTS_DIR:-$PWD/data/gpu_b/prompts}"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda available:", torch.cuda.is_available())'
export WORK="${WORK:-/tmp/sparkserve_gpu_job}"
set +e
"$PY" -m sparkserve.train.pipeline 2>&1 | tee "$OUT/job.log"
status=${PIPESTATUS[0]}
set -e
# brought back (at most 8 files): summary.json, report.json, 2 plots, job.log and the DSpark drafter as
# dspark_drafter.tar.part-NN (written by train/pipeline.py right after training and after calibration)
ls -la "$OUT"
exit "$status"
