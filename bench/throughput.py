"""Training throughput of this kit against TRL's SFTTrainer and the write-up's recipe, on the same work.

    python bench/throughput.py            # LoRA and full fine-tuning, three contenders each (< 20 min on 2 cores)
    python bench/throughput.py --quick    # a smoke run for development; its figures mean nothing

One subprocess per contender and method, run one after the other: the scripts themselves for ours, and
bench/throughput_worker.py for the others. All of them train SmolLM2-135M-Instruct (the `smollm2-135m` preset),
loaded as the contender loads it (fp32 on a CPU; our LoRA holds its frozen base in bf16 where bf16 autocast is
on, see lvf.lora.resolve_runtime), on the same training records, with the same hyperparameters, for the same
number of optimizer steps: exactly one epoch over steps x batch x accumulation records.

  ours     finetune.py / full_finetune.py themselves; their figures are the ones their results JSON reports
  trl      TRL's SFTTrainer with its defaults, on a conversational prompt-completion dataset (loss on the
           completion only); TRL's defaults include bf16 autocast and gradient checkpointing
  writeup  the write-up's pipeline: Dolly's context dropped, padding="max_length" to 512 with pad = eos,
           labels = input_ids (prompt and padding are targets), a plain Trainer

Shared by all: model weights, LoRA config (r=16, alpha=32, dropout 0.05 on q/k/v/o), learning rate
(the scripts' defaults), batch and accumulation, optimizer (torch AdamW), cosine schedule, warm-up, seed.
Each contender keeps its own defaults for everything else: that is what a user of it gets.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

import common  # noqa: E402
from lvf import adapters, defaults, errors, lora, models, provenance, results, settings  # noqa: E402

CONTENDERS = ("ours", "trl", "writeup")  # trl and writeup run in bench/throughput_worker.py
METHODS = ("lora", "full")
SCRIPTS = {"lora": "finetune.py", "full": "full_finetune.py"}
WORKER = Path(__file__).resolve().with_name("throughput_worker.py")

DEFINITIONS = {
    "scored_tokens": "targets that count in the contender's own loss and are not padding: positions t >= 1 with "
                     "labels[t] != -100 and attention_mask[t] = 1. For ours and TRL: the response and its "
                     "end-of-turn token; for the write-up also the prompt, which its labels = input_ids trains on",
    "scored_tokens_per_second": "scored tokens / seconds inside Trainer.train() less validation and checkpoint "
                                "saving (the results JSON's train_tokens / train_step_seconds); the same trainer "
                                "subclass (training.make_trainer_class) counts and times every contender",
    "response_tokens_per_second": "tokens of the responses trained on per second: the same as scored for ours "
                                  "and TRL; for the write-up its scored tokens less the prompt, i.e. the useful "
                                  "part of its signal",
    "input_tokens_per_second": "non-padding tokens fed to the model per second (prompt included)",
    "peak_rss": "the contender process's maximum resident set size over its whole life, as the process itself "
                "recorded it (peak_memory_bytes: lvf.memory keeps the peak seen before each phase reset): model "
                "load, data preparation and training; for ours also its short validation, final evaluation and "
                "saving. os.wait4's ru_maxrss cannot give it: the phase resets lower it to the last phase's peak",
    "train_peak": "the peak resident set of the training phase alone (Trainer.train(), its validation and "
                  "checkpoints included; lvf.memory.PhasePeak, reset before training): the phase the LoRA/full "
                  "memory ratio is about, measured the same way for every contender",
    "mfu": "model FLOPs utilisation = FLOPs per token x input tokens/s / matmul peak. Full fine-tuning: 6N per "
           "token (forward 2N, backward 4N: input and weight gradients). LoRA: 4N + 6 x its adapter parameters "
           "(frozen weights need no weight gradients). N = the base model's parameters (tied embeddings once). The "
           "peak is measured in this run with the same threads, in the dtype the contender computes in (bf16 with "
           "autocast, else fp32). Recomputation by gradient checkpointing is not counted; ours skips the "
           "vocabulary projection at prompt positions, and these counts take that skipped work as done",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=settings.description(__doc__),
                                     formatter_class=settings.HelpFormatter)
    add = parser.add_argument
    add("--quick", action="store_true",
        help="development smoke run: --steps 2 --batch-size 2 --grad-accum 1 --max-length 512 unless given")
    add("--steps", type=settings.positive_int, default=None, help="optimizer steps per contender (default 4)")
    add("--batch-size", type=settings.positive_int, default=None,
        help="per-step batch for both methods, so LoRA and full memory compare on the same batch (default 2)")
    add("--grad-accum", type=settings.positive_int, default=None, help="gradient accumulation steps (default 2)")
    add("--max-length", type=settings.positive_int, default=None,
        help="tokens per example for ours and TRL (default 1024, both tools' default)")
    add("--methods", default=",".join(METHODS), help="comma-separated: lora, full")
    add("--contenders", default=",".join(CONTENDERS), help="comma-separated: ours, trl, writeup")
    add("--trl-precision", choices=["defaults", "ours"], default="defaults",
        help="defaults: TRL's own (bf16 autocast, gradient checkpointing); ours: the settings our path uses "
             "on this machine, to separate those two defaults from the rest of TRL")
    add("--model", default="smollm2-135m", help="model preset, Hub id or folder")
    add("--dataset", default=None,
        help="records (default: shared/dolly/dolly-subset.jsonl in the folder that holds the project when it is "
             "there, else data/demo.jsonl)")
    add("--seed", type=int, default=42)
    add("--output", default=None,
        help="results JSON (default: bench/results/throughput.json, or throughput-quick.json with --quick)")
    add("--timeout", type=settings.positive_int, default=900, help="seconds allowed to each contender")
    add("--keep", action="store_true", help="keep the temporary folder (records, logs, checkpoints)")
    args = parser.parse_args(argv)
    quick = dict(steps=2, batch_size=2, grad_accum=1, max_length=512)
    full = dict(steps=4, batch_size=2, grad_accum=2, max_length=1024)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.methods = [m for m in args.methods.split(",") if m]
    args.contenders = [c for c in args.contenders.split(",") if c]
    unknown = set(args.methods) - set(METHODS) | set(args.contenders) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown method or contender: {sorted(unknown)}")
    args.samples = args.steps * args.batch_size * args.grad_accum
    return args


def default_dataset():
    shared = PROJECT_DIR.parent / "shared" / "dolly" / "dolly-subset.jsonl"
    return shared if shared.is_file() else PROJECT_DIR / "data" / "demo.jsonl"


# --------------------------------------------------------------------------- the shared work


def write_fitting_records(source, tokenizer, max_length, folder):
    """The records whose prompt fits max_length, as JSON Lines outside the repository. We and TRL both drop
    the others; dropping them up front keeps every contender at exactly one epoch."""
    fitting = [record for record in common.load_records(str(source))
               if common.tokenize_example(tokenizer, record, max_length)[0] is not None]
    return write_records(fitting, Path(folder) / "records.jsonl")


def write_records(records, path):
    lines = [json.dumps({key: record[key] for key in ("instruction", "context", "response", "category")},
                        ensure_ascii=False) + "\n" for record in records]
    return results.write_atomic(path, "".join(lines))


def training_records(records_file, samples, seed):
    """What the scripts train on given --max-train-samples: the same split and the same subset."""
    train, _, _ = common.split_records(common.load_records(str(records_file)), seed=seed)
    if len(train) < samples:
        raise errors.UsageError(f"{records_file}: {len(train)} training records, {samples} needed")
    return common.take_subset(train, samples, seed)


def matmul_peak(dtype_name, size, repeats=5):
    """Best GFLOP/s of a square matmul in this process, with the threads the contenders get."""
    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


# --------------------------------------------------------------------------- the run (parent process)


def contender_command(args, contender, method, model_source, files, workdir):
    """ours: the script itself on the fitting records, subset by its own --max-train-samples; trl and writeup:
    the worker on the same training records, written out by the orchestrator."""
    result = Path(workdir) / f"{contender}-{method}.json"
    shared = ["--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum),
              "--max-length", str(args.max_length), "--seed", str(args.seed), "--model", model_source]
    if contender == "ours":
        command = [sys.executable, str(PROJECT_DIR / SCRIPTS[method]), *shared,
                   "--dataset", str(files["fitting"]), "--max-train-samples", str(args.samples),
                   "--max-steps", str(args.steps), "--eval-steps", str(args.steps),
                   # validation, evaluation and saving are not timed; keep them short
                   "--max-val-samples", "2", "--max-eval-samples", "2", "--bootstrap-resamples", "10",
                   "--general-file", "",  # forgetting is not what this measures
                   "--output", str(result), "--output-dir", str(Path(workdir) / f"ours-{method}")]
    else:
        command = [sys.executable, str(WORKER), *shared, "--contender", contender, "--method", method,
                   "--records", str(files["train"]), "--steps", str(args.steps),
                   "--trl-precision", args.trl_precision, "--result", str(result), "--workdir", str(workdir)]
    return command, result


def run_contender(command, log_path, timeout):
    """Runs one contender to the end; returns (exit status, wall seconds, peak RSS bytes from os.wait4)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=PROJECT_DIR)
        killer = threading.Timer(timeout, process.kill)
        killer.start()
        _, status, usage = os.wait4(process.pid, 0)
        killer.cancel()
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, time.perf_counter() - start, usage.ru_maxrss * 1024


def measure(args, contender, method, model_source, files, workdir):
    command, result_path = contender_command(args, contender, method, model_source, files, workdir)
    log_path = Path(workdir) / f"{contender}-{method}.log"
    print(f"[{contender}/{method}] running ...", file=sys.stderr, flush=True)
    status, wall, peak_rss = run_contender(command, log_path, args.timeout)
    if status != 0 or not result_path.is_file():
        tail = log_path.read_text(errors="replace")[-2500:]
        print(f"[{contender}/{method}] FAILED (exit {status}); log tail:\n{tail}", file=sys.stderr)
        return {"contender": contender, "method": method, "error": f"exit status {status}", "wall_seconds": wall}
    reported = json.loads(result_path.read_text())
    print(f"[{contender}/{method}] {reported['train_tokens_per_second']:.1f} scored tokens/s, "
          f"{wall:.0f} s in all", file=sys.stderr, flush=True)
    return {"contender": contender, "method": method, "wall_seconds": wall, "peak_rss_bytes": peak_rss,
            "reported": reported}


def expected_work(tokenizer, records, max_length):
    """Scored and input tokens of one epoch of our examples, counted from the data, not by a trainer."""
    examples, _ = common.tokenize_records(tokenizer, records, max_length)
    scored = sum(sum(label != common.IGNORE_INDEX for label in example["labels"][1:]) for example in examples)
    return {"examples": len(examples), "scored_tokens": scored,
            "input_tokens": sum(len(example["input_ids"]) for example in examples)}


def flops_per_token(method, params, adapter_params):
    """Training FLOPs per input token: 6N for full fine-tuning; LoRA skips the frozen weights' gradients."""
    return 6 * params if method == "full" else 4 * params + 6 * adapter_params


def summarize(run, expected, params, adapter_params, peaks):
    """The row of the table: figures every contender is measured by."""
    reported = run["reported"]
    ours = run["contender"] == "ours"
    input_tokens = expected["input_tokens"] if ours else reported["input_tokens"]
    response_tokens = reported["train_tokens"] if ours else reported["response_tokens"]
    dtype = "bfloat16" if reported["bf16_autocast"] else "float32"
    input_rate = input_tokens / reported["train_step_seconds"]
    return {
        "contender": run["contender"], "method": run["method"],
        "scored_tokens": reported["train_tokens"],
        "scored_tokens_per_second": reported["train_tokens_per_second"],
        "response_tokens": response_tokens,
        "response_tokens_per_second": response_tokens / reported["train_step_seconds"],
        "input_tokens": input_tokens,
        "input_tokens_per_second": input_rate,
        "train_step_seconds": reported["train_step_seconds"],
        "optimizer_steps": reported["optimizer_steps"],
        "peak_rss_bytes": reported["peak_memory_bytes"],
        "train_peak_bytes": reported["train_peak_memory_bytes"],
        "compute_dtype": dtype,
        "flops_per_token": flops_per_token(run["method"], params, adapter_params),
        "mfu": flops_per_token(run["method"], params, adapter_params) * input_rate / (peaks[dtype] * 1e9),
        "wall_seconds": run["wall_seconds"],
        "bf16_autocast": reported["bf16_autocast"],
        "gradient_checkpointing": reported["gradient_checkpointing"] if not ours else
        reported["config"]["gradient_checkpointing"] == "on"
        or (reported["config"]["gradient_checkpointing"] == "auto" and reported["device"] == "cuda"),
    }


def cross_checks(runs, expected, steps):
    """Our JSON against counts from the data and the process's own peak; the contenders against each other."""
    checks = []
    for run in runs:
        if "error" in run:
            continue
        reported, name = run["reported"], f"{run['contender']}/{run['method']}"
        checks.append({"check": f"{name}: optimizer steps", "expected": steps, "got": reported["optimizer_steps"],
                       "ok": reported["optimizer_steps"] == steps})
        if run["contender"] in ("ours", "trl"):
            checks.append({"check": f"{name}: scored tokens = one epoch of our examples' response tokens",
                           "expected": expected["scored_tokens"], "got": reported["train_tokens"],
                           "ok": reported["train_tokens"] == expected["scored_tokens"]})
        # ru_maxrss follows the peak since the last phase reset (/proc/self/clear_refs), so the whole-run peak
        # the process recorded is at least what os.wait4 saw, and training's peak is at most the whole run's.
        checks.append({"check": f"{name}: recorded whole-run peak >= the last phase's peak RSS (os.wait4)",
                       "expected": run["peak_rss_bytes"], "got": reported["peak_memory_bytes"],
                       "ok": reported["peak_memory_bytes"] >= 0.99 * run["peak_rss_bytes"]})  # 1%: after writing
        checks.append({"check": f"{name}: training peak <= recorded whole-run peak",
                       "expected": reported["peak_memory_bytes"], "got": reported["train_peak_memory_bytes"],
                       "ok": reported["train_peak_memory_bytes"] is None  # not isolated here: nothing to check
                       or 0 < reported["train_peak_memory_bytes"] <= reported["peak_memory_bytes"]})
        if run["contender"] == "ours":
            rate = reported["train_tokens"] / reported["train_step_seconds"]
            checks.append({"check": f"{name}: JSON train_tokens_per_second = train_tokens / train_step_seconds",
                           "expected": rate, "got": reported["train_tokens_per_second"],
                           "ok": abs(rate - reported["train_tokens_per_second"]) <= 1e-6 * rate})
            checks.append({"check": f"{name}: timed seconds within the process's wall time",
                           "expected": run["wall_seconds"], "got": reported["train_step_seconds"],
                           "ok": reported["train_step_seconds"] < run["wall_seconds"]})
    return checks


def goals(rows):
    found = {(row["contender"], row["method"]): row for row in rows}
    results = []
    for method in METHODS:
        ours = found.get(("ours", method))
        for contender, target in (("trl", 1.5), ("writeup", 3.0)):
            other = found.get((contender, method))
            if ours and other:
                ratio = ours["scored_tokens_per_second"] / other["scored_tokens_per_second"]
                results.append({"goal": f"{method}: ours >= {target}x {contender} scored tokens/s",
                                "value": ratio, "met": ratio >= target})
    lora, full = found.get(("ours", "lora")), found.get(("ours", "full"))
    if lora and full:
        speed = lora["scored_tokens_per_second"] / full["scored_tokens_per_second"]
        results.append({"goal": "ours: LoRA scored tokens/s >= 1.35x full fine-tuning's (same batch)",
                        "value": speed, "met": speed >= 1.35})
        if lora["train_peak_bytes"] and full["train_peak_bytes"]:  # None where a phase's peak cannot be isolated
            ratio = lora["train_peak_bytes"] / full["train_peak_bytes"]
            results.append({"goal": "ours: LoRA training peak <= 0.6x full fine-tuning's (same batch)",
                            "value": ratio, "met": ratio <= 0.6})
    for row in (lora, full):
        if row:
            results.append({"goal": f"ours: {row['method']} MFU >= 50% of the {row['compute_dtype']} matmul peak",
                            "value": row["mfu"], "met": row["mfu"] >= 0.5})
    return results


def fmt_ratio(value, unit, suffix):
    """value / unit to 2 decimals, or n/a where a phase's peak could not be isolated (None)."""
    return "n/a" if not value or not unit else f"{value / unit:.2f}{suffix}"


def print_table(rows, goal_results, checks):
    gib = 1024**3
    ours = {row["method"]: row for row in rows if row["contender"] == "ours"}
    print("\n| method | contender | scored tok/s | ours is | response tok/s | ours is | input tok/s | "
          "training peak GiB | ours uses | peak RSS GiB | MFU | dtype |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        mine = ours.get(row["method"], row)
        print(f"| {row['method']} | {row['contender']} | {row['scored_tokens_per_second']:.1f} | "
              f"{mine['scored_tokens_per_second'] / row['scored_tokens_per_second']:.2f}x | "
              f"{row['response_tokens_per_second']:.1f} | "
              f"{mine['response_tokens_per_second'] / row['response_tokens_per_second']:.2f}x | "
              f"{row['input_tokens_per_second']:.1f} | {fmt_ratio(row['train_peak_bytes'], gib, '')} | "
              f"{fmt_ratio(mine['train_peak_bytes'], row['train_peak_bytes'], 'x')} | "
              f"{row['peak_rss_bytes'] / gib:.2f} | "
              f"{100 * row['mfu']:.1f}% | "
              f"{row['compute_dtype']} |")
    print()
    for goal in goal_results:
        print(f"goal {'MET ' if goal['met'] else 'MISS'} {goal['goal']}: {goal['value']:.2f}")
    for check in checks:
        if not check["ok"]:
            print(f"check FAILED {check['check']}: expected {check['expected']}, got {check['got']}")
    print(f"{sum(c['ok'] for c in checks)}/{len(checks)} cross-checks passed")
    print("\nDefinitions:")
    for key, text in DEFINITIONS.items():
        print(f"- {key}: {text}")


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    dataset = Path(args.dataset) if args.dataset else default_dataset()
    model_source = models.check_model_source(args.model)  # converts the demo model once if needed
    output = Path(args.output or PROJECT_DIR / "bench" / "results" /
                  ("throughput-quick.json" if args.quick else "throughput.json"))
    workdir = Path(tempfile.mkdtemp(prefix="lvf-throughput-"))
    try:
        tokenizer = models.load_tokenizer(model_source)
        records_file = write_fitting_records(dataset, tokenizer, args.max_length, workdir)
        records = training_records(records_file, args.samples, args.seed)
        files = {"fitting": records_file, "train": write_records(records, Path(workdir) / "train-records.jsonl")}
        expected = expected_work(tokenizer, records, args.max_length)
        params = models.count_parameters(models.meta_model(models.model_config(model_source)))[1]
        lora_model = adapters.add_adapters(models.meta_model(models.model_config(model_source)),
                                           lora.default_lora_config(), defaults.LORA.lora_targets)
        adapter_params = models.count_parameters(lora_model)[0]
        peak_size = 1024 if args.quick else 2048
        peaks = {name: matmul_peak(name, peak_size) for name in ("float32", "bfloat16")}
        print(f"{args.samples} records from {dataset}; {expected['scored_tokens']} scored of "
              f"{expected['input_tokens']} tokens per epoch; {params:,} parameters; matmul peak on "
              f"{torch.get_num_threads()} threads: fp32 {peaks['float32']:.0f}, bf16 {peaks['bfloat16']:.0f} GFLOP/s",
              file=sys.stderr, flush=True)

        runs = [measure(args, contender, method, model_source, files, workdir)
                for method in args.methods for contender in args.contenders]
        rows = [summarize(run, expected, params, adapter_params, peaks) for run in runs if "error" not in run]
        goal_results, checks = goals(rows), cross_checks(runs, expected, args.steps)
        print_table(rows, goal_results, checks)
        report = {
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "quick": args.quick,
            "settings": {key: getattr(args, key) for key in ("steps", "batch_size", "grad_accum", "samples",
                                                             "max_length", "seed", "trl_precision", "model")},
            "dataset": str(dataset),
            "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                        "torch_threads": torch.get_num_threads(), "bf16_cpu": settings.cpu_has_bf16()},
            "versions": provenance.package_versions((*provenance.PACKAGES, "trl")),
            "model_parameters": params,
            "lora_adapter_parameters": adapter_params,
            "matmul_peak_gflops": peaks,
            "expected_work": expected,
            "definitions": DEFINITIONS,
            "results": rows,
            "ratios_ours_over": ratios(rows),
            "goals": goal_results,
            "checks": checks,
            "failures": [run for run in runs if "error" in run],
            "git_commit": provenance.git_commit(),
            "total_seconds": time.perf_counter() - started,
        }
        results.write_atomic(output, json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {output} ({report['total_seconds'] / 60:.1f} min)")
        if report["failures"] or not all(check["ok"] for check in checks):
            sys.exit(1)
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def ratios(rows):
    found = {(row["contender"], row["method"]): row for row in rows}
    out = {}
    for (contender, method), row in found.items():
        ours = found.get(("ours", method))
        if ours and contender != "ours":
            out[f"{contender}/{method}"] = {
                "scored_tokens_per_second": ours["scored_tokens_per_second"] / row["scored_tokens_per_second"],
                "response_tokens_per_second": ours["response_tokens_per_second"] / row["response_tokens_per_second"],
                "peak_rss": ours["peak_rss_bytes"] / row["peak_rss_bytes"],
                "train_peak": (ours["train_peak_bytes"] / row["train_peak_bytes"]
                               if ours["train_peak_bytes"] and row["train_peak_bytes"] else None),
            }
    return out


if __name__ == "__main__":
    errors.main_guard(main)
