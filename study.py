"""The study: each method at several learning rates, its rate picked on validation loss, then trained at 3 seeds.

The study file (experiments/study-*.yaml) says everything: the scripts' flags (its shared, training and per-script
sections) and, in its study section, the seeds, the methods (script, flags, learning-rate grid) and, for a LoRA
method, other ranks to train at its picked rate. Every run's results JSON is kept in results/<study>/, and one
summary.json is written there after each stage.

    python study.py --config experiments/study-llama3-8b-dolly.yaml   # Llama 3 8B Instruct on dolly-15k (GPU)
    python study.py --config experiments/study-cpu.yaml               # make study: SmolLM2-135M, 2 CPU cores
    python study.py --config experiments/study-cpu.yaml --dry-run     # the runs it would make; runs nothing
    python study.py --config experiments/study-cpu.yaml -- --max-eval-samples 20   # after --: for all 3 scripts
    python study.py --config experiments/study-llama3-8b-dolly.yaml --workers 8    # 8 runs at once (Ray, 8 GPUs)

The recipe stays in the three scripts: this file only runs them (as subprocesses, each given the study file with
--config plus its method's flags, a learning rate, a seed and an output path) and reads back their JSON, so a run
is the same whether the study runs it or a user types its command. The runs of a stage go to lvf.scheduling: one
at a time, or --workers N at once with Ray (one GPU each, across machines with --ray-address). A run whose JSON is
complete is skipped, one with checkpoints but no JSON is continued with the scripts' --resume: rerun the same
command after an interruption. Stage 1 is the base model and every method's learning-rate sweep at the first seed;
each method's rate is then picked on validation loss (the test split is never looked at to choose anything);
stage 2 trains the picked rate at the other seeds and at the other ranks, and checks the picked rate's neighbours
at the smallest and largest rank.
"""

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import common
import evaluate_base_model
import finetune
import full_finetune
from lvf import benchmarks, checkpoints, errors, experiments, results, scheduling, settings
from lvf.scheduling import Run

PROJECT_DIR = Path(__file__).resolve().parent
SCRIPTS = {"evaluate_base_model": evaluate_base_model, "finetune": finetune, "full_finetune": full_finetune}
TRAINING_SCRIPTS = ("finetune", "full_finetune")


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    passed = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=settings.description(__doc__), formatter_class=settings.HelpFormatter)
    parser.add_argument("--config", required=True, metavar="FILE.yaml",
                        help="the study file: the scripts' flags and its study section (seeds, methods, rates, ranks)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="run only these methods of the study file (default: all of them)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="training seeds of the picked rate (default: the study file's); the sweep trains at "
                             "the first")
    parser.add_argument("--study-dir", type=Path, default=None,
                        help="every run's results JSON, and summary.json (default: results/<study name>)")
    parser.add_argument("--outputs-dir", type=Path, default=None,
                        help="each run's checkpoints and final artifact (default: outputs/<study name>)")
    parser.add_argument("--train-flags", default="",
                        help="more flags for the two training scripts only, in one quoted string")
    parser.add_argument("--workers", type=settings.positive_int, default=1,
                        help="runs at once: more than 1 needs Ray (pip install ray), which gives each run one GPU on "
                             "a GPU machine, or --cpus-per-run cores on a CPU one (docs/study-engine.md)")
    parser.add_argument("--cpus-per-run", type=settings.positive_int, default=1,
                        help="CPU cores Ray reserves for each run on a machine without GPUs")
    parser.add_argument("--ray-address", default=None,
                        help="a running Ray cluster to use (auto: the one `ray start` made on this machine); "
                             "default: a Ray instance of this study's own")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep each finished run's checkpoint-N folders (default: only its final artifact)")
    parser.add_argument("--keep-final-models", action="store_true",
                        help="keep full fine-tuning's final model at every learning rate (default: at the picked "
                             "rate only; each is the size of the model's fp32 weights)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the runs the study would make, each command checked by its script's parser; "
                             "runs nothing, writes nothing")
    args = parser.parse_args(own)
    return StudySettings.from_file(args, passed)


@dataclass(frozen=True)
class Method:
    """One compared method: a script, the flags that make it that method, its learning-rate grid, and (LoRA) the
    other ranks to train at its picked rate."""
    name: str
    script: str
    flags: tuple
    learning_rates: tuple
    ranks: tuple = ()
    rank: int | None = None  # its own LoRA rank (the lora_r flag, else the script's default)


@dataclass(frozen=True)
class StudySettings:
    config: str
    name: str
    seeds: tuple
    methods: tuple  # the ones this invocation runs (--methods)
    all_methods: tuple  # every method of the study file: summary.json covers each one's finished runs
    study_dir: Path
    outputs_dir: Path
    flags: tuple  # for all three scripts (after --)
    train_flags: tuple  # for the training scripts only
    keep_checkpoints: bool
    keep_final_models: bool
    workers: int
    cpus_per_run: int
    ray_address: str | None
    dry_run: bool
    contents: dict = field(repr=False, default=None)

    @classmethod
    def from_file(cls, args, passed):
        contents = experiments.load(args.config)
        study = contents.get("study") or {}
        where = f"--config {args.config}"
        if not study.get("methods"):
            raise errors.UsageError(f"{where}: no study section with methods (see experiments/study-cpu.yaml)")
        methods = all_methods = tuple(method_from_file(name, entry, f"{where}: study.methods.{name}")
                                      for name, entry in study["methods"].items())
        if args.methods:
            unknown = sorted(set(args.methods) - {method.name for method in methods})
            if unknown:
                raise errors.UsageError(f"--methods {unknown[0]}: not a method of {args.config} "
                                        f"({', '.join(method.name for method in methods)})")
            methods = tuple(method for method in methods if method.name in args.methods)
        seeds = tuple(args.seeds or study.get("seeds") or (42, 43, 44))
        name = experiments.experiment_name(args.config)
        return cls(config=path_for_the_scripts(args.config), name=name, seeds=seeds, methods=methods,
                   all_methods=all_methods,
                   study_dir=args.study_dir or PROJECT_DIR / "results" / name,
                   outputs_dir=args.outputs_dir or PROJECT_DIR / "outputs" / name,
                   flags=tuple(passed), train_flags=tuple(shlex.split(args.train_flags)),
                   keep_checkpoints=args.keep_checkpoints, keep_final_models=args.keep_final_models,
                   workers=args.workers, cpus_per_run=args.cpus_per_run, ray_address=args.ray_address,
                   dry_run=args.dry_run, contents=contents)


def path_for_the_scripts(path):
    """The study file as the scripts (run from the project folder) will find it: relative to the project when
    inside it, so results record experiments/<file>.yaml wherever the study was started from."""
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(PROJECT_DIR).as_posix()
    except ValueError:
        return str(resolved)


def method_from_file(name, entry, where):
    if not isinstance(entry, dict) or entry.get("script") not in TRAINING_SCRIPTS:
        raise errors.UsageError(f"{where}: needs script: finetune or full_finetune")
    unknown = sorted(set(entry) - {"script", "flags", "learning_rates", "ranks"})
    if unknown:
        raise errors.UsageError(f"{where}: unknown key {unknown[0]!r} (script, flags, learning_rates, ranks)")
    rates = entry.get("learning_rates") or []
    try:
        rates = tuple(sorted(float(rate) for rate in rates))
    except (TypeError, ValueError):
        raise errors.UsageError(f"{where}.learning_rates: numbers expected, got {rates!r}") from None
    if not rates:
        raise errors.UsageError(f"{where}: learning_rates is empty")
    flags = entry.get("flags") or {}
    ranks = tuple(int(rank) for rank in entry.get("ranks") or ())
    if ranks and entry["script"] != "finetune":
        raise errors.UsageError(f"{where}: ranks apply to LoRA (script: finetune) only")
    own_rank = int(flags.get("lora_r", finetune.DEFAULTS["lora_r"])) if entry["script"] == "finetune" else None
    return Method(name=name, script=entry["script"], flags=tuple(command_line(flags)), learning_rates=rates,
                  ranks=tuple(sorted(set(ranks) - {own_rank})), rank=own_rank)


def command_line(flags):
    """A mapping of flag names to values as command-line words: {lora_r: 16} -> --lora-r 16; true -> the switch."""
    words = []
    for key, value in flags.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            words.append(flag)
        elif value is not False and value is not None:
            words += [flag, *(map(str, value) if isinstance(value, list) else [str(value)])]
    return words


def rate_name(rate):
    return f"{rate:g}"


# --------------------------------------------------------------------------- one run


def script_path(script):
    return str(Path(SCRIPTS[script].__file__).resolve())


def script_of(run):
    """The module of the script a Run runs (its name: evaluate_base_model, finetune, full_finetune)."""
    return SCRIPTS[Path(run.script).stem]


def base_run(study):
    """One subprocess of a script: its name (its results file inside the study folder), script, command-line
    words, results JSON and (training) output folder: lvf.scheduling.Run, what the engine runs."""
    path = study.study_dir / "base.json"
    return Run("base.json", script_path("evaluate_base_model"),
               ("--config", study.config, *study.flags, "--output", str(path)), path)


def train_run(study, method_name, script, method_flags, rate, seed):
    name = f"lr-{rate_name(rate)}-seed-{seed}"
    path = study.study_dir / method_name / f"{name}.json"
    output_dir = study.outputs_dir / method_name / name
    argv = ("--config", study.config, *method_flags, *study.flags, *study.train_flags,
            "--learning-rate", str(rate), "--seed", str(seed), "--output", str(path), "--output-dir", str(output_dir))
    return Run(f"{method_name}/{name}.json", script_path(script), argv, path, output_dir)


def rank_method_name(method, rank):
    return f"{method.name}-r{rank}"


def rank_flags(method, rank):
    """The method's flags with another --lora-r (alpha stays, so the scale alpha/r follows 1/r)."""
    words = list(method.flags)
    if "--lora-r" in words:
        del words[words.index("--lora-r"):words.index("--lora-r") + 2]
    return (*words, "--lora-r", str(rank))


# Flags that say where a run writes, how it was started or how it reports, not what it computes: a finished run
# moved with its study folder (or a clone elsewhere) is still the same run.
WHERE_NOT_WHAT = {"resume", "output", "output_dir", "config", "debug", "dry_run", "report_to"}


def complete_results(run):
    """The run's results when its JSON exists, holds a test perplexity, and was made with these flags;
    None when it does not exist yet. A JSON from other flags stops the study rather than be mixed in."""
    found = scheduling.results_complete(run)
    if found is None:
        return None
    expected = json.loads(json.dumps(settings.as_dict(script_of(run).parse_args(list(run.argv))), default=str))
    recorded = found.get("config") or {}
    differ = sorted(key for key in expected if key not in WHERE_NOT_WHAT and key in recorded
                    and recorded[key] != expected[key])
    if differ:
        raise errors.UsageError(f"{run.results_path} was made with other flags ({', '.join(differ)}): move it away "
                                "or pass another --study-dir")
    return found


def run_stage(study, runs, final_models="kept"):
    """Every run of a stage, finished before the stage returns: {results path: results}. The engine (lvf.scheduling:
    one at a time, or several with Ray) skips finished runs and resumes half-trained ones from their checkpoints;
    finished runs keep their results JSON and final model, not their checkpoints (unless --keep-checkpoints)."""
    print("[study] " + scheduling.plan_summary(runs, complete_results, final_models=final_models,
                                               keep_checkpoints=study.keep_checkpoints), file=sys.stderr)
    found = scheduling.run_stage(runs, workers=study.workers, address=study.ray_address,
                                 cpus_per_run=study.cpus_per_run, finished=complete_results, cwd=PROJECT_DIR)
    if not study.keep_checkpoints:
        for run in runs:
            if run.output_dir is not None:
                checkpoints.prune_outputs(run.output_dir, keep_final=True)
    return {Path(run.results_path): found[run.name] for run in runs}


def drop_unpicked_full_models(study, picked):
    """Full fine-tuning's final model (the model's size in fp32) is kept for the picked rate only: the sweep's other
    runs are reported from their JSON."""
    if study.keep_final_models:
        return
    for method in study.methods:
        if method.script == "full_finetune":
            for rate in method.learning_rates:
                if rate != picked[method.name]:
                    run = train_run(study, method.name, method.script, method.flags, rate, study.seeds[0])
                    checkpoints.prune_outputs(run.output_dir, keep_final=False)


# --------------------------------------------------------------------------- the stages


def sweep_runs(study):
    """Stage 1: the base model, and every method's learning rates at the first seed."""
    return [base_run(study)] + [train_run(study, method.name, method.script, method.flags, rate, study.seeds[0])
                                for method in study.methods for rate in method.learning_rates]


def neighbours(rates, picked):
    """The grid's rates next to the picked one (one or two)."""
    index = rates.index(picked)
    return [rates[i] for i in (index - 1, index + 1) if 0 <= i < len(rates)]


def second_stage_runs(study, picked):
    """Stage 2, once each method's rate is picked: the picked rate at the other seeds; each other rank at the picked
    rate and every seed; and at the smallest and largest rank, the picked rate's neighbours at the first seed."""
    runs = []
    for method in study.methods:
        rate = picked[method.name]
        runs += [train_run(study, method.name, method.script, method.flags, rate, seed) for seed in study.seeds[1:]]
        for rank in method.ranks:
            name, flags = rank_method_name(method, rank), rank_flags(method, rank)
            runs += [train_run(study, name, method.script, flags, rate, seed) for seed in study.seeds]
        extremes = {min((*method.ranks, method.rank)), max((*method.ranks, method.rank))} - {method.rank}
        for rank in sorted(extremes):
            name, flags = rank_method_name(method, rank), rank_flags(method, rank)
            runs += [train_run(study, name, method.script, flags, neighbour, study.seeds[0])
                     for neighbour in neighbours(list(method.learning_rates), rate)]
    return runs


def pick_rate(sweep):
    """The rate whose kept checkpoint has the lowest token-weighted validation loss (never the test set); a rate
    whose loss is not a finite number (a diverged run, or none recorded) is never picked."""
    def loss(rate):
        value = sweep[rate].get("validation_loss")
        return value if value is not None and math.isfinite(value) else math.inf
    return min(sweep, key=loss)


# --------------------------------------------------------------------------- the summary


def compared_to_base(base, run):
    """Per run: test improvement (base minus tuned perplexity) and forgetting on general text (tuned minus
    base), each with a paired bootstrap interval over the examples. report.py pools runs across seeds."""
    learned = common.paired_bootstrap(base["per_example"], run["per_example"])
    forgot = None
    if base.get("general_per_example") and run.get("general_per_example"):
        forgot = common.paired_bootstrap(run["general_per_example"], base["general_per_example"])
    return {"improvement_over_base": learned, "forgetting": forgot}


def mean_and_sd(values):
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "runs": len(values)}


def where(study, path):
    """results: the run's JSON as a path from the working directory; file: the same inside the study folder (what
    `report.py` reads, wherever the folder is)."""
    return {"results": settings.display_path(path), "file": Path(path).relative_to(study.study_dir).as_posix()}


def method_summary(study, base, tried, picked, seeded, **described):
    """tried: {rate: (path, results)} at the first seed; seeded: [(path, results)] at the picked rate."""
    return {
        **described,
        "learning_rates": {rate_name(rate): {"validation_loss": run["validation_loss"], **where(study, path)}
                           for rate, (path, run) in sorted(tried.items())},
        "picked_learning_rate": picked,
        "runs": [{"seed": run["seed"], **where(study, path), "perplexity": run["perplexity"],
                  "general_perplexity": run.get("general_perplexity"), "train_seconds": run["train_seconds"],
                  "peak_memory_bytes": run["peak_memory_bytes"],
                  "train_peak_memory_bytes": run.get("train_peak_memory_bytes"),
                  "trainable_params": run.get("trainable_params"), "artifact_bytes": run["artifact_bytes"],
                  **compared_to_base(base, run)} for path, run in seeded],
        "perplexity": mean_and_sd([run["perplexity"] for _, run in seeded]),
        "general_perplexity": (mean_and_sd([run["general_perplexity"] for _, run in seeded])
                               if all(run.get("general_perplexity") for _, run in seeded) else None),
    }


def summarize(study):
    """summary.json from every finished run of every method of the study file, read from the study folder: not
    only this invocation's --methods, so two study processes running different methods each write the whole
    study. A method whose sweep is not finished yet has no picked rate, and is left out until it is."""
    def done(run):
        found = complete_results(run)
        return (Path(run.results_path), found) if found is not None else None

    base_path = Path(base_run(study).results_path)
    base = complete_results(base_run(study))
    summary = {"experiment": study.name, "config_file": study.config,
               "settings": {"seeds": list(study.seeds), "flags": list(study.flags),
                            "train_flags": list(study.train_flags), "study": study.contents.get("study")},
               "base": {**where(study, base_path), "perplexity": base["perplexity"],
                        "general_perplexity": base.get("general_perplexity")},
               "methods": {}}
    for method in study.all_methods:
        tried = {rate: found for rate in method.learning_rates
                 if (found := done(train_run(study, method.name, method.script, method.flags, rate, study.seeds[0])))}
        if len(tried) < len(method.learning_rates):
            continue
        rate = pick_rate({rate: run for rate, (_, run) in tried.items()})
        described = {"script": method.script, "family": method.name, "rank": method.rank}
        seeded = [found for seed in study.seeds
                  if (found := done(train_run(study, method.name, method.script, method.flags, rate, seed)))]
        summary["methods"][method.name] = method_summary(study, base, tried, rate, seeded, **described,
                                                         picked_from="sweep")
        for rank in method.ranks:
            name, flags = rank_method_name(method, rank), rank_flags(method, rank)
            rank_tried = {r: found for r in method.learning_rates
                          if (found := done(train_run(study, name, method.script, flags, r, study.seeds[0])))}
            rank_seeded = [found for seed in study.seeds
                           if (found := done(train_run(study, name, method.script, flags, rate, seed)))]
            if not rank_seeded:
                continue
            entry = method_summary(study, base, rank_tried, rate, rank_seeded, script=method.script,
                                   family=method.name, rank=rank, picked_from=f"{method.name} (rank axis)")
            if len(rank_tried) > 1:  # neighbours checked at this rank: is the family's rate still the best here?
                best = pick_rate({r: run for r, (_, run) in rank_tried.items()})
                entry["rate_check"] = {"best_learning_rate": best, "picked_is_best": best == rate}
            summary["methods"][name] = entry
    return summary


def write_summary(study, summary, start):
    summary["wall_seconds_this_invocation"] = time.perf_counter() - start  # runs done earlier not counted
    results.write_atomic(study.study_dir / "summary.json", json.dumps(summary, indent=2) + "\n")


def planned_second_stage(study):
    """Stage 2 as if each method picked its grid's middle rate: its runs differ from the real ones only in their
    rates and in how many neighbours are checked (one or two a rank), so it counts them and checks their flags."""
    return second_stage_runs(study, {method.name: method.learning_rates[len(method.learning_rates) // 2]
                                     for method in study.methods})


def print_plan(study):
    """What --dry-run prints: every run of stage 1 with its command (checked by its script's parser), and what
    stage 2 will add once the rates are picked."""
    first, later = sweep_runs(study), planned_second_stage(study)
    for run in first + later:
        script_of(run).parse_args(list(run.argv))  # a bad flag in the study file stops here, with its line
    print(f"[study] {study.name}: results in {settings.display_path(study.study_dir)}, checkpoints and final "
          f"artifacts in {settings.display_path(study.outputs_dir)}")
    print(f"[study] stage 1: {len(first)} runs (the base model, then each method's learning rates at seed "
          f"{study.seeds[0]}):")
    for run in first:
        shown = [settings.display_path(word) if word.startswith(str(PROJECT_DIR)) else word for word in run.argv]
        print(f"  python {Path(run.script).name} {shlex.join(shown)}")
    print(f"[study] stage 2, at each method's picked rate: about {len(later)} runs (seeds "
          f"{', '.join(map(str, study.seeds[1:]))}; other ranks at every seed; the picked rate's neighbours at the "
          "smallest and largest rank)")
    scored = benchmarks.study_line(script_of(first[0]).parse_args(list(first[0].argv)), len(first + later),
                                   study.study_dir)
    if scored:
        print(f"[study] {scored}")


def main(argv=None):
    study = parse_args(argv)
    if study.dry_run:
        return print_plan(study)
    start = time.perf_counter()
    print(f"[study] {study.name}: {len(sweep_runs(study))} runs in stage 1, about {len(planned_second_stage(study))} "
          f"in stage 2; results in {settings.display_path(study.study_dir)}", file=sys.stderr)
    run_stage(study, sweep_runs(study), final_models="kept until the rates are picked")
    summary = summarize(study)  # every method's sweep is finished now, so each has its picked rate
    picked = {method.name: summary["methods"][method.name]["picked_learning_rate"] for method in study.methods}
    drop_unpicked_full_models(study, picked)
    write_summary(study, summary, start)
    run_stage(study, second_stage_runs(study, picked))
    write_summary(study, summarize(study), start)
    print(f"[study] wrote {settings.display_path(study.study_dir / 'summary.json')} in "
          f"{math.ceil((time.perf_counter() - start) / 60)} min")


if __name__ == "__main__":
    errors.main_guard(main)
