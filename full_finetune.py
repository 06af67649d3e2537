"""Full fine-tuning of every weight, then perplexity on the held-out split.

    python full_finetune.py                            # Llama 3 8B Instruct on dolly-15k, paged 8-bit AdamW
    python full_finetune.py --config experiments/demo-cpu.yaml   # the CPU demo's settings (SmolLM2-135M)
"""

import importlib.util
import os
import sys

import torch

import common
from lvf import artifacts, errors, memory, models, results, settings, training

METHOD = "full"
# This script's defaults where they differ from the shared flags' (bench/ reads them here too); with the shared
# flags' they are experiments/llama3-8b-dolly.yaml's experiment (tests/test_experiments.py checks that).
DEFAULTS = {"learning_rate": 1e-5, "batch_size": 2, "grad_accum": 2}


def parse_args(argv=None):
    parser = settings.evaluation_parser(__doc__.splitlines()[0], METHOD)
    group = settings.add_training_flags(parser, METHOD, **DEFAULTS)
    group.add_argument("--optim", default="auto",
                       help="Trainer optimizer; auto = paged_adamw_8bit on CUDA with bitsandbytes (adamw_torch "
                            "under FSDP or DeepSpeed), else adamw_torch")
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
    """Paged 8-bit AdamW on CUDA when bitsandbytes is there; plain AdamW on CPU, and under FSDP or
    DeepSpeed, whose sharded optimizer states bitsandbytes' optimizers do not handle."""
    sharded = "true" in (os.environ.get("ACCELERATE_USE_FSDP"), os.environ.get("ACCELERATE_USE_DEEPSPEED"))
    has_bitsandbytes = importlib.util.find_spec("bitsandbytes") is not None
    return "paged_adamw_8bit" if device == "cuda" and has_bitsandbytes and not sharded else "adamw_torch"


def resolve_runtime(args):
    optimizer = default_optimizer if args.optim == "auto" else args.optim
    return METHOD, settings.training_runtime(args, METHOD, optimizer)


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

    # Inputs. Everything that can be wrong with them fails here, in seconds, before the model loads; the data is
    # read before the tokenizer, so a data error shows in milliseconds.
    source = models.check_model_source(args.model)
    models.check_attention_implementation(args.attn_implementation)
    records = common.load_splits(args)  # train, validation, eval
    tokenizer = models.load_tokenizer(source, args.chat_template, args.trust_remote_code)
    examples, truncation = common.load_examples(args, tokenizer, records)
    training_args = training.training_arguments(args, runtime, len(examples["train"]))  # before the model loads
    artifacts.write_origin(runtime.output_dir, METHOD, args.model, runtime.experiment)  # what the checkpoints are

    # The model, every weight trainable.
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

    # Save the model, then record.
    artifact = training.save_artifact(trainer, runtime.output_dir)
    trainable, total = models.count_parameters(model)
    record = results.build_results(args, runtime, METHOD, **measured, **evaluation,
                                   **memory.phase_fields(load=load_peak, train=train_peak, eval=eval_peak),
                                   **results.process_peak_fields(runtime.device), **training.artifact_fields(artifact),
                                   trainable_params=trainable, total_params=total, base_params=total,
                                   truncation=truncation, dtype_by_part=stored_as)
    results.finish(record, runtime.output, fallback_dir=runtime.output_dir)


if __name__ == "__main__":
    errors.main_guard(main)
