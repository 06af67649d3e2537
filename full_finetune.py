"""Full fine-tuning of every weight, then perplexity on the held-out split.

    python full_finetune.py                            # Llama 3 8B Instruct on dolly-15k, paged 8-bit AdamW
    python full_finetune.py --model smollm2-135m --dataset data/demo.jsonl
"""

import importlib.util
import os

import common


def parse_args(argv=None):
    parser = common.build_parser(__doc__.splitlines()[0], method="full")
    common.add_training_args(parser)
    parser.add_argument("--optim", default="auto",
                        help="Trainer optimizer; auto = paged_adamw_8bit on CUDA with bitsandbytes (adamw_torch under "
                             "FSDP or DeepSpeed), else adamw_torch")
    parser.set_defaults(learning_rate=1e-5, batch_size=2, grad_accum=2)
    return parser.parse_args(argv)


def default_optimizer(device):
    """Paged 8-bit AdamW on CUDA when bitsandbytes is there; plain AdamW on CPU, and under FSDP or
    DeepSpeed, whose sharded optimizer states bitsandbytes' optimizers do not handle."""
    sharded = "true" in (os.environ.get("ACCELERATE_USE_FSDP"), os.environ.get("ACCELERATE_USE_DEEPSPEED"))
    has_bitsandbytes = importlib.util.find_spec("bitsandbytes") is not None
    return "paged_adamw_8bit" if device == "cuda" and has_bitsandbytes and not sharded else "adamw_torch"


def main(argv=None):
    args = parse_args(argv)
    common.prepare_training_run(args, "full")
    if args.optim == "auto":
        args.optim = default_optimizer(args.device)

    if args.dry_run:
        model = common.meta_model(common.model_config(args.model, args.trust_remote_code))
        return common.finish(common.dry_run_results(args, "full", model), args.output)

    # Everything that can be wrong with the input fails here, in seconds, before the model loads.
    source = common.check_model_source(args.model)
    train_records, val_records, eval_records = common.load_splits(args)
    tokenizer = common.load_tokenizer(source, args)
    examples, truncation = common.tokenize_splits(tokenizer, args.max_length, train=train_records,
                                                  validation=val_records, eval=eval_records)
    model = common.load_model(source, args, args.torch_dtype)

    results = common.finetune_and_evaluate(args, "full", model, tokenizer, examples, truncation, eval_records)
    common.finish(results, args.output)


if __name__ == "__main__":
    common.main_guard(main)
