"""LoRA (or QLoRA with --quantize 4bit) fine-tuning, then perplexity on the held-out split.

    python finetune.py                                 # Llama 3 8B Instruct on dolly-15k, r=16 on q/k/v/o
    python finetune.py --config experiments/demo-cpu.yaml   # the CPU demo's settings (SmolLM2-135M)
"""

import dataclasses

import torch

import common
from lvf import adapters, artifacts, benchmarks, errors, memory, models, plan, preflight, results, settings, training

# This script's defaults where they differ from the shared flags' (bench/ reads them here too); with the shared
# flags' they are experiments/llama3-8b-dolly.yaml's experiment (tests/test_experiments.py checks that).
DEFAULTS = {"learning_rate": 2e-4, "batch_size": 4, "grad_accum": 1,
            "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "lora_targets": "q_proj,k_proj,v_proj,o_proj",
            "use_dora": False, "use_rslora": False, "init_lora_weights": "true"}
OPTIMIZER = "adamw_torch"  # the adapters are small: plain AdamW, on every device


def parse_args(argv=None):
    parser = settings.evaluation_parser(settings.description(__doc__), "lora")
    settings.add_training_flags(parser, "lora", learning_rate=DEFAULTS["learning_rate"],
                                batch_size=DEFAULTS["batch_size"], grad_accum=DEFAULTS["grad_accum"])
    group = parser.add_argument_group("LoRA")
    group.add_argument("--lora-r", type=settings.positive_int, default=DEFAULTS["lora_r"], help="LoRA rank")
    group.add_argument("--lora-alpha", type=settings.positive_float, default=DEFAULTS["lora_alpha"],
                       help="LoRA alpha (scale alpha/r)")
    group.add_argument("--lora-dropout", type=settings.dropout_rate, default=DEFAULTS["lora_dropout"],
                       help="dropout on the LoRA input")
    group.add_argument("--lora-targets", default=DEFAULTS["lora_targets"],
                       help="comma-separated module names that get adapters, or all-linear (peft: every linear "
                            "layer but the output layer)")
    group.add_argument("--quantize", choices=["none", "4bit"], default="none",
                       help="4bit: QLoRA (NF4, double quantisation, bf16 compute; needs bitsandbytes)")
    group.add_argument("--use-dora", action="store_true",
                       help="DoRA (peft): also trains a magnitude per output feature of each adapted module")
    group.add_argument("--use-rslora", action="store_true",
                       help="rank-stabilised LoRA (peft): scale alpha/sqrt(r) instead of alpha/r")
    group.add_argument("--init-lora-weights", choices=adapters.INIT_CHOICES, default=DEFAULTS["init_lora_weights"],
                       help="peft's adapter init: true (A random, B zero), gaussian (A normal with sd 1/r), pissa "
                            "(A, B from the weight's top-r singular vectors, subtracted from the weight), olora "
                            "(from a QR decomposition, likewise); pissa and olora not with --quantize 4bit")
    args = settings.parse(parser, argv, sections=("shared", "training", "finetune"))
    if args.quantize == "4bit" and args.init_lora_weights in adapters.INITS_FROM_THE_WEIGHTS:
        # peft's PiSSA refuses 4-bit weights; OLoRA would factor the dequantised weights, and a QLoRA adapter is
        # scored again on its base loaded unquantised, where the init would find other factors.
        parser.error(f"--init-lora-weights {args.init_lora_weights} changes the base weights it starts from; it "
                     "cannot be combined with --quantize 4bit")
    return args


def lora_config(args):
    return adapters.lora_config(args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets,
                                use_dora=args.use_dora, use_rslora=args.use_rslora,
                                init_lora_weights=args.init_lora_weights)


def default_lora_config():
    """The adapters this script adds when no LoRA flag is given."""
    return adapters.lora_config(DEFAULTS["lora_r"], DEFAULTS["lora_alpha"], DEFAULTS["lora_dropout"],
                                DEFAULTS["lora_targets"], use_dora=DEFAULTS["use_dora"],
                                use_rslora=DEFAULTS["use_rslora"], init_lora_weights=DEFAULTS["init_lora_weights"])


def resolve_runtime(args, device=None, gpu_bytes=None):
    """With --dtype auto and bf16 autocast on, the frozen base is held in bf16 while training, as on CUDA
    (where auto means bf16 anyway): it is never updated, and under autocast its matmuls run in bf16 either way.
    On a CPU the auto dtype is fp32, and there autocast re-cast every frozen weight to bf16 at each step and
    kept the copies for backward, and the residual stream stayed fp32 (bench/throughput.py measures the
    difference). The adapters stay fp32 (peft); QLoRA keeps its own dtypes. Evaluation then scores the adapters
    on the base in its own evaluation dtype (eval_dtype), as evaluate_base_model.py scores the base."""
    method = "qlora" if args.quantize == "4bit" else "lora"
    runtime = settings.training_runtime(args, method, optimizer=OPTIMIZER,
                                        optimizer_reason="the adapters are small: plain AdamW on every device",
                                        device=device)
    if args.dtype == "auto" and runtime.bf16_autocast and args.quantize == "none" and runtime.dtype != torch.bfloat16:
        runtime = dataclasses.replace(runtime, dtype=torch.bfloat16, eval_dtype=runtime.dtype)
    return method, runtime


def add_adapters(model, args):
    model = adapters.add_adapters(model, lora_config(args), args.lora_targets)
    # The saved adapter (final and checkpoints) names its base as the user did: a preset or Hub id, not the
    # cache folder a preset resolves to.
    model.peft_config["default"].base_model_name_or_path = args.model
    return model


def meta_model(args):
    """The model as this run builds it, adapters included, on the meta device: for counts and the memory plan.
    Built under a forked random state: peft draws its adapters' initial values on the CPU even for a meta base, and
    the run's own adapters must get the same draws whether or not the plan was made first."""
    with torch.random.fork_rng(devices=[]):
        return add_adapters(models.meta_model(models.model_config(args.model, args.trust_remote_code)), args)


def main(argv=None):
    args = parse_args(argv)
    method, runtime = resolve_runtime(args)
    results.check_outputs(runtime, writes_model=not args.dry_run)  # before any data or model is loaded
    training.start_run(args, runtime)

    if args.dry_run:  # counted unquantised: 4-bit storage does not change the parameter counts
        model = meta_model(args)
        trainable, total = models.count_parameters(model)
        planned = plan.announce_plan(args, runtime, method, model)
        plan.announce_gpu_plan(args, runtime, method, model, resolve_runtime)
        record = results.build_results(args, runtime, method, trainable_params=trainable, total_params=total,
                                       base_params=total - trainable, planned_memory=planned)
        results.finish(record, runtime.output)
        return preflight.report_and_exit_code(args, runtime, method, params=total - trainable, trainable=trainable,
                                              planned_memory=planned)

    # Inputs. Everything that can be wrong with them fails here, in seconds, before the model loads; the data is
    # read before the tokenizer, so a data error shows in milliseconds.
    source = models.check_model_source(args.model)
    models.check_attention_implementation(args.attn_implementation)
    tasks = benchmarks.check_benchmarks(args, multiple_processes=runtime.world_size > 1)
    quantization = models.four_bit_config(runtime.device) if args.quantize == "4bit" else None
    records = common.load_splits(args)  # train, validation, eval
    tokenizer = models.load_tokenizer(source, args.chat_template, args.trust_remote_code)
    examples, truncation = common.load_examples(args, tokenizer, records)
    training_args = training.training_arguments(args, runtime, len(examples["train"]))  # before the model loads
    artifacts.write_origin(runtime.output_dir, method, args.model, runtime.experiment)  # what the checkpoints are

    # The memory plan, in one line; then the model: the base (4-bit for QLoRA), then the adapters.
    planned = plan.announce_plan(args, runtime, method, meta_model(args))
    with memory.PhasePeak(runtime.device) as load_peak:
        model = models.load_model(source, runtime.dtype, runtime.device, args.trust_remote_code, quantization,
                                  args.attn_implementation)
        models.pad_with_the_tokenizers_token(model, tokenizer)
        if quantization is not None:
            model = adapters.prepare_for_4bit_training(model)
        model = add_adapters(model, args)
        if runtime.bf16_autocast and quantization is None:
            adapters.cast_adapter_inputs(model, enabled=False)
    trainable, total = models.count_parameters(model)
    stored_as = models.dtype_by_part(model)

    # Train; the checkpoint with the lowest validation loss is kept.
    trainer, measured, train_peak = training.train(args, runtime, model, tokenizer, examples["train"],
                                                   examples["validation"], training_args)

    # Score the adapters as the base model is scored: on a fresh copy of the base in the evaluation dtype when they
    # were trained on a bf16 copy; else the trained model itself, without autocast, so peft casts the adapters'
    # inputs again. Every rank evaluates the whole set (the same forwards everywhere); the main process writes.
    scored = training.without_mixed_precision_wrapper(trainer)
    trained = trainer.accelerator.unwrap_model(scored)
    if runtime.eval_dtype is None:
        adapters.cast_adapter_inputs(trained, enabled=True)
    else:
        base = models.load_model(source, runtime.eval_dtype, runtime.device, args.trust_remote_code, None,
                                 args.attn_implementation)
        models.pad_with_the_tokenizers_token(base, tokenizer)
        scored = adapters.on_another_base(trained, base)
    evaluation, eval_peak = training.evaluate_trained(scored, trainer, tokenizer, examples, records[2], args, runtime,
                                                      method)
    scored_benchmarks = benchmarks.score(trainer.accelerator.unwrap_model(scored), tokenizer, args, tasks)

    # Save the adapter, then record.
    artifact = training.save_artifact(trainer, runtime.output_dir)
    record = results.build_results(args, runtime, method, **measured, **evaluation,
                                   **memory.phase_fields(load=load_peak, train=train_peak, eval=eval_peak),
                                   **results.process_peak_fields(runtime.device), **training.artifact_fields(artifact),
                                   trainable_params=trainable, total_params=total, base_params=total - trainable,
                                   truncation=truncation, dtype_by_part=stored_as, planned_memory=planned,
                                   **scored_benchmarks)
    results.finish(record, runtime.output, fallback_dir=runtime.output_dir)


if __name__ == "__main__":
    errors.main_guard(main)
