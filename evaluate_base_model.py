"""Zero-shot perplexity of the base model on the held-out split (or on --eval-file).

    python evaluate_base_model.py                      # Llama 3 8B Instruct on dolly-15k's test split
    python evaluate_base_model.py --model smollm2-135m --dataset data/demo.jsonl
"""

import common
from lvf import errors, models, results, settings

METHOD = "base"


def parse_args(argv=None):
    parser = settings.evaluation_parser(__doc__.splitlines()[0], METHOD)
    return settings.parse(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    runtime = settings.evaluation_runtime(args, METHOD)
    results.check_outputs(runtime, writes_model=not args.dry_run)  # before any data or model is loaded

    if args.dry_run:
        _, total = models.count_parameters(models.meta_model(models.model_config(args.model, args.trust_remote_code)))
        record = results.build_results(args, runtime, METHOD, trainable_params=0, total_params=total,
                                       base_params=total)
        return results.finish(record, runtime.output)

    # Everything that can be wrong with the input fails here, in seconds, before the model loads.
    # With --eval-file only that file is read.
    source = models.check_model_source(args.model)
    tokenizer = models.load_tokenizer(source, args.chat_template, args.trust_remote_code)
    examples, truncation, eval_records = common.load_examples(args, tokenizer, training=False)
    model = models.load_model(source, runtime.dtype, runtime.device, args.trust_remote_code).to(runtime.device)

    evaluation = common.evaluate_model(model, tokenizer, examples["eval"], eval_records, args, runtime.device,
                                       desc="evaluate base")
    memory, memory_kind = results.peak_memory(runtime.device)
    _, total = models.count_parameters(model)
    record = results.build_results(args, runtime, METHOD, **evaluation, trainable_params=0, total_params=total,
                                   base_params=total, peak_memory_bytes=memory, memory_kind=memory_kind,
                                   truncation=truncation)
    results.finish(record, runtime.output)


if __name__ == "__main__":
    errors.main_guard(main)
