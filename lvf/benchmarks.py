"""Standard benchmarks (HellaSwag, ARC, WinoGrande, or a task file of one's own) scored by EleutherAI's
lm-evaluation-harness on the very model a script evaluates, in memory: the base model, the LoRA adapters on their base
(the peft model), or the fully fine-tuned model, in the weights' evaluation dtype. lm-eval's HFLM takes the model and
tokenizer instances, so nothing is loaded a second time, and by default it scores with its own prompts and no chat
template: a figure equals what the `lm_eval` command gives for the same weights.

Each task is recorded with its accuracy (and normalised accuracy where the task has it), a 95% bootstrap interval over
its items, and each item's correctness, so that methods can be paired item by item (lvf.benchmark_tables).

lm_eval is imported only when --benchmarks is given: a run without it needs nothing of lm-eval.
"""

import contextlib
import functools
import importlib.metadata
import importlib.util
import json
import math
import random
import re
import time
from pathlib import Path

import numpy as np
import torch
from huggingface_hub.constants import is_offline_mode

import common
from lvf.errors import UsageError
from lvf.statistics import interval, two_level_mean_draws

INSTALL = "pip install lm-eval==0.4.13 (requirements.txt)"
# lm-eval's metric names and the names the results give them.
METRICS = {"acc": "accuracy", "acc_norm": "accuracy_norm"}
# Answer choices per item of the forgetting tasks of Biderman et al. 2024 ("LoRA Learns Less and Forgets Less"), as
# lm-eval scores them: one log-likelihood request per choice. ARC-Challenge has 4 choices on most items (a few 3 or
# 5). The dry run counts a Hub task's requests from these two tables, without its data (a task not listed is not
# counted); a task file of one's own that loads its own items is loaded and counted exactly.
CHOICES = {"hellaswag": 4, "arc_challenge": 4, "arc_easy": 4, "winogrande": 2}
# Items each task scores without --benchmark-limit (lm-eval's evaluation split).
SPLIT_ITEMS = {"hellaswag": 10042, "arc_challenge": 1172, "arc_easy": 2376, "winogrande": 1267}


def task_names(settings):
    """The tasks asked for, in order, each once; [] without --benchmarks."""
    names = [name.strip() for name in (getattr(settings, "benchmarks", None) or "").split(",") if name.strip()]
    return list(dict.fromkeys(names))


# --------------------------------------------------------------------------- before anything loads


def lm_eval_installed():
    return importlib.util.find_spec("lm_eval") is not None  # looked up, not imported: the pre-flight stays quick


def task_manager(settings):
    """lm-eval's TaskManager with --benchmark-tasks-dir on its include path. lm-eval indexes its own ~14,000 task
    files by parsing each (about 6 s on a 2-core CPU, at every dry run and every run). Read as text instead (under a
    second), they show which folders declare the tasks asked, and only those are indexed; a name they do not contain
    at all is unknown to lm-eval (check_benchmarks says so). lm-eval's whole index is built only when the text leaves
    a doubt: a name declared by no line or by several, or by a group or tag line (`group: NAME`, `tag: NAME`)."""
    from lm_eval.tasks import TaskManager

    names = task_names(settings)
    folder = settings.benchmark_tasks_dir
    if folder is not None and not Path(folder).is_dir():
        raise UsageError(f"--benchmark-tasks-dir {folder}: not a folder; pass the folder that holds the task YAML "
                         "files")
    own = [folder] if folder is not None else []
    local = TaskManager(include_path=own, include_defaults=False) if own else None
    elsewhere = [name for name in names if local is None or name not in local.all_subtasks]
    if not elsewhere:
        return local
    declared, contained = lm_eval_declarations(elsewhere)
    known = [name for name in elsewhere if name in contained]
    if all(len(declared[name]) == 1 and declared[name][0] is not None for name in known):
        # lm-eval's folders first, then the user's, as TaskManager orders its defaults and include_path.
        folders = outermost({declared[name][0] for name in known})
        narrowed = TaskManager(include_path=[*folders, *own], include_defaults=False)
        if all(name in narrowed.all_subtasks for name in known):
            return narrowed
    return whole_index(None if folder is None else str(folder))


@functools.cache
def whole_index(folder):
    """lm-eval's whole index (with the folder of one's own task files, if any), built once per process: the
    pre-flight and the run both check the tasks."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=folder)


# A line that declares a task, or a group or tag, by name: `task: NAME`, the key or value quoted or not, a comment
# after it or not.
DECLARATION = re.compile(r"""^["']?(task|group|tag)["']?:[ \t]*["']?([\w.-]+)["']?[ \t]*(?:#.*)?$""", re.MULTILINE)


def lm_eval_task_files():
    """(path, text) of each of lm-eval's own task files: the YAML files it indexes and the templates they include,
    named freely (_default_template_yaml, _default_yaml_0.5k, mafand): every file without a suffix or with yaml in
    its name. Every name lm-eval's index knows is in them (tests/test_benchmark_checks.py checks it for the pinned
    lm-eval)."""
    import lm_eval.tasks

    for path in Path(lm_eval.tasks.__file__).parent.rglob("*"):
        if (path.suffix in ("", ".yml") or "yaml" in path.name) and path.is_file():
            yield path, path.read_text(encoding="utf-8", errors="replace")


def lm_eval_declarations(names):
    """({name: [folder of each line that declares it: a task's file's folder, None for a group or a tag]}, the
    names that lm-eval's task files contain at all), from those files read as text."""
    declared = {name: [] for name in names}
    contained = set()
    for path, text in lm_eval_task_files():
        contained.update(name for name in names if name in text)
        for kind, name in DECLARATION.findall(text):
            if name in declared:
                declared[name].append(str(path.parent) if kind == "task" else None)
    return declared, contained


def outermost(folders):
    """The folders that are not inside another of them (TaskManager indexes a folder with its subfolders)."""
    kept = []
    for folder in sorted(folders, key=lambda name: len(Path(name).parts)):
        if not any(Path(folder).is_relative_to(outer) for outer in kept):
            kept.append(folder)
    return sorted(kept)


def check_benchmarks(settings, multiple_processes=False):
    """The TaskManager of the asked tasks, or None without --benchmarks; a one-line error naming the fix when
    lm-eval is missing or a task is unknown. Called before the model loads."""
    names = task_names(settings)
    if not names:
        return None
    if not lm_eval_installed():
        raise UsageError(f"--benchmarks needs lm-evaluation-harness: {INSTALL}")
    if multiple_processes:
        raise UsageError("--benchmarks scores in one process: score the saved model afterwards with "
                         "evaluate_base_model.py --model OUTPUT_DIR/final --benchmarks ...")
    manager = task_manager(settings)
    for name in names:
        entry = manager.task_index.get(name)
        if entry is None:
            where = f" nor a task file in {settings.benchmark_tasks_dir}" if settings.benchmark_tasks_dir else ""
            raise UsageError(f"--benchmarks {name}: not a task lm-eval knows{where}; `lm_eval ls tasks` lists "
                             "them, --benchmark-tasks-dir adds a folder of task files")
        if name not in manager.all_subtasks:
            raise UsageError(f"--benchmarks {name}: a group of tasks in lm-eval; name its tasks one by one "
                             "(each is recorded and compared on its own)")
    return manager


# datasets' own loaders, which a task file can name with local data_files: not Hub datasets.
LOCAL_LOADERS = ("json", "csv", "parquet", "text", "arrow")


def dataset_id(manager, name):
    """The Hub dataset a task reads, or None (a task file that loads its own items, or local files)."""
    path = (manager.task_index[name].cfg or {}).get("dataset_path")
    return None if path in LOCAL_LOADERS or (path and Path(path).exists()) else path


def request_count(manager, name, limit):
    """(items, choices per item, log-likelihood requests) of a task. A task file that loads its own items (no Hub
    dataset) is loaded and counted exactly; a Hub task from SPLIT_ITEMS and CHOICES, without its data (None where
    not listed there)."""
    if dataset_id(manager, name) is None:  # local items: loading them costs little
        task = manager.load([name])["tasks"][name]
        docs = list(task.eval_docs)[:limit]
        requests = sum(len(task.doc_to_choice(doc)) for doc in docs)
        return len(docs), round(requests / len(docs), 2) if docs else 0, requests
    items = SPLIT_ITEMS.get(name)
    items = min(limit, items) if limit and items else (limit or items)
    choices = CHOICES.get(name)
    return items, choices, items * choices if items and choices else None


def preflight_lines(settings, results_folder=None):
    """[(level, text)] for the dry run's pre-flight: lm-eval installed, each task known and its data reachable (Hub
    cache or network), and what the benchmarks add in time. results_folder: where earlier runs of this experiment
    recorded their benchmark time."""
    names = task_names(settings)
    if not names:
        return []
    if not lm_eval_installed():
        return [("problem", f"--benchmarks needs lm-evaluation-harness, which is not installed: {INSTALL}")]
    try:
        manager = check_benchmarks(settings)
    except UsageError as error:
        return [("problem", str(error))]
    lines = []
    total = 0
    for name in names:
        repo = dataset_id(manager, name)
        if repo is not None and not common.in_hub_cache(repo, "dataset"):
            if is_offline_mode():
                lines.append(("problem", f"benchmark {name}: its data {repo} is not in the Hub cache and "
                                         f"HF_HUB_OFFLINE=1: unset HF_HUB_OFFLINE once so lm-eval downloads it, or "
                                         f"leave {name} out of --benchmarks"))
            else:
                lines.append(("info", f"benchmark {name}: its data {repo} is not in the Hub cache; lm-eval downloads "
                                      "it on first use (needs the network)"))
        items, choices, requests = request_count(manager, name, settings.benchmark_limit)
        total += requests or 0
        counted = (f"{items} items x {choices:g} choices = {requests} log-likelihood requests" if requests
                   else "its requests are counted once its data loads")
        lines.append(("info", f"benchmark {name}: {counted}"))
    lines.append(("info", time_line(settings, total, measured_rate(results_folder))))
    return lines


def study_line(settings, runs, results_folder):
    """For a study's dry run: the benchmarks each of its runs scores, their requests over the study, and their time
    where an earlier run measured it; None without --benchmarks."""
    names = task_names(settings)
    if not names:
        return None
    if not lm_eval_installed():
        return f"benchmarks {', '.join(names)}: lm-eval-harness is not installed: {INSTALL}"
    manager = check_benchmarks(settings)
    counts = [request_count(manager, name, settings.benchmark_limit)[2] for name in names]
    if None in counts:
        return f"benchmarks {', '.join(names)} on every run's evaluated model (their requests counted as data loads)"
    per_run = sum(counts)
    return (f"benchmarks {', '.join(names)} on every run's evaluated model, {per_run} requests a run: "
            + time_line(settings, per_run * runs, measured_rate(results_folder)))


def measured_rate(results_folder):
    """(seconds per request, the file that measured it) from an earlier run of the experiment, or None."""
    for path in sorted(Path(results_folder).glob("*.json")) if results_folder and Path(results_folder).is_dir() else []:
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        tasks = found.get("benchmarks") if isinstance(found, dict) else None
        requests = sum(task.get("requests") or 0 for task in (tasks or {}).values())
        if requests and found.get("benchmark_seconds"):
            return found["benchmark_seconds"] / requests, path
    return None


def time_line(settings, requests, rate=None):
    """What the benchmarks add in time: their requests (items x choices, each one continuation scored in a forward
    pass, --benchmark-batch-size at a time) times the seconds per request an earlier run of the experiment measured;
    without one, the count alone."""
    batches = math.ceil(requests / settings.benchmark_batch_size)
    counted = (f"benchmarks add {requests} log-likelihood requests in {batches} forward passes of "
               f"{settings.benchmark_batch_size} (items x choices)")
    if rate is None:
        return (counted + ": time not estimated, no earlier run of this experiment recorded benchmark_seconds (the "
                          "run records it; --benchmark-limit bounds it)")
    seconds, path = rate
    return (counted + f": about {requests * seconds / 60:.1f} min at the {seconds:.3g} s per request {path.name} "
                      "measured (same machine and model assumed)")


# --------------------------------------------------------------------------- scoring


@contextlib.contextmanager
def random_state_kept():
    """lm-eval's simple_evaluate seeds Python's, numpy's and torch's generators: the run's own state is put back
    afterwards, so that scoring benchmarks changes nothing else the run draws."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def score(model, tokenizer, settings, manager=None):
    """{"benchmarks": {task: ...}, "benchmark_seconds": s}, or {} without --benchmarks. model: the model as the
    script scores it (a peft model for LoRA), already on its device and in its evaluation dtype."""
    names = task_names(settings)
    if not names:
        return {}
    manager = manager or check_benchmarks(settings)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    start = time.perf_counter()
    with random_state_kept():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.benchmark_batch_size)
        output = simple_evaluate(model=lm, tasks=names, limit=settings.benchmark_limit, task_manager=manager,
                                 log_samples=True, bootstrap_iters=0,
                                 apply_chat_template=bool(settings.benchmark_chat_template))
    seconds = time.perf_counter() - start
    return {"benchmarks": {name: task_record(output, name, settings) for name in names},
            "benchmark_seconds": seconds}


def task_record(output, name, settings):
    """One task's figures from lm-eval's output: accuracy (and normalised accuracy) with a bootstrap interval over
    items, and each item's correctness by lm-eval's document id."""
    samples = sorted(output["samples"][name], key=lambda sample: sample["doc_id"])
    record = {"items": len(samples), "limit": settings.benchmark_limit,
              "version": output.get("versions", {}).get(name),
              "num_fewshot": output.get("n-shot", {}).get(name),
              "chat_template": bool(settings.benchmark_chat_template),
              "lm_eval_version": importlib.metadata.version("lm_eval")}
    record["requests"] = sum(len(sample["arguments"]) for sample in samples)  # one per choice
    # Each choice's log-likelihood too: the finest thing to compare runs (or lm_eval's own output) on.
    per_item = [{"id": sample["doc_id"],
                 "loglikelihoods": [float(response[0]) for response in sample["filtered_resps"]]} for sample in samples]
    for metric, field in METRICS.items():
        if metric not in samples[0]:
            continue
        correct = np.array([float(sample[metric]) for sample in samples])
        record[field] = float(output["results"][name][f"{metric},none"])
        record[f"{field}_ci95"] = item_interval(correct, settings.seed, settings.bootstrap_resamples)
        for item, value in zip(per_item, correct, strict=True):
            item["correct" if metric == "acc" else "correct_norm"] = int(value)
    record["per_item"] = per_item
    return record


def item_interval(correct, seed, resamples):
    """95% bootstrap interval of one run's accuracy over its items (the two-level bootstrap with one run)."""
    (draws,) = two_level_mean_draws([correct[None, :]], [list(range(len(correct)))], seed, resamples)
    return interval(draws)
