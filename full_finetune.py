"""Full fine-tuning of every weight, then perplexity on the held-out split.

    python full_finetune.py                            # Llama 3 8B Instruct on dolly-15k, paged 8-bit AdamW
                                                       # (stepped in backward on GPUs below 100 GiB)
    python full_finetune.py --config experiments/demo-cpu.yaml   # the CPU demo's settings (SmolLM2-135M)
"""

import dataclasses
import importlib.util
import os
import sys

import torch

import common
from lvf import artifacts, benchmarks, errors, memory, models, plan, preflight, results, settings, training

METHOD = "full"
# This script's defaults where they differ from the shared flags' (bench/ reads them here too); with the shared
# flags' they are experiments/llama3-8b-dolly.yaml's experiment (tests/test_experiments.py checks that). 4 examples a
# step in one micro-batch: the optimizer step in backward (below) cannot accumulate gradients.
DEFAULTS = {"learning_rate": 1e-5, "batch_size": 4, "grad_accum": 1}
# GPUs with less memory than this step the optimizer in backward by default: Llama 3 8B's fp32 weights, fp32
# gradients and 8-bit AdamW states alone are 80.6 GB (docs/performance.md, "Full fine-tuning on one 80 GB GPU").
IN_BACKWARD_BELOW_GIB = 100
DTYPE_HELP = ("the dtype every weight is trained and scored in: float32 keeps fp32 master weights, with bf16 compute "
              "under --bf16-autocast; bfloat16 halves weights and gradients, but at full fine-tuning's learning rates "
              "most AdamW updates then round away (the script warns); auto is bfloat16 on CUDA, float32 on CPU")


def parse_args(argv=None):
    parser = settings.evaluation_parser(settings.description(__doc__), METHOD, dtype_help=DTYPE_HELP)
    group = settings.add_training_flags(parser, METHOD, **DEFAULTS)
    group.add_argument("--optim", default="auto",
                       help="Trainer optimizer; auto = paged_adamw_8bit on CUDA with bitsandbytes (adamw_torch "
                            "under FSDP or DeepSpeed), else adamw_torch; the run says which it uses and why")
    group.add_argument("--optim-in-backward", choices=["auto", "on", "off"], default="auto",
                       help="step each weight's optimizer as soon as its gradient is complete and free the gradient, "
                            "so no fp32 gradients are held (Llama 3 8B fits one 80 GB GPU); needs --grad-accum 1 "
                            "and one process, and clips no gradients. auto: on with a CUDA GPU below "
                            f"{IN_BACKWARD_BELOW_GIB} GiB, off on larger GPUs and on CPU")
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
    tasks = benchmarks.check_benchmarks(args, multiple_processes=runtime.world_size > 1)
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

    # Score in the weights' own precision (autocast taken off). Every rank evaluates the whole set: under FSDP and
    # DeepSpeed the forwards gather the weights collectively; the main process writes the results.
    scored = training.without_mixed_precision_wrapper(trainer)
    evaluation, eval_peak = training.evaluate_trained(scored, trainer, tokenizer, examples, records[2], args, runtime,
                                                      METHOD)
    scored_benchmarks = benchmarks.score(trainer.accelerator.unwrap_model(scored), tokenizer, args, tasks)

    # Save the model, then record.
    artifact = training.save_artifact(trainer, runtime.output_dir)
    trainable, total = models.count_parameters(model)
    record = results.build_results(args, runtime, METHOD, **measured, **evaluation,
                                   **memory.phase_fields(load=load_peak, train=train_peak, eval=eval_peak),
                                   **results.process_peak_fields(runtime.device), **training.artifact_fields(artifact),
                                   trainable_params=trainable, total_params=total, base_params=total,
                                   truncation=truncation, dtype_by_part=stored_as, planned_memory=planned,
                                   **scored_benchmarks)
    results.finish(record, runtime.output, fallback_dir=runtime.output_dir)


if __name__ == "__main__":
    errors.main_guard(main)
