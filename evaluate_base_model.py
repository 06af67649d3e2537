"""Zero-shot perplexity of the base model on the held-out split (or on --eval-file); also scores a saved
adapter or model folder, recorded under the method that trained it.

    python evaluate_base_model.py                      # Llama 3 8B Instruct on dolly-15k's test split
    python evaluate_base_model.py --config experiments/demo-cpu.yaml   # the CPU demo's settings (SmolLM2-135M)
    python evaluate_base_model.py --model outputs/demo-cpu/lora/final   # results/demo-cpu/eval-lora-final.json
"""

from pathlib import Path

import common
from lvf import (
    adapters,
    artifacts,
    base,
    benchmarks,
    dry_run,
    errors,
    memory,
    models,
    precision,
    preflight,
    results,
    scoring,
    settings,
)

METHOD = base.METHOD


def parse_args(argv=None):
    return base.parse_args(argv, about=settings.description(__doc__))


def load_scored_model(args, artifact, source, runtime):
    """(model, parameters of the base before any adapter). An adapter is put on its recorded base."""
    model = models.load_model(source, runtime.eval_dtype, runtime.device, args.trust_remote_code,
                              attn_implementation=args.attn_implementation)
    base_params = models.count_parameters(model)[1]
    if artifact is not None and artifact.is_adapter:
        model = adapters.load_adapter(model, artifact.folder)
    return model, base_params


def main(argv=None):
    memory.use_expandable_segments()  # before anything initialises CUDA
    args = parse_args(argv)
    artifact = artifacts.inspect_folder(args.model)  # None: a base model (Hub id, preset or plain folder)
    method = METHOD if artifact is None else artifact.method
    base_model = args.model if artifact is None else artifact.base_model
    weights_from = base_model if artifact is not None and artifact.is_adapter else args.model
    # A saved artifact's results join the experiment that trained it (origin.json), unless --config names one.
    runtime = settings.evaluation_runtime(args, METHOD if artifact is None else artifacts.results_name(args.model),
                                          experiment=None if artifact is None or args.config else artifact.experiment)
    results.check_outputs(runtime, writes_model=False)  # before any data or model is loaded
    models.check_attention_implementation(args.attn_implementation)
    if not args.dry_run:  # a dry run shows it as a pre-flight problem
        precision.check_scoring(args, runtime, method)
    # With --eval-file only that file is read; the dataset is then recorded as null.
    recorded = dict(base_model=base_model, dataset=None if args.eval_file else args.dataset,
                    trainable_params=0 if artifact is None else None)  # an artifact's training has its own results

    if args.dry_run:
        model = models.meta_model(models.model_config(weights_from, args.trust_remote_code))
        return dry_run.dry_run(args, runtime, method, model, model_name=weights_from, **recorded)

    # Everything that can be wrong with the input fails here, in seconds, before the model loads.
    preflight.stop_if_blocked(args, runtime, METHOD, model=weights_from)  # the GPU, its driver and host memory
    source = models.check_model_source(weights_from)
    tasks = benchmarks.check_benchmarks(args)  # lm-eval and the --benchmarks tasks, before the model loads
    # With --eval-file only that file is read; before the tokenizer, so a data error shows in milliseconds.
    records = common.load_splits(args, training=False)
    # A saved artifact's own tokenizer carries the chat template it was trained with.
    has_tokenizer = artifact is not None and Path(artifact.folder, "tokenizer_config.json").is_file()
    tokenizer = models.load_tokenizer(str(artifact.folder) if has_tokenizer else source, args.chat_template,
                                      args.trust_remote_code)
    examples, truncation = common.load_examples(args, tokenizer, records)
    _, _, eval_records = records
    with memory.PhasePeak(runtime.device) as load_peak:
        model, base_params = load_scored_model(args, artifact, source, runtime)
        model = model.to(runtime.device)

    with memory.PhasePeak(runtime.device) as eval_peak:
        evaluation = scoring.evaluate_model(model, tokenizer, examples["eval"], eval_records, args, runtime.device,
                                            desc=f"evaluate {method}", general_examples=examples["general"])
    scored_benchmarks = benchmarks.score(model, tokenizer, args, tasks)  # lm-eval on this very model
    peak = memory.process_peak_fields(runtime.device)
    _, total = models.count_parameters(model)
    record = results.build_results(args, runtime, method, **evaluation, **recorded, total_params=total,
                                   base_params=base_params, **peak, truncation=truncation, **scored_benchmarks,
                                   **memory.phase_fields(load=load_peak, eval=eval_peak))
    results.finish(record, runtime.output)


if __name__ == "__main__":
    errors.main_guard(main)
