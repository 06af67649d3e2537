"""How every method is scored: in one evaluation dtype (`--eval-dtype`, runtime.eval_dtype) with one attention
implementation, whatever dtype it trained in, so that "LoRA − full" and every forgetting figure compare the tuned
weights, not the precisions they happened to be scored in.

- the base model: loaded in the evaluation dtype (evaluate_base_model.py);
- LoRA and QLoRA: the trained adapters (fp32) on the base in the evaluation dtype: the trained model itself where
  its base is held in that dtype, else a fresh unquantised copy of the base (finetune.py, adapters.on_another_base);
- full fine-tuning: the trained weights cast to the evaluation dtype once the model is saved, as a deployment loads
  them (a bf16 copy of the fp32 master weights on CUDA; training.scored_in_eval_dtype).
"""

import dataclasses
import os
import sys

import torch

from lvf import settings as kit_settings
from lvf.errors import UsageError
from lvf.results import is_main_process

HALF_PRECISION = (torch.bfloat16, torch.float16)  # what flash-attn computes in


def scored_in(runtime):
    """The words every --dry-run and the pre-flight use for the scoring precision, e.g. "scored in bfloat16"."""
    return f"scored in {kit_settings.dtype_name(runtime.eval_dtype or runtime.dtype)}"


def sharded():
    """FSDP or DeepSpeed: their forward computes in the launch config's mixed precision (bf16 in configs/)."""
    return "true" in (os.environ.get("ACCELERATE_USE_FSDP", "").lower(),
                      os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower())


def scoring_problem(settings, runtime, method):
    """None, or one line naming the fix, for a run that could not be scored (or trained) as asked: found before
    any weights load, so that no trained model is lost to it.

    flash-attn computes in bf16 or fp16 only. transformers (integrations/flash_attention.py, get_target_dtype)
    hands it a float32 query as is when no autocast is on, taking the dtype of the weights, and flash-attn then
    refuses it: so scoring in float32, or training float32 weights without bf16 autocast, would die at the first
    forward. Under FSDP or DeepSpeed the sharded forward computes in the config's bf16 whatever --eval-dtype says."""
    training = method in ("lora", "qlora", "full")
    eval_dtype = runtime.eval_dtype or runtime.dtype
    if method == "full" and sharded() and eval_dtype != torch.bfloat16:
        return (f"--eval-dtype {settings.eval_dtype}: under FSDP or DeepSpeed the sharded forward computes in bf16 "
                f"(the launch config's mixed precision), not in {kit_settings.dtype_name(eval_dtype)}: pass "
                "--eval-dtype bfloat16, or score the saved model afterwards with evaluate_base_model.py --model "
                "FOLDER")
    if getattr(settings, "attn_implementation", None) != "flash_attention_2":
        return None
    fixes = "or --attn-implementation sdpa"
    if training and runtime.dtype not in HALF_PRECISION and not runtime.bf16_autocast:
        return (f"--attn-implementation flash_attention_2 computes in bfloat16 or float16 only: this run trains "
                f"{kit_settings.dtype_name(runtime.dtype)} weights without autocast: pass --bf16-autocast on, "
                f"{fixes}")
    if eval_dtype not in HALF_PRECISION:
        return (f"--attn-implementation flash_attention_2 computes in bfloat16 or float16 only: this run would be "
                f"{scored_in(runtime)} (--eval-dtype {settings.eval_dtype}): pass --eval-dtype bfloat16, {fixes}")
    return None


def check_scoring(settings, runtime, method):
    """A real run's check before anything loads (a dry run shows the same line as a pre-flight problem)."""
    problem = scoring_problem(settings, runtime, method)
    if problem is not None:
        raise UsageError(problem)


def announce_gpu_scoring(settings, runtime):
    """evaluate_base_model.py's dry run on a machine without CUDA where the user did not ask for the CPU: the
    precision these flags would score in on a GPU, in the words the training scripts' 80 GB plan line ends with
    (lvf.plan.announce_gpu_plan). Returns that runtime, or None."""
    if runtime.device != "cpu" or getattr(settings, "device", "auto") != "auto":
        return None
    eval_dtype = kit_settings.resolve_eval_dtype(settings.eval_dtype, "cuda")
    on_gpu = dataclasses.replace(runtime, device="cuda", dtype=eval_dtype, eval_dtype=eval_dtype)
    if is_main_process():
        print(f"on one 80 GB CUDA GPU these flags would be {scored_in(on_gpu)}", file=sys.stderr)
    return on_gpu
