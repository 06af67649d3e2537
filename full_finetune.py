"""Full fine-tuning of every weight, then perplexity on the held-out split.

    python full_finetune.py                            # Llama 3 8B Instruct on dolly-15k, paged 8-bit AdamW
                                                       # (stepped in backward on GPUs below 100 GiB)
    python full_finetune.py --model smollm2-135m --dataset data/demo.jsonl
"""

import dataclasses
import importlib.util
import os
import sys

import torch

from lvf import errors, memory, models, results, settings, training

METHOD = "full"
# This script's defaults where they differ from the shared flags' (bench/ reads them here too). 4 examples a step
# in one micro-batch: the optimizer step in backward (below) cannot accumulate gradients.
DEFAULTS = {"learning_rate": 1e-5, "batch_size": 4, "grad_accum": 1}
# GPUs with less memory than this step the optimizer in backward by default: Llama 3 8B's fp32 weights, fp32
# gradients and 8-bit AdamW states alone are 80.6 GB (docs/performance.md, "Full fine-tuning on one 80 GB GPU").
IN_BACKWARD_BELOW_GIB = 100


def parse_args(argv=None):
    parser = settings.evaluation_parser(__doc__.splitlines()[0], METHOD)
    group = settings.add_training_flags(parser, METHOD, **DEFAULTS)
    group.add_argument("--optim", default="auto",
                       help="Trainer optimizer; auto = paged_adamw_8bit on CUDA with bitsandbytes (adamw_torch "
                            "under FSDP or DeepSpeed), else adamw_torch")
    group.add_argument("--optim-in-backward", choices=["auto", "on", "off"], default="auto",
                       help="step each weight's optimizer as soon as its gradient is complete and free the gradient, "
                            "so no fp32 gradients are held (Llama 3 8B fits one 80 GB GPU); needs --grad-accum 1 "
                            "and one process, and clips no gradients. auto: on with a CUDA GPU below "
                            f"{IN_BACKWARD_BELOW_GIB} GiB, off on larger GPUs and on CPU")
    # fp32 master weights, bf16 compute (autocast, on by default on CUDA): in bf16 weights most AdamW updates at
    # lr 1e-5 are smaller than half a bf16 step of the weight and round away (README: memory per option).
    parser.set_defaults(dtype="float32")
    return settings.parse(parser, argv)


def warn_if_updates_round_away(runtime):
    if runtime.dtype == torch.bfloat16 and results.is_main_process():
        print("warning: --dtype bfloat16 holds the weights themselves in bf16: at full fine-tuning's learning "
              "rates most AdamW updates round away; the default float32 keeps them (bf16 compute via autocast)",
              file=sys.stderr)


def default_optimizer(device):
    """Paged 8-bit AdamW on CUDA when bitsandbytes is there; plain AdamW on CPU, and under FSDP or
    DeepSpeed, whose sharded optimizer states bitsandbytes' optimizers do not handle."""
    sharded = "true" in (os.environ.get("ACCELERATE_USE_FSDP"), os.environ.get("ACCELERATE_USE_DEEPSPEED"))
    has_bitsandbytes = importlib.util.find_spec("bitsandbytes") is not None
    return "paged_adamw_8bit" if device == "cuda" and has_bitsandbytes and not sharded else "adamw_torch"


def gpu_memory_bytes():
    """Total memory of the GPU this process trains on."""
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory


def use_optimizer_in_backward(args, runtime):
    """Whether to step the optimizer in backward (lvf.training.OptimizerInBackward): asked with on; by default
    where fp32 gradients for every weight would not fit, i.e. on one CUDA GPU below IN_BACKWARD_BELOW_GIB. Refuses what
    it cannot do: accumulate gradients (each weight is stepped as soon as its gradient of one micro-batch is
    complete), and run under several processes (DDP, FSDP, DeepSpeed reduce gradients after backward)."""
    distributed = runtime.world_size > 1 or "true" in (os.environ.get("ACCELERATE_USE_FSDP"),
                                                       os.environ.get("ACCELERATE_USE_DEEPSPEED"))
    if args.optim_in_backward == "off" or (args.optim_in_backward == "auto" and distributed):
        return False
    if args.optim_in_backward == "auto":
        if runtime.device != "cuda" or gpu_memory_bytes() >= IN_BACKWARD_BELOW_GIB * 2**30:
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


def resolve_runtime(args):
    optimizer = default_optimizer if args.optim == "auto" else args.optim
    runtime = settings.training_runtime(args, METHOD, optimizer)
    return METHOD, dataclasses.replace(runtime, optimizer_in_backward=use_optimizer_in_backward(args, runtime))


def main(argv=None):
    args = parse_args(argv)
    _, runtime = resolve_runtime(args)
    results.check_outputs(runtime, writes_model=not args.dry_run)  # before any data or model is loaded
    training.start_run(args, runtime)
    warn_if_updates_round_away(runtime)

    if args.dry_run:
        model = models.meta_model(models.model_config(args.model, args.trust_remote_code))
        trainable, total = models.count_parameters(model)
        record = results.build_results(args, runtime, METHOD, trainable_params=trainable, total_params=total,
                                       base_params=total)
        return results.finish(record, runtime.output)

    # Everything that can be wrong with the input fails here, in seconds, before the model loads.
    source = models.check_model_source(args.model)
    models.check_attention_implementation(args.attn_implementation)
    loaded = training.load_training_data(args, runtime, source, METHOD)
    tokenizer, examples, truncation, eval_records, training_args = loaded
    with memory.PhasePeak(runtime.device) as load_peak:
        model = models.load_model(source, runtime.dtype, runtime.device, args.trust_remote_code,
                                  attn_implementation=args.attn_implementation)
        models.pad_with_the_tokenizers_token(model, tokenizer)
    stored_as = models.dtype_by_part(model)

    measured = training.train_evaluate_save(args, runtime, model, tokenizer, examples, eval_records, METHOD,
                                            training_args, load_peak)
    trainable, total = models.count_parameters(model)
    record = results.build_results(args, runtime, METHOD, **measured, trainable_params=trainable,
                                   total_params=total, base_params=total, truncation=truncation,
                                   dtype_by_part=stored_as)
    results.finish(record, runtime.output, fallback_dir=runtime.output_dir)


if __name__ == "__main__":
    errors.main_guard(main)
