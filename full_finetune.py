"""Full fine-tuning of every weight, then perplexity on the held-out split.

    python full_finetune.py                            # Llama 3 8B Instruct on dolly-15k, paged 8-bit AdamW
                                                       # (stepped in backward on one CUDA GPU, any size)
    python full_finetune.py --config experiments/demo-cpu.yaml   # the CPU demo's settings (SmolLM2-135M)
"""

import dataclasses
import importlib.util
import os
import sys

import torch

import common
from lvf import artifacts, errors, memory, models, plan, precision, preflight, results, settings, training

METHOD = "full"
# This script's defaults where they differ from the shared flags' (bench/ reads them here too); with the shared
# flags' they are experiments/llama3-8b-dolly.yaml's experiment (tests/test_experiments.py checks that). 4 examples a
# step in one micro-batch: the optimizer step in backward (below) cannot accumulate gradients.
DEFAULTS = {"learning_rate": 1e-5, "batch_size": 4, "grad_accum": 1}
DTYPE_HELP = ("the dtype every weight is trained in (scored in --eval-dtype): float32 keeps fp32 master weights, with "
              "bf16 compute under --bf16-autocast; bfloat16 halves weights and gradients, but at full fine-tuning's "
              "learning rates most AdamW updates then round away (the script warns); auto is bfloat16 on CUDA, "
              "float32 on CPU")


def parse_args(argv=None):
    parser = settings.evaluation_parser(settings.description(__doc__), METHOD, dtype_help=DTYPE_HELP)
    group = settings.add_training_flags(parser, METHOD, **DEFAULTS)
    group.add_argument("--optim", default="auto",
                       help="Trainer optimizer; auto = paged_adamw_8bit on CUDA with bitsandbytes (adamw_torch "
                            "under FSDP or DeepSpeed), else adamw_torch; the run says which it uses and why")
    group.add_argument("--optim-in-backward", choices=["auto", "on", "off"], default="auto",
                       help="step each weight's optimizer as soon as its gradient is complete and free the gradient, "
                            "so no fp32 gradients are held (Llama 3 8B fits one 80 GB GPU); needs --grad-accum 1 "
                            "and one process, and clips no gradients. auto: on with one CUDA GPU whatever its "
                            "memory (one recipe on every card), off on CPU and under several processes; off: "
                            "stepped after backward, gradients clipped at norm 1.0")
    # fp32 master weights, bf16 compute (autocast, on by default on CUDA): in bf16 weights most AdamW updates at
    # lr 1e-5 are smaller than half a bf16 step of the weight and round away (README: memory per option).
    parser.set_defaults(dtype="float32")
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


def main(argv=None):
    args = parse_args(argv)
    _, runtime = resolve_runtime(args)
    results.check_outputs(runtime, writes_model=not args.dry_run)  # before any data or model is loaded
    training.start_run(args, runtime)
    warn_if_updates_round_away(runtime)

    if args.dry_run:
        model = models.meta_model(models.model_config(args.model, args.trust_remote_code))
        trainable, total = models.count_parameters(model)
        planned = plan.announce_plan(args, runtime, METHOD, model)
        plan.announce_gpu_plan(args, runtime, METHOD, model, resolve_runtime)
        record = results.build_results(args, runtime, METHOD, trainable_params=trainable, total_params=total,
                                       base_params=total, planned_memory=planned)
        results.finish(record, runtime.output)
        return preflight.report_and_exit_code(args, runtime, METHOD, params=total, trainable=trainable,
                                              planned_memory=planned)

    # Inputs. Everything that can be wrong with them fails here, in seconds, before the model loads; the data is
    # read before the tokenizer, so a data error shows in milliseconds.
    source = models.check_model_source(args.model)
    models.check_attention_implementation(args.attn_implementation)
    precision.check_scoring(args, runtime, METHOD)
    records = common.load_splits(args)  # train, validation, eval
    tokenizer = models.load_tokenizer(source, args.chat_template, args.trust_remote_code)
    examples, truncation = common.load_examples(args, tokenizer, records)
    training_args = training.training_arguments(args, runtime, len(examples["train"]))  # before the model loads
    artifacts.write_origin(runtime.output_dir, METHOD, args.model, runtime.experiment)  # what the checkpoints are

    # The memory plan, in one line; then the model, every weight trainable.
    planned = plan.announce_plan(args, runtime, METHOD,
                                 models.meta_model(models.model_config(args.model, args.trust_remote_code)))
    with memory.PhasePeak(runtime.device) as load_peak:
        model = models.load_model(source, runtime.dtype, runtime.device, args.trust_remote_code,
                                  attn_implementation=args.attn_implementation)
        models.pad_with_the_tokenizers_token(model, tokenizer)
    stored_as = models.dtype_by_part(model)

    # Train; the checkpoint with the lowest validation loss is kept.
    trainer, measured, train_peak = training.train(args, runtime, model, tokenizer, examples["train"],
                                                   examples["validation"], training_args)

    # Save the model first (in its training dtype): nothing in scoring can lose it.
    artifact = training.save_artifact(trainer, runtime.output_dir)

    # Score as every method is scored (lvf.precision): autocast taken off, the weights cast to the evaluation dtype
    # (on CUDA a bf16 copy of the fp32 master weights). Every rank evaluates the whole set: under FSDP and DeepSpeed
    # the forwards gather the weights collectively; the main process writes the results.
    scored = training.scored_in_eval_dtype(trainer, runtime)
    evaluation, eval_peak = training.evaluate_trained(scored, trainer, tokenizer, examples, records[2], args, runtime,
                                                      METHOD)

    # Record.
    trainable, total = models.count_parameters(model)
    record = results.build_results(args, runtime, METHOD, **measured, **evaluation,
                                   **memory.phase_fields(load=load_peak, train=train_peak, eval=eval_peak),
                                   **results.process_peak_fields(runtime.device), **training.artifact_fields(artifact),
                                   trainable_params=trainable, total_params=total, base_params=total,
                                   truncation=truncation, dtype_by_part=stored_as, planned_memory=planned)
    results.finish(record, runtime.output, fallback_dir=runtime.output_dir)


if __name__ == "__main__":
    errors.main_guard(main)
