"""The study: each method at several learning rates, its rate picked on validation loss, then trained at 3 seeds.

Every run's results JSON is kept, and one summary is written.

    python study.py                 # Llama 3 8B Instruct on dolly-15k (a GPU): the scripts' defaults
    python study.py --cpu           # make study: SmolLM2-135M on data/demo.jsonl, sized for 2 CPU cores
    python study.py --cpu -- --max-eval-samples 20   # after --: flags for all three scripts (they win)
    python study.py --cpu --train-flags "--max-steps 8"   # flags for the two training scripts only

The recipe stays in the three scripts: this file only runs them (as subprocesses) with a learning rate, a
seed and an output path each, and reads back their JSON. A run whose JSON is complete is skipped, one
with checkpoints but no JSON is continued with the scripts' --resume: rerun the same command after an
interruption. The test split is never looked at to choose anything.
"""

import argparse
import json
import math
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common
import evaluate_base_model
import finetune
import full_finetune
from lvf import errors, results, settings, training

PROJECT_DIR = Path(__file__).resolve().parent

# The compared methods: which script, and the flags that make it that method.
METHODS = {
    "lora-qkvo": (finetune, ["--lora-targets", "q_proj,k_proj,v_proj,o_proj", "--lora-r", "16"]),  # the write-up
    "lora-all-linear": (finetune, ["--lora-targets", "all-linear", "--lora-r", "16"]),
    "full": (full_finetune, []),
}

# Learning rates about 3x apart around each method's usual one. LoRA's best sits near 10x full fine-tuning's
# ("LoRA Without Regret", 2025), so the LoRA grids start higher.
GPU_RATES = {"lora-qkvo": [3e-5, 1e-4, 3e-4, 1e-3], "lora-all-linear": [3e-5, 1e-4, 3e-4, 1e-3],
             "full": [3e-6, 1e-5, 3e-5]}
# On CPU-sized runs (21 optimizer steps) every method's best rate was the top of a grid one step lower (LoRA 3e-3 of
# 3e-4..3e-3, full 1.5e-4 of 1.5e-5..1.5e-4; 2026-11-29), so these grids reach a step above that.
CPU_RATES = {"lora-qkvo": [1e-3, 3e-3, 1e-2, 3e-2], "lora-all-linear": [1e-3, 3e-3, 1e-2, 3e-2],
             "full": [5e-5, 1.5e-4, 5e-4, 1.5e-3]}

# make study on 2 CPU cores: the demo's model and data, shorter sequences, fewer examples and validations.
# Flags every script takes, then the training scripts' own.
CPU_FLAGS = ["--model", "smollm2-135m", "--dataset", "data/demo.jsonl", "--general-file", "python-docs",
             "--max-general-blocks", "16", "--max-length", "256"]
CPU_TRAIN_FLAGS = ["--max-train-samples", "96", "--max-val-samples", "24", "--num-epochs", "1", "--batch-size", "4",
                   "--grad-accum", "1", "--eval-steps", "8"]
# --smoke (tests): two rates, two seeds, a few steps, on whatever model the flags after -- name.
SMOKE_RATES = {"lora-qkvo": [1e-2, 3e-2], "lora-all-linear": [1e-2, 3e-2], "full": [1e-3, 3e-3]}
SMOKE_FLAGS = ["--general-file", "python-docs", "--max-general-blocks", "2", "--max-length", "128",
               "--max-eval-samples", "6", "--bootstrap-resamples", "100"]
SMOKE_TRAIN_FLAGS = ["--max-train-samples", "8", "--max-val-samples", "4", "--batch-size", "2", "--max-steps", "2",
                     "--eval-steps", "1"]


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    passed = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=settings.HelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--cpu", action="store_true", help="the CPU-sized study of make study (SmolLM2-135M)")
    size.add_argument("--smoke", action="store_true", help="a few steps per run, two rates and two seeds (tests)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds of the picked rate "
                        "(default: 42 43 44; with --smoke 42 43); the sweep trains at the first")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--study-dir", type=Path, default=PROJECT_DIR / "results" / "study",
                        help="every run's results JSON, and summary.json")
    parser.add_argument("--outputs-dir", type=Path, default=PROJECT_DIR / "outputs" / "study",
                        help="each run's checkpoints and final artifact")
    parser.add_argument("--train-flags", default="",
                        help="more flags for the two training scripts only, in one quoted string")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep each finished run's checkpoint-N folders (default: only its final artifact)")
    args = parser.parse_args(own)
    args.seeds = args.seeds or ([42, 43] if args.smoke else [42, 43, 44])
    args.flags = (CPU_FLAGS if args.cpu else SMOKE_FLAGS if args.smoke else []) + passed
    args.train_flags = ((CPU_TRAIN_FLAGS if args.cpu else SMOKE_TRAIN_FLAGS if args.smoke else [])
                        + shlex.split(args.train_flags))
    args.rates = CPU_RATES if args.cpu else SMOKE_RATES if args.smoke else GPU_RATES
    return args


def rate_name(rate):
    return f"{rate:g}"


def run_script(module, argv):
    """One script as a subprocess, with its output on this terminal; a failed run stops the study."""
    command = [sys.executable, str(Path(module.__file__).resolve()), *argv]
    print(f"[study] {' '.join(command[1:])}", file=sys.stderr, flush=True)
    status = subprocess.run(command, cwd=PROJECT_DIR).returncode
    if status != 0:
        raise errors.UsageError(f"{Path(module.__file__).name} stopped with exit status {status}; rerun the study "
                                "to continue where it stopped")


def complete_results(path, module, argv):
    """The run's results when its JSON exists, holds a test perplexity, and was made with these flags;
    None when it does not exist yet. A JSON from other flags stops the study rather than be mixed in."""
    if not path.is_file():
        return None
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    if found.get("perplexity") is None:
        return None
    expected = json.loads(json.dumps(settings.as_dict(module.parse_args(argv)), default=str))
    recorded = found.get("config") or {}
    differ = sorted(key for key in expected if key != "resume" and key in recorded and recorded[key] != expected[key])
    if differ:
        raise errors.UsageError(f"{path} was made with other flags ({', '.join(differ)}): move it away or pass "
                                "another --study-dir")
    return found


def run_once(args, module, argv, path, output_dir=None):
    """The results of one run: read back if complete, else (re)run, resuming from its checkpoints."""
    found = complete_results(path, module, argv)
    if found is not None:
        print(f"[study] done already: {settings.display_path(path)}", file=sys.stderr)
        return found
    if output_dir is not None and training.latest_checkpoint(output_dir) is not None:
        argv = [*argv, "--resume"]
    run_script(module, argv)
    if output_dir is not None and not args.keep_checkpoints:
        for checkpoint in Path(output_dir).glob("checkpoint-*"):  # the JSON holds what they were kept for
            shutil.rmtree(checkpoint, ignore_errors=True)
    return json.loads(path.read_text(encoding="utf-8"))


def train_run(args, method, rate, seed):
    module, method_flags = METHODS[method]
    name = f"lr-{rate_name(rate)}-seed-{seed}"
    path = args.study_dir / method / f"{name}.json"
    output_dir = args.outputs_dir / method / name
    argv = [*method_flags, *args.flags, *args.train_flags, "--learning-rate", str(rate), "--seed", str(seed),
            "--output", str(path), "--output-dir", str(output_dir)]
    return path, run_once(args, module, argv, path, output_dir)


def pick_rate(sweep):
    """The rate whose kept checkpoint has the lowest token-weighted validation loss (never the test set)."""
    return min(sweep, key=lambda rate: sweep[rate]["validation_loss"])


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


def method_summary(args, base, sweep, picked, seeded):
    """results: the run's JSON as a path from the working directory; file: the same inside --study-dir (what
    `report.py --study` reads, wherever the folder is)."""
    def where(path):
        return {"results": settings.display_path(path), "file": Path(path).relative_to(args.study_dir).as_posix()}

    return {
        "learning_rates": {rate_name(rate): {"validation_loss": run["validation_loss"], **where(path)}
                           for rate, (path, run) in sweep.items()},
        "picked_learning_rate": picked,
        "runs": [{"seed": run["seed"], **where(path), "perplexity": run["perplexity"],
                  "general_perplexity": run.get("general_perplexity"), "train_seconds": run["train_seconds"],
                  "peak_memory_bytes": run["peak_memory_bytes"], "artifact_bytes": run["artifact_bytes"],
                  **compared_to_base(base, run)} for path, run in seeded],
        "perplexity": mean_and_sd([run["perplexity"] for _, run in seeded]),
        "general_perplexity": (mean_and_sd([run["general_perplexity"] for _, run in seeded])
                               if all(run.get("general_perplexity") for _, run in seeded) else None),
    }


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    base_path = args.study_dir / "base.json"
    base = run_once(args, evaluate_base_model, [*args.flags, "--output", str(base_path)], base_path)
    summary = {"settings": {"cpu": args.cpu, "smoke": args.smoke, "seeds": args.seeds, "flags": args.flags,
                            "train_flags": args.train_flags,
                            "learning_rates": {m: args.rates[m] for m in args.methods}},
               "base": {"results": settings.display_path(base_path), "file": base_path.name,
                        "perplexity": base["perplexity"],
                        "general_perplexity": base.get("general_perplexity")},
               "methods": {}}
    for method in args.methods:
        sweep = {rate: train_run(args, method, rate, args.seeds[0]) for rate in args.rates[method]}
        picked = pick_rate({rate: run for rate, (_, run) in sweep.items()})
        seeded = [sweep[picked]] + [train_run(args, method, picked, seed) for seed in args.seeds[1:]]
        summary["methods"][method] = method_summary(args, base, sweep, picked, seeded)
        summary["wall_seconds_this_invocation"] = time.perf_counter() - start  # runs done earlier not counted
        results.write_atomic(args.study_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(f"[study] wrote {settings.display_path(args.study_dir / 'summary.json')} in "
          f"{math.ceil((time.perf_counter() - start) / 60)} min")


if __name__ == "__main__":
    errors.main_guard(main)
