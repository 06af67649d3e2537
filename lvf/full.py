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
DTYPE_HELP = ("the dtype every weight is trained in (scored in --eval-dtype): float32 keeps fp32 master weights, with "
              "bf16 compute under --bf16-autocast; bfloat16 halves weights and gradients, but at full fine-tuning's "
              "learning rates most AdamW updates then round away (the script warns); auto is bfloat16 on CUDA, "
              "float32 on CPU")


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
                            "and one process, and clips no gradients. auto: on with one CUDA GPU whatever its "
                            "memory (one recipe on every card), off on CPU and under several processes; off: "
                            "stepped after backward, gradients clipped at norm 1.0")
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


def use_optimizer_in_backward(args, runtime):
    """Whether to step the optimizer in backward (lvf.training.OptimizerInBackward): asked with on; by default (auto)
    with one process on a CUDA GPU, whatever the GPU's memory. Why one recipe for every card: stepped in backward,
    Llama 3 8B's full fine-tuning fits an 80 GB GPU (68.9 GiB planned; after backward its fp32 gradients make it
    81.5 GiB), and a larger GPU runs the same update rather than another one (global-norm clipping, which the step
    in backward cannot do: no moment holds every gradient), so a study's learning rates and results do not depend on
    the card it ran on (docs/performance.md, "One recipe on every card"). Off on the CPU, whose demo steps after
    backward with clipping. Refuses what it cannot do: accumulate gradients (each weight is stepped as soon as its
    gradient of one micro-batch is complete), and run under several processes (DDP, FSDP, DeepSpeed reduce gradients
    after backward)."""
    distributed = runtime.world_size > 1 or "true" in (os.environ.get("ACCELERATE_USE_FSDP"),
                                                       os.environ.get("ACCELERATE_USE_DEEPSPEED"))
    if args.optim_in_backward == "off" or (args.optim_in_backward == "auto" and (distributed
                                                                                 or runtime.device != "cuda")):
        return False
    why = ("on a CUDA GPU full fine-tuning steps the optimizer in backward (--optim-in-backward auto)"
           if args.optim_in_backward == "auto" else "--optim-in-backward on")
    if distributed:
        raise errors.UsageError(f"{why} needs a single process (it steps before gradients are reduced): pass "
                                "--optim-in-backward off under accelerate launch, FSDP or DeepSpeed")
    if args.grad_accum > 1:
        raise errors.UsageError(
            f"{why}, which cannot accumulate gradients: pass --batch-size {args.batch_size * args.grad_accum} "
            f"--grad-accum 1 (the same {args.batch_size * args.grad_accum} examples a step), or "
            "--optim-in-backward off (holds fp32 gradients: Llama 3 8B then needs more than 80 GB)")
    return True


def resolve_runtime(args, device=None):
    """The runtime, with the optimizer and why (runtime.optimizer_reason: recorded, and said by the pre-flight
    and as training starts, preflight.optimizer_line), and whether it steps in backward. device: the runtime these
    flags would resolve to on another machine (a CUDA GPU, for a dry run without one)."""
    device = device or settings.requested_device(args)
    if args.optim == "auto":
        optimizer, reason = default_optimizer_choice(device)
    else:
        optimizer, reason = args.optim, "--optim"
    runtime = settings.training_runtime(args, METHOD, optimizer, optimizer_reason=reason, device=device)
    in_backward = use_optimizer_in_backward(args, runtime)
    # Stepped in backward, no moment holds every gradient to clip (0: no clipping; else the Trainer's 1.0).
    return METHOD, dataclasses.replace(runtime, optimizer_in_backward=in_backward,
                                       max_grad_norm=0.0 if in_backward else runtime.max_grad_norm)
