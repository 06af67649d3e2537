#!/usr/bin/env bash
# GPU check for one GPU (sized for an H200), offline, under 8 minutes: LoRA and full fine-tuning of the
# Llama-3-8B architecture with random weights (in each script's dtype: LoRA's frozen base in bf16, full
# fine-tuning's fp32 master weights) at sequence 2048, batch 2, a few steps each; tokens/s and the measured
# training peak (torch.cuda.max_memory_allocated plus bitsandbytes' paged optimizer states) as JSON, beside each
# method's planned memory (lvf/plan.py, computed before training) and torchtune's published figures.
#
#   bash bench/gpu_check.sh                    # writes $OUT/gpu_check.json, else bench/results/gpu_check.json
#   bash bench/gpu_check.sh --output x.json    # any bench/gpu_check.py flag passes through
#
# Trains through the kit's own Trainer setup (finetune.py's and full_finetune.py's settings and optimizer).
# Needs torch (CUDA), transformers (5.17 or later), tokenizers, peft and accelerate; no datasets; uses
# bitsandbytes' paged 8-bit AdamW for full fine-tuning only if it imports, as full_finetune.py does. PYTHON picks the interpreter (default: .venv/bin/python if present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
# The kit's library (lvf, common.py) from this folder, whether or not it is installed (pip install --no-deps -e .).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Fewer fragmentation stalls when the full fine-tuning run follows the LoRA run in the same process.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
# One GPU, set before CUDA starts: the first one CUDA_VISIBLE_DEVICES names, else GPU 0 (tokens/s are one GPU's).
CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES-0}"
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES%%,*}"

echo "[gpu_check.sh] $(date -u +%Y-%m-%dT%H:%M:%SZ) python: $PYTHON; one GPU: CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "[gpu_check.sh] nvidia-smi not available"
"$PYTHON" -c "import torch, transformers, peft; print('[gpu_check.sh] torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), '| transformers', transformers.__version__, '| peft', peft.__version__)"
# The Python side stops timing new steps after --budget-seconds (420); the hard limit below is the backstop.
exec timeout --signal=TERM --kill-after=15 460 "$PYTHON" bench/gpu_check.py "$@"
