"""Full fine-tuning of every weight, then perplexity on the held-out split.

    python full_finetune.py                            # Llama 3 8B Instruct on dolly-15k, paged 8-bit AdamW
                                                       # (stepped in backward on one CUDA GPU, any size)
    python full_finetune.py --config experiments/demo-cpu.yaml   # the CPU demo's settings (SmolLM2-135M)
"""

import common
from lvf import (
    artifacts,
    benchmarks,
    dry_run,
    errors,
    full,
    memory,
    models,
    plan,
    precision,
    preflight,
    results,
    settings,
    training,
)


def parse_args(argv=None):
    return full.parse_args(argv, about=settings.description(__doc__))


def main(argv=None):
    memory.use_expandable_segments()  # before anything initialises CUDA
    args = parse_args(argv)
    method, runtime = full.resolve_runtime(args)
    results.check_outputs(runtime, writes_model=not args.dry_run)  # before any data or model is loaded
    training.start_run(args, runtime)
    full.warn_if_updates_round_away(runtime)

    if args.dry_run:
        model = models.meta_model(models.model_config(args.model, args.trust_remote_code))
        return dry_run.dry_run(args, runtime, method, model, full.resolve_runtime)

    # Inputs. Everything that can be wrong with them fails here, in seconds, before the model loads; the data is
    # read before the tokenizer, so a data error shows in milliseconds.
    preflight.stop_if_blocked(args, runtime, method)  # the GPU, its driver and host memory, as the dry run checks
    source = models.check_model_source(args.model)
    models.check_attention_implementation(args.attn_implementation)
    precision.check_scoring(args, runtime, method)
    tasks = benchmarks.check_benchmarks(args, multiple_processes=runtime.world_size > 1)
    records = common.load_splits(args)  # train, validation, eval
    tokenizer = models.load_tokenizer(source, args.chat_template, args.trust_remote_code)
    examples, truncation = common.load_examples(args, tokenizer, records)
    training_args = training.training_arguments(args, runtime, len(examples["train"]))  # before the model loads
    artifacts.write_origin(runtime.output_dir, method, args.model, runtime.experiment)  # what the checkpoints are

    # The memory plan, in one line; then the model, every weight trainable.
    planned = plan.announce_plan(args, runtime, method,
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
                                                      method)
    scored_benchmarks = benchmarks.score(trainer.accelerator.unwrap_model(scored), tokenizer, args, tasks)

    # Record.
    trainable, total = models.count_parameters(model)
    record = results.build_results(args, runtime, method, **measured, **evaluation,
                                   **memory.phase_fields(load=load_peak, train=train_peak, eval=eval_peak),
                                   **memory.process_peak_fields(runtime.device), **training.artifact_fields(artifact),
                                   trainable_params=trainable, total_params=total, base_params=total,
                                   truncation=truncation, dtype_by_part=stored_as, planned_memory=planned,
                                   **scored_benchmarks)
    results.finish(record, runtime.output, fallback_dir=runtime.output_dir)


if __name__ == "__main__":
    errors.main_guard(main)
