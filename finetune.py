"""LoRA (or QLoRA with --quantize 4bit) fine-tuning, then perplexity on the held-out split.

    python finetune.py                                 # Llama 3 8B Instruct on dolly-15k, r=16 on q/k/v/o
    python finetune.py --model smollm2-135m --dataset data/demo.jsonl
"""

import common


def parse_args(argv=None):
    parser = common.build_parser(__doc__.splitlines()[0], method="lora")
    common.add_training_args(parser)
    parser.add_argument("--lora-r", type=common.positive_int, default=16, help="LoRA rank")
    parser.add_argument("--lora-alpha", type=common.positive_float, default=32, help="LoRA alpha (scale alpha/r)")
    parser.add_argument("--lora-dropout", type=common.dropout_rate, default=0.05, help="dropout on the LoRA input")
    parser.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj",
                        help="comma-separated module names that get adapters")
    parser.add_argument("--quantize", choices=["none", "4bit"], default="none",
                        help="4bit: QLoRA (NF4, double quantisation, bf16 compute; needs bitsandbytes)")
    parser.set_defaults(learning_rate=2e-4, batch_size=4, grad_accum=1)
    return parser.parse_args(argv)


def lora_config(args):
    from peft import LoraConfig

    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=[name.strip() for name in args.lora_targets.split(",") if name.strip()],
                      bias="none", task_type="CAUSAL_LM")


def add_adapters(model, args):
    from peft import get_peft_model

    try:
        return get_peft_model(model, lora_config(args))
    except ValueError as error:  # e.g. --lora-targets that name no module of this model
        raise common.UsageError(f"--lora-targets {args.lora_targets}: {error}".splitlines()[0]) from error


def prepare_for_4bit_training(model, args):
    """peft's recipe for training adapters on a 4-bit model: norms in fp32, input gradients on."""
    from peft import prepare_model_for_kbit_training

    checkpointing = common.use_gradient_checkpointing(args.gradient_checkpointing, args.device)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})


def main(argv=None):
    args = parse_args(argv)
    method = "qlora" if args.quantize == "4bit" else "lora"
    common.prepare_training_run(args, method)
    args.optim = "adamw_torch"

    if args.dry_run:  # counted unquantised: 4-bit storage does not change the parameter counts
        model = add_adapters(common.meta_model(common.model_config(args.model, args.trust_remote_code)), args)
        return common.finish(common.dry_run_results(args, method, model), args.output)

    # Everything that can be wrong with the input fails here, in seconds, before the model loads.
    source = common.check_model_source(args.model)
    quantization = common.four_bit_config(args.device) if args.quantize == "4bit" else None
    train_records, val_records, eval_records = common.load_splits(args)
    tokenizer = common.load_tokenizer(source, args)
    examples, truncation = common.tokenize_splits(tokenizer, args.max_length, train=train_records,
                                                  validation=val_records, eval=eval_records)

    model = common.load_model(source, args, args.torch_dtype, quantization)
    if quantization is not None:
        model = prepare_for_4bit_training(model, args)
    model = add_adapters(model, args)

    results = common.finetune_and_evaluate(args, method, model, tokenizer, examples, truncation, eval_records)
    common.finish(results, args.output)


if __name__ == "__main__":
    common.main_guard(main)
