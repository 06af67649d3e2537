"""LoRA (or QLoRA with --quantize 4bit) fine-tuning, then perplexity on the held-out split.

    python finetune.py                                 # Llama 3 8B Instruct on dolly-15k, r=16 on q/k/v/o
    python finetune.py --config experiments/demo-cpu.yaml   # the CPU demo's settings (SmolLM2-135M)
"""

import common
from lvf import (
    adapters,
    artifacts,
    benchmarks,
    dry_run,
    errors,
    lora,
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
    return lora.parse_args(argv, about=settings.description(__doc__))


def main(argv=None):
    memory.use_expandable_segments()  # before anything initialises CUDA
    args = parse_args(argv)
    method, runtime = lora.resolve_runtime(args)
    results.check_outputs(runtime, writes_model=not args.dry_run)  # before any data or model is loaded
    training.start_run(args, runtime)

    if args.dry_run:
        return dry_run.dry_run(args, runtime, method, lora.meta_model(args), lora.resolve_runtime)

    # Inputs. Everything that can be wrong with them fails here, in seconds, before the model loads; the data is
    # read before the tokenizer, so a data error shows in milliseconds.
    preflight.stop_if_blocked(args, runtime, method)  # the GPU, its driver and host memory, as the dry run checks
    source = models.check_model_source(args.model)
    models.check_attention_implementation(args.attn_implementation)
    precision.check_scoring(args, runtime, method)
    tasks = benchmarks.check_benchmarks(args, multiple_processes=runtime.world_size > 1)
    quantization = models.four_bit_config(runtime.device) if args.quantize == "4bit" else None
    records = common.load_splits(args)  # train, validation, eval
    tokenizer = models.load_tokenizer(source, args.chat_template, args.trust_remote_code)
    examples, truncation = common.load_examples(args, tokenizer, records)
    training_args = training.training_arguments(args, runtime, len(examples["train"]))  # before the model loads
    artifacts.write_origin(runtime.output_dir, method, args.model, runtime.experiment)  # what the checkpoints are

    # The memory plan, in one line; then the model: the base (4-bit for QLoRA), then the adapters.
    planned = plan.announce_plan(args, runtime, method, lora.meta_model(args))
    with memory.PhasePeak(runtime.device) as load_peak:
        model = models.load_model(source, runtime.dtype, runtime.device, args.trust_remote_code, quantization,
                                  args.attn_implementation)
        models.pad_with_the_tokenizers_token(model, tokenizer)
        if quantization is not None:
            model = adapters.prepare_for_4bit_training(model)
        model = lora.add_adapters(model, args)
        if runtime.bf16_autocast and quantization is None:
            adapters.cast_adapter_inputs(model, enabled=False)
    trainable, total = models.count_parameters(model)
    stored_as = models.dtype_by_part(model)

    # Train; the checkpoint with the lowest validation loss is kept.
    trainer, measured, train_peak = training.train(args, runtime, model, tokenizer, examples["train"],
                                                   examples["validation"], training_args)

    # Save the adapter first: nothing in scoring can lose it.
    artifact = training.save_artifact(trainer, runtime.output_dir)

    # Score the adapters as the base model is scored (lvf.precision): on a fresh unquantised copy of the base in the
    # evaluation dtype when they trained on another (a bf16 copy, QLoRA's 4-bit base); else the trained model itself,
    # without autocast, so peft casts the adapters' inputs again. Every rank evaluates the whole set (the same
    # forwards everywhere); the main process writes.
    scored = training.without_mixed_precision_wrapper(trainer)
    trained = trainer.accelerator.unwrap_model(scored)
    if quantization is None and runtime.eval_dtype == runtime.dtype:
        adapters.cast_adapter_inputs(trained, enabled=True)
    else:
        base = models.load_model(source, runtime.eval_dtype, runtime.device, args.trust_remote_code, None,
                                 args.attn_implementation)
        models.pad_with_the_tokenizers_token(base, tokenizer)
        scored = adapters.on_another_base(trained, base)
    evaluation, eval_peak = training.evaluate_trained(scored, trainer, tokenizer, examples, records[2], args, runtime,
                                                      method)
    scored_benchmarks = benchmarks.score(trainer.accelerator.unwrap_model(scored), tokenizer, args, tasks)

    # Record.
    record = results.build_results(args, runtime, method, **measured, **evaluation,
                                   **memory.phase_fields(load=load_peak, train=train_peak, eval=eval_peak),
                                   **memory.process_peak_fields(runtime.device), **training.artifact_fields(artifact),
                                   trainable_params=trainable, total_params=total, base_params=total - trainable,
                                   truncation=truncation, dtype_by_part=stored_as, planned_memory=planned,
                                   **scored_benchmarks)
    results.finish(record, runtime.output, fallback_dir=runtime.output_dir)


if __name__ == "__main__":
    errors.main_guard(main)
