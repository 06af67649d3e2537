"""Full fine-tuning as full_finetune.py runs it: its defaults and flags, and its optimizer policy (which optimizer
--optim auto picks, and whether it steps in backward) in the runtime it resolves. The script is the recipe; the
study, bench/ and the memory plan read the method here, never from the script."""

import dataclasses
import importlib.util
import os
import sys

import torch

from lvf import defaults, errors, results, settings

METHOD = "full"
# GPUs with less memory than this step the optimizer in backward by default: Llama 3 8B's fp32 weights, fp32
# gradients and 8-bit AdamW states alone are 80.6 GB (docs/performance.md, "Full fine-tuning on one 80 GB GPU").
IN_BACKWARD_BELOW_GIB = 100
DTYPE_HELP = ("the dtype every weight is trained and scored in: float32 keeps fp32 master weights, with bf16 compute "
              "under --bf16-autocast; bfloat16 halves weights and gradients, but at full fine-tuning's learning rates "
              "most AdamW updates then round away (the script warns); auto is bfloat16 on CUDA, float32 on CPU")


def parse_args(argv=None, about=None):
    """full_finetune.py's Settings from argv (about: its --help description; the study and the bench parse
    without)."""
    parser = settings.evaluation_parser(about, METHOD, dtype_help=DTYPE_HELP)
    group = settings.add_training_flags(parser, METHOD, learning_rate=defaults.FULL.learning_rate,
                                        batch_size=defaults.FULL.batch_size, grad_accum=defaults.FULL.grad_accum)
    group.add_argument("--optim", default="auto",
                       help="Trainer optimizer; auto = paged_adamw_8bit on CUDA with bitsandbytes (adamw_torch "
                            "under FSDP or DeepSpeed), else adamw_torch; the run says which it uses and why")
    group.add_argument("--optim-in-backward", choices=["auto", "on", "off"], default="auto",
                       help="step each weight's optimizer as soon as its gradient is complete and free the gradient, "
                            "so no fp32 gradients are held (Llama 3 8B fits one 80 GB GPU); needs --grad-accum 1 "
                            "and one process, and clips no gradients. auto: on with a CUDA GPU below "
                            f"{IN_BACKWARD_BELOW_GIB} GiB, off on larger GPUs and on CPU")
    parser.set_defaults(dtype=defaults.FULL.dtype)
    return settings.parse(parser, argv, sections=("shared", "training", "full_finetune"))


def warn_if_updates_round_away(runtime):
    if runtime.dtype == torch.bfloat16 and results.is_main_process():
        print("warning: --dtype bfloat16 holds the weights themselves in bf16: at full fine-tuning's learning "
              "rates most AdamW updates round away; the default float32 keeps them (bf16 compute via autocast)",
              file=sys.stderr)


def default_optimizer(device):
    return default_optimizer_choice(device)[0]


def default_optimizer_choice(device):
    """--optim auto: (optimizer, why). Paged 8-bit AdamW on CUDA when bitsandbytes is there; plain AdamW on
    CPU, and under FSDP or DeepSpeed, whose sharded optimizer states bitsandbytes' optimizers do not handle.
    Without bitsandbytes on CUDA it is plain AdamW too, and the reason says so: never a silent change."""
    sharded = "true" in (os.environ.get("ACCELERATE_USE_FSDP"), os.environ.get("ACCELERATE_USE_DEEPSPEED"))
    if device != "cuda":
        return "adamw_torch", "--optim auto on the CPU: plain AdamW (paged 8-bit AdamW is for CUDA)"
    if sharded:
        return "adamw_torch", ("--optim auto under FSDP or DeepSpeed: plain AdamW (bitsandbytes' optimizers do "
                               "not handle sharded states)")
    if importlib.util.find_spec("bitsandbytes") is None:
        return "adamw_torch", ("--optim auto without bitsandbytes: plain AdamW, 8 bytes of optimizer state per "
                               "parameter instead of paged 8-bit AdamW's 2 (pip install bitsandbytes, or pass "
                               "--optim adamw_torch to choose plain AdamW)")
    return "paged_adamw_8bit", "--optim auto on CUDA with bitsandbytes: paged 8-bit AdamW"


def gpu_memory_bytes():
    """Total memory of the GPU this process trains on."""
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory


def use_optimizer_in_backward(args, runtime, gpu_bytes=None):
    """Whether to step the optimizer in backward (lvf.training.OptimizerInBackward): asked with on; by default
    where fp32 gradients for every weight would not fit, i.e. on one CUDA GPU below IN_BACKWARD_BELOW_GIB. Refuses what
    it cannot do: accumulate gradients (each weight is stepped as soon as its gradient of one micro-batch is
    complete), and run under several processes (DDP, FSDP, DeepSpeed reduce gradients after backward)."""
    distributed = runtime.world_size > 1 or "true" in (os.environ.get("ACCELERATE_USE_FSDP"),
                                                       os.environ.get("ACCELERATE_USE_DEEPSPEED"))
    if args.optim_in_backward == "off" or (args.optim_in_backward == "auto" and distributed):
        return False
    if args.optim_in_backward == "auto":
        if runtime.device != "cuda" or (gpu_bytes or gpu_memory_bytes()) >= IN_BACKWARD_BELOW_GIB * 2**30:
            return False
        why = f"on a GPU below {IN_BACKWARD_BELOW_GIB} GiB full fine-tuning steps the optimizer in backward"
    else:
        why = "--optim-in-backward on"
    if distributed:
        raise errors.UsageError(f"{why} needs a single process (it steps before gradients are reduced): pass "
                                "--optim-in-backward off under accelerate launch, FSDP or DeepSpeed")
    if args.grad_accum > 1:
        raise errors.UsageError(
            f"{why}, which cannot accumulate gradients: pass --batch-size {args.batch_size * args.grad_accum} "
            f"--grad-accum 1 (the same {args.batch_size * args.grad_accum} examples a step), or "
            "--optim-in-backward off (holds fp32 gradients: Llama 3 8B then needs more than 80 GB)")
    return True


def resolve_runtime(args, device=None, gpu_bytes=None):
    """The runtime, with the optimizer and why (runtime.optimizer_reason: recorded, and said by the pre-flight
    and as training starts, preflight.optimizer_line), and whether it steps in backward. device and gpu_bytes:
    the runtime these flags would resolve to on another machine (plan.GPU_PLAN_BYTES's GPU, for a dry run without
    one)."""
    device = device or settings.requested_device(args)
    if args.optim == "auto":
        optimizer, reason = default_optimizer_choice(device)
    else:
        optimizer, reason = args.optim, "--optim"
    runtime = settings.training_runtime(args, METHOD, optimizer, optimizer_reason=reason, device=device)
    in_backward = use_optimizer_in_backward(args, runtime, gpu_bytes)
    return METHOD, dataclasses.replace(runtime, optimizer_in_backward=in_backward)
