"""What a run records and how it is written: the results schema, provenance (versions, git commit),
secrets kept out, and atomic writes that keep earlier results."""

import dataclasses
import datetime as dt
import json
import os
import re
import tempfile
from pathlib import Path

from huggingface_hub import get_token

from lvf import experiments, provenance
from lvf.errors import ResultsWrittenElsewhere, UsageError
from lvf.files import write_atomic

PROJECT_DIR = Path(__file__).resolve().parents[1]


def weights_bytes(path):
    """Bytes on disk of the saved weights (safetensors files): the adapter alone for LoRA."""
    return sum(item.stat().st_size for item in Path(path).rglob("*.safetensors"))


RESULT_FIELDS = [
    "experiment", "config_file", "machine",
    "method", "model", "base_model", "dataset", "eval_file", "perplexity", "perplexity_ci95", "eval_loss",
    "eval_tokens", "eval_examples", "seed_style_perplexity", "trainable_params", "total_params", "base_params",
    "trainable_percent", "train_examples", "train_tokens", "train_seconds", "train_step_seconds",
    "validation_seconds", "checkpoint_seconds", "train_tokens_per_second", "optimizer_steps", "best_checkpoint",
    "best_validation_loss", "validation_loss", "validation_tokens", "resumed_from",
    "eval_seconds", "eval_precision", "peak_memory_bytes", "memory_kind", "load_peak_memory_bytes",
    "train_peak_memory_bytes", "eval_peak_memory_bytes", "phase_memory_kind", "phase_memory_unavailable",
    "phase_reserved_bytes", "phase_paged_bytes", "train_memory_breakdown", "planned_memory", "artifact_path",
    "artifact_bytes", "device", "dtype", "eval_dtype", "dtype_by_part", "bf16_autocast", "cuda_allocator_config",
    "seed", "truncation", "config", "runtime", "versions", "git_commit", "created_at", "dry_run",
    "general_file", "general_perplexity", "general_perplexity_ci95", "general_eval_loss", "general_eval_tokens",
    "general_eval_examples", "general_eval_seconds", "log_history", "per_example", "general_per_example",
    "benchmarks", "benchmark_seconds",
]


def build_results(settings, runtime, method, **fields):
    """Every field of the schema; those that do not apply are null. `config` is what was asked (as
    given), `runtime` what the run resolved from it."""
    from lvf import memory  # torch: here, where a run records, not where the study or the report imports this

    results = dict.fromkeys(RESULT_FIELDS)
    resolved = runtime.record()
    config = {key: value for key, value in dataclasses.asdict(settings).items() if not SECRET_NAME.search(key)}
    eval_file = getattr(settings, "eval_file", None)
    results.update(
        experiment=runtime.experiment,
        config_file=json.loads(json.dumps(experiments.record(settings.config), default=str)),
        machine=provenance.machine(),
        method=method,
        model=settings.model,
        base_model=settings.model,  # an evaluated artifact overrides it with the base it was trained from
        dataset=settings.dataset,  # evaluate_base_model.py records null when --eval-file was all it read
        eval_file=eval_file,
        seed=settings.seed,
        config=json.loads(json.dumps(config, default=str)),
        runtime=resolved,
        device=resolved["device"],
        dtype=resolved["dtype"],
        eval_dtype=resolved["eval_dtype"],  # the precision every method is scored in (lvf.precision)
        bf16_autocast=resolved["bf16_autocast"],
        cuda_allocator_config=memory.allocator_config(),
        versions=provenance.package_versions(),
        git_commit=provenance.git_commit(),
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        dry_run=bool(settings.dry_run),
    )
    results.update(fields)
    trainable, total = results.get("trainable_params"), results.get("total_params")
    if trainable is not None and total:
        results["trainable_percent"] = 100.0 * trainable / total
    unknown = set(results) - set(RESULT_FIELDS)
    if unknown:
        raise KeyError(f"fields outside the schema: {sorted(unknown)}")
    return redact_secrets(results)


SECRET_NAME = re.compile(r"token|secret|password|api_?key", re.IGNORECASE)


def known_secrets():
    """The Hub token (from HF_TOKEN or the login file) and any environment value named like a secret."""
    secrets = {value for key, value in os.environ.items() if SECRET_NAME.search(key) and len(value) >= 8}
    secrets.add(get_token() or "")
    return {secret for secret in secrets if len(secret) >= 8}


def redact_secrets(results):
    """Last line of defence: no known secret's value may appear anywhere in the results."""
    text = json.dumps(results, default=str)
    secrets = [secret for secret in known_secrets() if secret in text]
    if not secrets:
        return results
    for secret in secrets:
        text = text.replace(json.dumps(secret)[1:-1], "***")
    return json.loads(text)


def write_json_atomic(path, payload):
    """Results JSON, written atomically; earlier results are kept in history/, never overwritten."""
    return write_atomic(path, json.dumps(payload, indent=2) + "\n", keep_history=True)


def check_writable(path, flag, is_folder=False):
    """Refuses, before any data or model is loaded, an output location that cannot be written: a folder
    where a file goes (or the reverse), a parent that is a file, a folder without write permission, a file
    system that refuses files. Tried for real with a temporary file in the nearest existing folder, since
    permission bits say nothing for root (and nothing about read-only or virtual file systems)."""
    path = Path(path)
    if path.exists() and path.is_dir() != is_folder:
        raise UsageError(f"{flag} {path}: is a {'file' if is_folder else 'folder'}; expected a "
                         f"{'folder' if is_folder else 'file'}")
    existing = path if path.is_dir() else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {path}: {existing} is a file, not a folder")
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".lvf-write-check-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise UsageError(f"{flag} {path}: cannot write in {existing} ({error.strerror or error})") from error


def check_outputs(runtime, writes_model):
    """Every place the run will write, checked before the work: the results JSON and its history/ folder,
    and (when a model is trained) --output-dir."""
    if runtime.output is not None:
        check_writable(runtime.output, "--output")
        check_writable(Path(runtime.output).parent / "history", "--output (its history/ folder)", is_folder=True)
    if writes_model and runtime.output_dir is not None:
        check_writable(runtime.output_dir, "--output-dir", is_folder=True)


def write_results_somewhere(results, output, fallback_dir=None):
    """Writes the results to output; when that fails at the end of a run (disk full, permissions changed
    meanwhile), to fallback_dir/results.json or else a temporary file, so a finished run's numbers are
    never lost. Returns (the path written, the error that kept them from output or None)."""
    try:
        return write_json_atomic(output, results), None
    except OSError as error:
        failure = error
    candidates = [Path(fallback_dir) / "results.json"] if fallback_dir is not None else []
    candidates.append(Path(tempfile.gettempdir()) / f"lvf-{results['method']}-{os.getpid()}.json")
    for candidate in candidates:
        try:
            return write_json_atomic(candidate, results), failure
        except OSError:
            continue
    raise failure


def is_main_process():
    return int(os.environ.get("RANK", "0")) == 0


def finish(results, output, fallback_dir=None):
    """Writes the results (main process only; nowhere when output is None, as in a dry run without
    --output) and prints a one-line summary. If output cannot be written, they go beside the saved model
    (fallback_dir) or to a temporary file, and the run ends with an error that says where."""
    if not is_main_process():
        return
    ppl = results.get("perplexity")
    parts = []
    failure = None
    if output is not None:
        written, failure = write_results_somewhere(results, output, fallback_dir)
        parts.append(f"wrote {written}")
    if ppl is not None:
        low, high = results["perplexity_ci95"]
        parts.append(f"perplexity {ppl:.4f} (95% CI {low:.4f}-{high:.4f}) on {results['eval_tokens']} tokens")
    if results.get("trainable_params") is not None:
        parts.append(f"trainable {results['trainable_params']:,} of {results['total_params']:,}")
    print(f"[{results['method']}] " + "; ".join(parts), flush=True)
    if failure is not None:
        raise ResultsWrittenElsewhere(f"could not write the results to {output} ({failure.strerror or failure}); "
                                      f"they are in {written}")
