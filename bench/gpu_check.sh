#!/usr/bin/env bash
# QR-head scorer speed on a CUDA GPU at Mistral-7B shapes in int4 (`bash bench/gpu_check.sh`), or
# the QR-head LoRA's training step there (`bash bench/gpu_check.sh train`), or the batched scorer's
# throughput at 1 k tokens for 1, 8 and 32 requests (`bash bench/gpu_check.sh load`). Run from the repo root.
# Needs torch (CUDA), transformers, accelerate and bitsandbytes; wheels missing on the host can
# be put in .gpu/ (e.g. bitsandbytes), with SmolLM2's tokenizer files in .gpu/tokenizer/.
set -euo pipefail
if ! python3 -c "import bitsandbytes" 2>/dev/null && ls .gpu/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
module=bench.gpu_check
if [ "${1:-}" = train ]; then shift; module=bench.gpu_train_check; fi
if [ "${1:-}" = load ]; then shift; set -- --batches 1 8 32 "$@"; fi
PYTHONUNBUFFERED=1 python3 -m "$module" "$@"
