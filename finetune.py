"""LoRA (or QLoRA with --quantize 4bit) fine-tuning, then perplexity on the held-out split.

    python finetune.py                                 # Llama 3 8B Instruct on dolly-15k, r=16 on q/k/v/o
    python finetune.py --model smollm2-135m --dataset data/demo.jsonl
"""

import common
from lvf import adapters, errors, models, results, settings, training


def parse_args(argv=None):
    parser = settings.evaluation_parser(__doc__.splitlines()[0], "lora")
    settings.add_training_flags(parser, "lora", learning_rate=2e-4, batch_size=4, grad_accum=1)
    group = parser.add_argument_group("LoRA")
    group.add_argument("--lora-r", type=settings.positive_int, default=16, help="LoRA rank")
    group.add_argument("--lora-alpha", type=settings.positive_float, default=32, help="LoRA alpha (scale alpha/r)")
    group.add_argument("--lora-dropout", type=settings.dropout_rate, default=0.05, help="dropout on the LoRA input")
    group.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj",
                       help="comma-separated module names that get adapters")
    group.add_argument("--quantize", choices=["none", "4bit"], default="none",
                       help="4bit: QLoRA (NF4, double quantisation, bf16 compute; needs bitsandbytes)")
    return settings.parse(parser, argv)


def lora_config(args):
    return adapters.lora_config(args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets)


def add_adapters(model, args):
    return adapters.add_adapters(model, lora_config(args), args.lora_targets)


def main(argv=None):
    args = parse_args(argv)
    method = "qlora" if args.quantize == "4bit" else "lora"
    runtime = settings.training_runtime(args, method, optimizer="adamw_torch")
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
    quantization = models.four_bit_config(runtime.device) if args.quantize == "4bit" else None
    tokenizer = models.load_tokenizer(source, args.chat_template, args.trust_remote_code)
    examples, truncation, eval_records = common.load_examples(args, tokenizer)

    model = models.load_model(source, runtime.dtype, runtime.device, args.trust_remote_code, quantization)
    models.pad_with_the_tokenizers_token(model, tokenizer)
    if quantization is not None:
        model = adapters.prepare_for_4bit_training(model)
    model = add_adapters(model, args)
    trainable, total = models.count_parameters(model)

    measured = training.train_evaluate_save(args, runtime, model, tokenizer, examples, eval_records, method)
    record = results.build_results(args, runtime, method, **measured, trainable_params=trainable,
                                   total_params=total, base_params=total - trainable, truncation=truncation)
    results.finish(record, runtime.output, fallback_dir=runtime.output_dir)


if __name__ == "__main__":
    errors.main_guard(main)
