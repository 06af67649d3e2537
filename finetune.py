"""LoRA (or QLoRA with --quantize 4bit) fine-tuning, then perplexity on the held-out split.

    python finetune.py                                 # Llama 3 8B Instruct on dolly-15k, r=16 on q/k/v/o
    python finetune.py --model smollm2-135m --dataset data/demo.jsonl
"""

import dataclasses

import torch

from lvf import adapters, errors, memory, models, results, settings, training

# This script's defaults where they differ from the shared flags' (bench/ reads them here too).
DEFAULTS = {"learning_rate": 2e-4, "batch_size": 4, "grad_accum": 1,
            "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "lora_targets": "q_proj,k_proj,v_proj,o_proj"}
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
    return settings.parse(parser, argv)


def lora_config(args):
    return adapters.lora_config(args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets)


def default_lora_config():
    """The adapters this script adds when no LoRA flag is given."""
    return adapters.lora_config(DEFAULTS["lora_r"], DEFAULTS["lora_alpha"], DEFAULTS["lora_dropout"],
                                DEFAULTS["lora_targets"])


def resolve_runtime(args):
    """With --dtype auto and bf16 autocast on, the frozen base is held in bf16 while training, as on CUDA
    (where auto means bf16 anyway): it is never updated, and under autocast its matmuls run in bf16 either way.
    On a CPU the auto dtype is fp32, and there autocast re-cast every frozen weight to bf16 at each step and
    kept the copies for backward, and the residual stream stayed fp32 (bench/throughput.py measures the
    difference). The adapters stay fp32 (peft); QLoRA keeps its own dtypes. Evaluation then scores the adapters
    on the base in its own evaluation dtype (eval_dtype), as evaluate_base_model.py scores the base."""
    method = "qlora" if args.quantize == "4bit" else "lora"
    runtime = settings.training_runtime(args, method, optimizer=OPTIMIZER,
                                        optimizer_reason="the adapters are small: plain AdamW on every device")
    if args.dtype == "auto" and runtime.bf16_autocast and args.quantize == "none" and runtime.dtype != torch.bfloat16:
        runtime = dataclasses.replace(runtime, dtype=torch.bfloat16, eval_dtype=runtime.dtype)
    return method, runtime


def add_adapters(model, args):
    model = adapters.add_adapters(model, lora_config(args), args.lora_targets)
    # The saved adapter (final and checkpoints) names its base as the user did: a preset or Hub id, not the
    # cache folder a preset resolves to.
    model.peft_config["default"].base_model_name_or_path = args.model
    return model


def main(argv=None):
    args = parse_args(argv)
    method, runtime = resolve_runtime(args)
    results.check_outputs(runtime, writes_model=not args.dry_run)  # before any data or model is loaded
    training.start_run(args, runtime)

    if args.dry_run:  # counted unquantised: 4-bit storage does not change the parameter counts
        model = add_adapters(models.meta_model(models.model_config(args.model, args.trust_remote_code)), args)
        trainable, total = models.count_parameters(model)
        record = results.build_results(args, runtime, method, trainable_params=trainable, total_params=total,
                                       base_params=total - trainable)
        return results.finish(record, runtime.output)

    # Everything that can be wrong with the input fails here, in seconds, before the model loads.
    source = models.check_model_source(args.model)
    models.check_attention_implementation(args.attn_implementation)
    quantization = models.four_bit_config(runtime.device) if args.quantize == "4bit" else None
    loaded = training.load_training_data(args, runtime, source, method)
    tokenizer, examples, truncation, eval_records, training_args = loaded

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

    def model_to_score(trained):
        """The trained adapters on a fresh copy of the base in the evaluation dtype (the one the base model is
        scored in) when they were trained on a bf16 copy; else the trained model itself (None), scored without
        autocast, so peft casts the adapters' inputs again."""
        if runtime.eval_dtype is None:
            adapters.cast_adapter_inputs(trained, enabled=True)
            return None
        base = models.load_model(source, runtime.eval_dtype, runtime.device, args.trust_remote_code, None,
                                 args.attn_implementation)
        models.pad_with_the_tokenizers_token(base, tokenizer)
        return adapters.on_another_base(trained, base)

    measured = training.train_evaluate_save(args, runtime, model, tokenizer, examples, eval_records, method,
                                            training_args, load_peak, model_to_score)
    record = results.build_results(args, runtime, method, **measured, trainable_params=trainable,
                                   total_params=total, base_params=total - trainable, truncation=truncation,
                                   dtype_by_part=stored_as)
    results.finish(record, runtime.output, fallback_dir=runtime.output_dir)


if __name__ == "__main__":
    errors.main_guard(main)
