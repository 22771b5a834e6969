#!/usr/bin/env bash
# Stage what train/gpu_job.sh needs on the device machine into git-ignored data/gpu_a and data/gpu_b
# (each under the 64 MiB carry limit): the SmolLM2 GGUF split in two, a 6000-prompt training subset, the
# evaluation prompt files and the pure-Python gguf package. Nothing here is committed (data/ is ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
GGUF="${SPARKSERVE_MODEL_PATH:-$("$PY" -c 'from sparkserve.engine.loader import default_model_path; print(default_model_path())')}"
rm -rf data/gpu_a data/gpu_b && mkdir -p data/gpu_a data/gpu_b/site data/gpu_b/prompts
split -b 48m -d "$GGUF" data/gpu_a/gguf.part.
mv data/gpu_a/gguf.part.01 data/gpu_b/gguf.part.01
(cd "$(dirname "$GGUF")" && sha256sum "$(basename "$GGUF")") | awk '{print $1"  smollm2.gguf"}' > data/gpu_b/gguf.sha256
"$PY" - <<'PYEOF'
import json
from sparkserve.train.data import DEFAULT_PROMPTS, select_prompts
rows = select_prompts(DEFAULT_PROMPTS, 6000, 0)
with open("data/gpu_b/train_prompts_subset.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
PYEOF
SHARED="$(cd .. && pwd)/shared/data/prompts"
cp "$SHARED"/mt_bench_question.jsonl "$SHARED"/HumanEval.jsonl.gz "$SHARED"/gsm8k_test.jsonl data/gpu_b/prompts/
cp -r "$("$PY" -c 'import gguf, os; print(os.path.dirname(gguf.__file__))')" data/gpu_b/site/gguf
find data/gpu_b/site -name __pycache__ -prune -exec rm -rf {} +
du -sh data/gpu_a data/gpu_b
