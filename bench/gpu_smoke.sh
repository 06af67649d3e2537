#!/usr/bin/env bash
# GPU smoke run of the real scripts on one GPU with no network (for a machine that has torch with CUDA,
# transformers 5.17 or later, peft and accelerate, but perhaps no datasets or bitsandbytes), within 15 minutes:
# evaluate_base_model.py, finetune.py, finetune.py --quantize 4bit and full_finetune.py (paged 8-bit AdamW) on a
# random ~480M-parameter Llama saved locally, bf16 and gradient checkpointing, each writing its results JSON under
# $OUT; then bench/gpu_check.py (the 8B-architecture throughput and memory table).
#
#   pip install --no-deps llama-models             # first, where the registries are: the Llama 3 tokenizer's source
#   python bench/gpu_smoke.py prepare .gpu-smoke   # then: wheels + tokenizer (~53 MiB); without it the run stops at once
#   bash bench/gpu_smoke.sh                        # on the GPU machine, with .gpu-smoke carried beside the code
#   bash bench/gpu_smoke.sh --cpu-dry              # the same steps on the CPU: tiny model, few steps, no wheels
#
# The carried wheels (bench/requirements-gpu-smoke.txt) are installed with --no-index from .gpu-smoke/wheels only,
# into a folder put first on PYTHONPATH: they shadow the machine's transformers; its CUDA torch stays.
set -uo pipefail
cd "$(dirname "$0")/.."
PREPARED=${PREPARED:-.gpu-smoke}
OUT=${OUT:-outputs/gpu-smoke}
CPU_DRY=0
[ "${1:-}" = "--cpu-dry" ] && CPU_DRY=1
if [ "$CPU_DRY" = 0 ] && { [ ! -d "$PREPARED/wheels" ] || [ ! -d "$PREPARED/tokenizer" ]; }; then
  echo "gpu_smoke.sh: $PREPARED/wheels and $PREPARED/tokenizer are needed: first run, where PyPI can be reached, pip install --no-deps llama-models && python bench/gpu_smoke.py prepare $PREPARED, then carry $PREPARED beside the code (or run bash bench/gpu_smoke.sh --cpu-dry)" >&2
  exit 2
fi
WORK=$(mktemp -d -t lvf-gpu-smoke-XXXXXX)
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
log() { echo "[gpu_smoke.sh $(date -u +%H:%M:%S)] $*"; }
status=0
step() {  # step NAME SECONDS COMMAND...: runs one step to its end or its time limit; a failure fails the run, not the rest
  local name=$1 seconds=$2; shift 2
  log "$name: $*"
  local start=$SECONDS
  timeout --signal=TERM --kill-after=15 "$seconds" "$@" > "$OUT/$name.log" 2>&1
  local code=$?
  log "$name: exit $code in $((SECONDS - start)) s (log: $OUT/$name.log)"
  [ "$code" -eq 0 ] || { status=1; tail -n 25 "$OUT/$name.log"; }
}

if [ "$CPU_DRY" = 1 ]; then
  if [ -z "${PYTHON:-}" ]; then if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi; fi
  SIZE=(--tiny); TOKENIZER=(); FULL_OPTIM=adamw_torch   # bitsandbytes' paged optimizers need CUDA
  TRAIN=(--max-train-samples 8 --max-val-samples 2 --max-steps 2 --eval-steps 2 --batch-size 2 --grad-accum 1)
  EVAL=(--max-eval-samples 4 --max-length 256 --bootstrap-resamples 10 --general-file python-docs --max-general-blocks 4)
  CHECK=(--tiny)
else
  PYTHON=${PYTHON:-python3}
  step install 300 "$PYTHON" -m pip install --no-index --no-deps --find-links "$PREPARED/wheels" \
    --target "$WORK/site" -r bench/requirements-gpu-smoke.txt
  # The project folder too: on this bare machine the kit is not installed (no `pip install -e .`), and
  # bench/gpu_smoke.py and bench/gpu_check.py import lvf and common.
  export PYTHONPATH="$WORK/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  SIZE=(); TOKENIZER=(--tokenizer "$PREPARED/tokenizer"); FULL_OPTIM=paged_adamw_8bit
  TRAIN=(--max-train-samples 256 --max-val-samples 16 --max-steps 30 --eval-steps 30 --batch-size 8 --grad-accum 1)
  EVAL=(--max-eval-samples 64 --max-length 1024 --general-file python-docs --max-general-blocks 16)
  CHECK=(--budget-seconds 300)
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || log "nvidia-smi not available"

# build-model prints the versions of torch, transformers, peft, accelerate and bitsandbytes first (one process
# imports them all, once): shown here, and in the tail of its log should it fail.
step build-model 300 "$PYTHON" bench/gpu_smoke.py build-model --output "$WORK/model" "${SIZE[@]}" "${TOKENIZER[@]}"
grep -h "^\[gpu_smoke\] torch " "$OUT/build-model.log" || true
DATA=(--model "$WORK/model" --dataset data/demo.jsonl "${EVAL[@]}")
# bf16 weights, bf16 autocast and gradient checkpointing are the CUDA defaults; "on" makes the dry run take them too.
LEVERS=(--gradient-checkpointing on)
step base 300 "$PYTHON" evaluate_base_model.py "${DATA[@]}" --output "$OUT/base.json"
step lora 300 "$PYTHON" finetune.py "${DATA[@]}" "${TRAIN[@]}" "${LEVERS[@]}" --output "$OUT/lora.json" \
  --output-dir "$WORK/lora"
step qlora 300 "$PYTHON" finetune.py "${DATA[@]}" "${TRAIN[@]}" "${LEVERS[@]}" --quantize 4bit \
  --output "$OUT/qlora.json" --output-dir "$WORK/qlora"
step full 300 "$PYTHON" full_finetune.py "${DATA[@]}" "${TRAIN[@]}" "${LEVERS[@]}" --optim "$FULL_OPTIM" \
  --output "$OUT/full.json" --output-dir "$WORK/full"
"$PYTHON" bench/gpu_smoke.py check "$OUT" | tee "$OUT/table.md" || status=1
step gpu_check 420 "$PYTHON" bench/gpu_check.py "${CHECK[@]}" --output "$OUT/gpu_check.json"
grep -A 20 "^| method" "$OUT/gpu_check.log" || true
rm -rf "$WORK"
log "done: exit $status; results in $OUT"
exit $status
