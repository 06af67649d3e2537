"""Zero-shot perplexity of the base model on the held-out split (or on --eval-file).

    python evaluate_base_model.py                      # Llama 3 8B Instruct on dolly-15k's test split
    python evaluate_base_model.py --model smollm2-135m --dataset data/demo.jsonl
"""

import common


def parse_args(argv=None):
    parser = common.build_parser(__doc__.splitlines()[0], method="base")
    args = parser.parse_args(argv)
    args.resume = False
    return args


def main(argv=None):
    args = parse_args(argv)
    output = args.output or common.default_output("base")
    device = common.resolve_device()
    dtype = common.resolve_dtype(args.dtype, device)

    if args.dry_run:
        model = common.meta_model(common.model_config(args.model, args.trust_remote_code))
        trainable, total = common.count_parameters(model)
        results = common.build_results(args, "base", trainable_params=0, total_params=total, base_params=total,
                                       device=device, dtype=str(dtype).removeprefix("torch."))
        return common.finish(results, output)

    # Everything that can be wrong with the input fails here, in seconds, before the model loads.
    # With --eval-file only that file is read.
    source = common.check_model_source(args.model)
    _, _, eval_records = common.load_splits(args, need_train=False)
    tokenizer = common.load_tokenizer(source, args)
    examples, truncation = common.tokenize_splits(tokenizer, args.max_length, eval=eval_records)
    eval_examples = examples["eval"]
    model = common.load_model(source, args, dtype).to(device)

    evaluation = common.evaluate_perplexity(model, eval_examples, tokenizer.pad_token_id, args.eval_batch_size,
                                            device, args.seed, args.bootstrap_resamples, desc="evaluate base")
    if args.seed_style_metric:
        evaluation["seed_style_perplexity"] = common.seed_style_perplexity(model, tokenizer, eval_records,
                                                                           args.eval_batch_size, device)
    memory, memory_kind = common.peak_memory(device)
    trainable, total = common.count_parameters(model)
    results = common.build_results(
        args, "base", **evaluation, trainable_params=0, total_params=total, base_params=total,
        peak_memory_bytes=memory, memory_kind=memory_kind, device=device, dtype=str(dtype).removeprefix("torch."),
        truncation=truncation,
    )
    common.finish(results, output)


if __name__ == "__main__":
    common.main_guard(main)
