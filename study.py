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
import functools
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lvf import (
    base,
    benchmarks,
    checkpoints,
    defaults,
    errors,
    experiments,
    full,
    lora,
    models,
    plan,
    preflight,
    results,
    scheduling,
    settings,
    study_plan,
)
from lvf.scheduling import Run
from lvf.statistics import paired_difference

PROJECT_DIR = Path(__file__).resolve().parent
# Each script's parser, from the method it runs: the study checks its runs' command lines without importing a script.
PARSERS = {"evaluate_base_model": base.parse_args, "finetune": lora.parse_args, "full_finetune": full.parse_args}
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
    parser.add_argument("--gpu-check", type=Path, default=PROJECT_DIR / "bench" / "results" / "gpu_check.json",
                        metavar="FILE.json",
                        help="bench/gpu_check.py's report, whose epoch times estimate the study's GPU-hours")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the runs the study would make, each command checked by its script's parser, "
                             "and each stage's disk at its peak and GPU-hours; runs nothing, writes nothing")
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
    gpu_check: Path
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
                   gpu_check=args.gpu_check, dry_run=args.dry_run, contents=contents)


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
    own_rank = int(flags.get("lora_r", defaults.LORA.lora_r)) if entry["script"] == "finetune" else None
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
    return str(PROJECT_DIR / f"{script}.py")


def run_settings(run):
    """The Settings a Run's command line gives its script (evaluate_base_model, finetune, full_finetune), parsed by
    the parser that script uses."""
    return PARSERS[Path(run.script).stem](list(run.argv))


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
    expected = json.loads(json.dumps(settings.as_dict(run_settings(run)), default=str))
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
    print("[study] " + scheduling.stage_preview(runs, complete_results, final_models=final_models,
                                               keep_checkpoints=study.keep_checkpoints), file=sys.stderr)

    def prune(run):  # as soon as a run finishes, so that a stage holds the checkpoints of running runs only
        if run.output_dir is not None and not study.keep_checkpoints:
            checkpoints.prune_outputs(run.output_dir, keep_final=True)

    found = scheduling.run_stage(runs, workers=study.workers, address=study.ray_address,
                                 cpus_per_run=study.cpus_per_run, finished=complete_results, cwd=PROJECT_DIR,
                                 when_finished=prune)
    for run in runs:  # and those finished by an earlier invocation
        prune(run)
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
    learned = paired_difference(base["per_example"], run["per_example"])
    forgot = None
    if base.get("general_per_example") and run.get("general_per_example"):
        forgot = paired_difference(run["general_per_example"], base["general_per_example"])
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


def expected_second_stage(study):
    """Stage 2 as if each method picked its grid's middle rate: its runs differ from the real ones only in their
    rates and in how many neighbours are checked (one or two a rank), so it counts them and checks their flags."""
    return second_stage_runs(study, {method.name: method.learning_rates[len(method.learning_rates) // 2]
                                     for method in study.methods})


# --------------------------------------------------------------------------- what a study costs: disk and time


RATE_SEED_AND_PATHS = ("--learning-rate", "--seed", "--output", "--output-dir")


def without_flags(argv, flags):
    """argv less the given flags and their values."""
    kept, skip = [], False
    for word in argv:
        if not skip and word not in flags:
            kept.append(word)
        skip = not skip and word in flags
    return tuple(kept)


def plan_device(run_settings):
    """Where a run is planned: where it resolves here; without a CUDA GPU here, a run on --device auto is planned
    as on one CUDA GPU (its optimizer and dtypes there), as the scripts' dry runs print beside their own plan."""
    if torch.cuda.is_available() or getattr(run_settings, "device", "auto") != "auto":
        return None
    return "cuda"


@functools.cache
def run_size(script, argv):
    """What a training run writes, by the pre-flight's rule (lvf.preflight.checkpoint_and_final_bytes) for the
    model as its script builds it on the meta device, with the memory plan's optimizer states: {checkpoint, final,
    download (the pre-flight's Write, or None), settings, method, gpu_plan}. Cached by argv less the rate, seed and
    paths: a method's runs at one rank are one size."""
    args = PARSERS[script](list(argv))
    module = lora if script == "finetune" else full
    device = plan_device(args)
    method, runtime = module.resolve_runtime(args, device=device)
    model = (lora.meta_model(args) if script == "finetune"
             else models.meta_model(models.model_config(args.model, args.trust_remote_code)))
    trainable, total = models.count_parameters(model)
    params = total - trainable if script == "finetune" else total  # the frozen base, or every weight
    states = None
    if method == "full":
        shape, setup = plan.ModelShape.from_model(model), plan.setup_for_run(args, runtime, method)
        states = plan.plan_memory(shape, setup)["optimizer_states"]
    checkpoint, final = preflight.checkpoint_and_final_bytes(method, params, trainable, runtime, states)
    download = [write for write in preflight.planned_writes(method, params, trainable, args, runtime)
                if "download" in write.what]
    return {"checkpoint": checkpoint, "final": final, "download": download[0] if download else None,
            "settings": args, "method": method, "gpu_plan": device is not None}


def size_of(run):
    return run_size(Path(run.script).stem, without_flags(run.argv, RATE_SEED_AND_PATHS))


def run_cost(study, run, epoch_hours=None):
    """The run's disk while it trains and once finished (study_plan.RunCost), and its hours from gpu_check's."""
    size = size_of(run)
    training = preflight.CHECKPOINTS_AT_ONCE * size["checkpoint"] + size["final"]
    return study_plan.RunCost(family=run.name.split("/")[0], training_bytes=training,
                              kept_bytes=training if study.keep_checkpoints else size["final"],
                              hours=study_plan.training_hours(size["settings"], size["method"], epoch_hours),
                              done=complete_results(run) is not None)


def left_by_stage_one(study, costs):
    """What stage 1 leaves on disk for stage 2: each run's kept part, less full fine-tuning's final models at the
    rates not picked (drop_unpicked_full_models, which deletes those runs' checkpoints too) unless
    --keep-final-models. Every rate of a sweep is one size, so which one is picked does not matter here."""
    full = {method.name for method in study.methods if method.script == "full_finetune"}
    left, counted = 0, set()
    for cost in costs:
        if cost.family in full and not study.keep_final_models:
            if cost.family in counted:
                continue
            counted.add(cost.family)
        left += cost.kept_bytes
    return left


def same_disk(folder, other):
    return os.stat(preflight.nearest_existing(folder)).st_dev == os.stat(preflight.nearest_existing(other)).st_dev


def stage_disk(study, number, runs, costs, left_before=0):
    """The pre-flight's disk findings (lvf.preflight.disk_findings) for one stage: its peak with --workers runs at
    once (study_plan.stage_peak_bytes), plus what earlier stages leave, less what its runs hold there already,
    against the free disk; stage 1 adds the model's download when it is not in the Hub cache. A problem names the
    most --workers that fit."""
    peak = study_plan.stage_peak_bytes(costs, study.workers)
    held = sum(checkpoints.folder_bytes(run.output_dir) for run in runs
               if run.output_dir is not None and Path(run.output_dir).is_dir())
    outputs_disk = preflight.nearest_existing(study.outputs_dir)
    download = next((size_of(run)["download"] for run in runs if run.output_dir is not None), None)
    download = download if number == 1 else None  # the base model's run, first in stage 1, downloads it
    beside = download.bytes if download and same_disk(download.folder, outputs_disk) else 0
    free = shutil.disk_usage(outputs_disk).free
    fits = study_plan.most_workers_within(costs, free - beside - left_before + held, study.workers)
    fixes = [f"pass --workers {fits} ({preflight.gigabytes(study_plan.stage_peak_bytes(costs, fits))} at its peak)"
             ] if 0 < fits < study.workers else []
    fixes += ["leave out --keep-checkpoints"] if study.keep_checkpoints else []
    fixes.append("pass --outputs-dir on a larger disk")
    writes = [preflight.Write(f"stage {number}'s checkpoints and final models at their peak with --workers "
                              f"{study.workers}" + (f" (and {preflight.gigabytes(left_before)} stage 1 leaves)"
                                                    if left_before else ""),
                              study.outputs_dir, max(0, left_before + peak - held))]
    if download is not None:
        writes.insert(0, download)
    return preflight.disk_findings(writes, fixes={**preflight.FIXES, "checkpoints": " or ".join(fixes)},
                                   writer=f"stage {number}")


def stage_costs(study, runs, epoch_hours=None):
    return [run_cost(study, run, epoch_hours) for run in runs if run.output_dir is not None]


def stages_disk(study, first, later, first_costs, later_costs):
    """Both stages' disk findings, before stage 1 starts (stage 2 as expected_second_stage)."""
    return (stage_disk(study, 1, first, first_costs),
            stage_disk(study, 2, later, later_costs, left_by_stage_one(study, first_costs)))


def refuse_what_the_disk_cannot_hold(*findings):
    """Stops the study before a stage whose disk peak exceeds the free disk, with the pre-flight's line."""
    for finding in (finding for group in findings for finding in group):
        if finding.level == "problem":
            raise errors.UsageError(finding.text)


def describe_costs(costs):
    """Per method (and rank): its runs, what each holds while it trains, and what it keeps."""
    families = {}
    for cost in costs:
        families.setdefault(cost.family, []).append(cost)
    return "; ".join(f"{family} {len(group)} x {preflight.gigabytes(group[0].training_bytes)} while training, "
                     f"{preflight.gigabytes(group[0].kept_bytes)} kept" for family, group in families.items())


def time_line(study, costs, epoch_hours, timed_on):
    """The stage's GPU-hours of training from gpu_check's epoch times, or why there is no figure."""
    if all(cost.done for cost in costs):
        return "time: every training run of this stage is finished already"
    if epoch_hours is None:
        return f"time: unknown: {timed_on}"
    gpu_hours, wall_hours = study_plan.stage_hours(costs, study.workers)
    if gpu_hours is None:
        untimed = sorted({cost.family for cost in costs if cost.hours is None and not cost.done})
        return (f"time: unknown for {', '.join(untimed)}: {settings.display_path(study.gpu_check)} times LoRA and "
                f"full fine-tuning of {models.DEFAULT_MODEL} on {study_plan.DEFAULT_DATASET} at the scripts' "
                "defaults only")
    timed_lora = f"{defaults.LORA.lora_targets} at rank {defaults.LORA.lora_r}"
    to_run = sum(not cost.done for cost in costs)
    return (f"time: {gpu_hours:,.1f} GPU-hours of training for the {to_run} training run(s) not finished yet, "
            f"about {wall_hours:,.1f} h with --workers "
            f"{study.workers} (one GPU a run; from {settings.display_path(study.gpu_check)}'s epoch times on "
            f"{timed_on}, every LoRA run at the speed of its LoRA row, {timed_lora}: more adapters train slower; "
            "evaluation not counted)")


def print_stage_costs(study, costs, disk, epoch_hours, timed_on):
    print(f"  disk per run: {describe_costs(costs)}")
    for finding in disk:
        print(f"  {preflight.LABELS[finding.level]}  {finding.text}")
    print(f"  {time_line(study, costs, epoch_hours, timed_on)}")


def print_listing(study):
    """What --dry-run prints: every run of stage 1 with its command (checked by its script's parser), what stage 2
    will add once the rates are picked, and per stage its disk at its peak against the free disk and its
    GPU-hours. Returns the pre-flight's exit status: not 0 when a stage would be refused for its disk."""
    first, later = sweep_runs(study), expected_second_stage(study)
    for run in first + later:
        run_settings(run)  # a bad flag in the study file stops here, with its line
    epoch_hours, timed_on = study_plan.read_gpu_check(study.gpu_check)
    first_costs, later_costs = stage_costs(study, first, epoch_hours), stage_costs(study, later, epoch_hours)
    first_disk, later_disk = stages_disk(study, first, later, first_costs, later_costs)
    print(f"[study] {study.name}: results in {settings.display_path(study.study_dir)}, checkpoints and final "
          f"artifacts in {settings.display_path(study.outputs_dir)}")
    if any(size_of(run)["gpu_plan"] for run in first + later if run.output_dir is not None):
        print("[study] no CUDA GPU here: each run's disk is planned as on one 80 GB CUDA GPU (its optimizer and "
              "dtypes there), as the scripts' dry runs plan")
    print(f"[study] stage 1: {len(first)} runs (the base model, then each method's learning rates at seed "
          f"{study.seeds[0]}):")
    for run in first:
        shown = [settings.display_path(word) if word.startswith(str(PROJECT_DIR)) else word for word in run.argv]
        print(f"  python {Path(run.script).name} {shlex.join(shown)}")
    print_stage_costs(study, first_costs, first_disk, epoch_hours, timed_on)
    print(f"[study] stage 2, at each method's picked rate: about {len(later)} runs (seeds "
          f"{', '.join(map(str, study.seeds[1:]))}; other ranks at every seed; the picked rate's neighbours at the "
          "smallest and largest rank)")
    print_stage_costs(study, later_costs, later_disk, epoch_hours, timed_on)
    for method in study.methods:
        if method.ranks:
            names = {rank_method_name(method, rank) for rank in method.ranks}
            axis = [cost for cost in later_costs if cost.family in names]
            if epoch_hours is None or any(cost.hours is None for cost in axis):
                hours = f"GPU-hours unknown ({timed_on if epoch_hours is None else 'no estimate for them'})"
            else:  # finished or not: what the axis costs the study
                hours = f"{sum(cost.hours for cost in axis):,.1f} GPU-hours of training"
            print(f"  the rank axis ({method.name} at ranks {', '.join(map(str, method.ranks))}, beside its own "
                  f"{method.rank}) adds {len(axis)} of these runs: {hours}")
    scored = benchmarks.study_line(run_settings(first[0]), len(first + later),
                                   study.study_dir)
    if scored:
        print(f"[study] {scored}")
    return preflight.exit_status(first_disk + later_disk)


def main(argv=None):
    study = parse_args(argv)
    if study.dry_run:
        return print_listing(study)
    start = time.perf_counter()
    first, later = sweep_runs(study), expected_second_stage(study)
    print(f"[study] {study.name}: {len(first)} runs in stage 1, about {len(later)} in stage 2; results in "
          f"{settings.display_path(study.study_dir)}", file=sys.stderr)
    # Both stages' disk before anything runs (stage 2's again before it starts): not days into the study.
    first_costs = stage_costs(study, first)
    refuse_what_the_disk_cannot_hold(*stages_disk(study, first, later, first_costs, stage_costs(study, later)))
    run_stage(study, first, final_models="kept until the rates are picked")
    summary = summarize(study)  # every method's sweep is finished now, so each has its picked rate
    picked = {method.name: summary["methods"][method.name]["picked_learning_rate"] for method in study.methods}
    drop_unpicked_full_models(study, picked)
    write_summary(study, summary, start)
    second = second_stage_runs(study, picked)
    refuse_what_the_disk_cannot_hold(stage_disk(study, 2, second, stage_costs(study, second)))
    run_stage(study, second)
    write_summary(study, summarize(study), start)
    print(f"[study] wrote {settings.display_path(study.study_dir / 'summary.json')} in "
          f"{math.ceil((time.perf_counter() - start) / 60)} min")


if __name__ == "__main__":
    errors.main_guard(main)
