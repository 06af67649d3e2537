"""Benchmark accuracy (lvf.benchmarks' results) in the report: each group's accuracy per task and on the mean of the
tasks, and the paired differences the comparison rests on: tuned minus base (forgetting: below 0, the tuned model
forgot) and LoRA minus full fine-tuning, per task and for the mean of the tasks, with the two-level interval of
lvf.statistics (seeds resampled, then items, the same items for both sides, paired by lm-eval's document id). Also
the learning-versus-forgetting plot on benchmark accuracy, and the study's findings in words. Pure functions of the
runs' JSON; numpy and matplotlib only.

A group is anything with `runs` (a list of results dicts) and `label`, as report.py's groups are."""

import numpy as np

from lvf.plots import is_full, method_order, seed_runs
from lvf.statistics import interval, two_level_mean_draws

MEAN = "mean of tasks"


def recorded_tasks(runs):
    """The tasks every one of the runs recorded, in the order the first run lists them."""
    if not runs or not all(run.get("benchmarks") for run in runs):
        return []
    first, *others = [run["benchmarks"] for run in runs]
    return [task for task in first if all(task in other for other in others)]


def correctness(run, task):
    """{item id: 1 or 0} of one run on one task."""
    return {item["id"]: item["correct"] for item in run["benchmarks"][task]["per_item"]}


def matrices(sides, tasks):
    """Per side, one matrix runs x items with every task's shared items side by side, and the column strata (one per
    task): the sides paired item by item within each task."""
    everyone = [run for runs in sides for run in runs]
    columns, blocks, start = [], [[] for _ in sides], 0
    for task in tasks:
        ids = sorted(set.intersection(*(set(correctness(run, task)) for run in everyone)))
        columns.append(list(range(start, start + len(ids))))
        start += len(ids)
        for block, runs in zip(blocks, sides, strict=True):
            rows = [correctness(run, task) for run in runs]
            block.append(np.array([[row[i] for i in ids] for row in rows], dtype=np.float64))
    return [np.hstack(block) for block in blocks], columns


def mean_accuracy(scores, strata):
    """Mean over runs of the mean over tasks of each task's accuracy."""
    return float(np.mean([scores[:, columns].mean(1) for columns in strata], axis=0).mean())


def accuracy_summary(runs, tasks, seed, resamples):
    """Mean accuracy over the runs on the tasks (one task, or several averaged), with its two-level interval."""
    (scores,), strata = matrices([runs], tasks)
    (draws,) = two_level_mean_draws([scores], strata, seed, resamples)
    return {"mean": mean_accuracy(scores, strata), "ci95": interval(draws), "items": scores.shape[1],
            "runs": len(runs)}


def paired_difference(runs_a, runs_b, tasks, seed, resamples):
    """Mean accuracy of a minus b on the items both scored (per task, then averaged over tasks), with the two-level
    interval; significant when it excludes 0."""
    (scores_a, scores_b), strata = matrices([runs_a, runs_b], tasks)
    draws_a, draws_b = two_level_mean_draws([scores_a, scores_b], strata, seed, resamples)
    low, high = interval(draws_a - draws_b)
    return {"difference": mean_accuracy(scores_a, strata) - mean_accuracy(scores_b, strata), "ci95": [low, high],
            "items": scores_a.shape[1], "significant": not low <= 0 <= high}


def columns_of(tasks):
    """(heading, tasks averaged) per column: each task, then their mean when there are several."""
    return [(task, [task]) for task in tasks] + ([(MEAN, tasks)] if len(tasks) > 1 else [])


def fmt_accuracy(summary):
    low, high = summary["ci95"]
    return f"{summary['mean']:.3f} ({low:.3f}–{high:.3f})"


def fmt_difference(result):
    low, high = result["ci95"]
    return f"{result['difference']:+.3f} ({low:+.3f} to {high:+.3f}){' *' if result['significant'] else ''}"


def benchmark_lines(groups, pairs, seed, resamples):
    """Markdown: each group's benchmark accuracy, then the paired differences of the compared pairs (a, b); [] when
    no run recorded a benchmark."""
    tasks = recorded_tasks([run for group in groups for run in group.runs if run.get("benchmarks")])
    scored = [group for group in groups if recorded_tasks(group.runs)]
    if not tasks or not scored:
        return []
    columns = columns_of(tasks)
    items = {task: scored[0].runs[0]["benchmarks"][task]["items"] for task in tasks}
    header = "| benchmark accuracy (95% CI) | " + " | ".join(
        f"{name} ({items[name]} items)" if name in items else name for name, _ in columns) + " |"
    lines = ["", header, "|" + " --- |" * (len(columns) + 1)]
    for group in scored:
        lines.append(f"| {group.label} | " + " | ".join(
            fmt_accuracy(accuracy_summary(group.runs, averaged, seed, resamples)) for _, averaged in columns) + " |")
    compared = [(a, b) for a, b in pairs if set(tasks) <= set(recorded_tasks(a.runs + b.runs))]
    if compared:
        lines += ["", "| accuracy difference (95% CI; * excludes 0) | " + " | ".join(name for name, _ in columns)
                  + " |", "|" + " --- |" * (len(columns) + 1)]
        for a, b in compared:
            lines.append(f"| {a.label} − {b.label} | " + " | ".join(
                fmt_difference(paired_difference(a.runs, b.runs, averaged, seed, resamples))
                for _, averaged in columns) + " |")
    lines += ["", "_Benchmarks: lm-eval-harness's accuracy (acc) on each task's items, zero-shot, its prompts; a "
                  "tuned model minus the base below 0 means it forgot. A difference is of mean accuracies across "
                  "seeds; its interval resamples seeds, then items paired by id (within each task for the mean of "
                  "tasks, which weighs each task the same)._"]
    return lines


# --------------------------------------------------------------------------- the plot's points (lvf.plots draws them)


def tradeoff_points(found, seed, resamples):
    """Per tuned group against its base: (group, learning, forgetting), learning = base − tuned held-out perplexity
    (report.py's paired result), forgetting = base − tuned mean benchmark accuracy (higher = forgot more), each
    {"value", "ci95"}."""
    points = []
    for group, base, result, _ in found:
        if base.method != "base" or result is None or result.get("difference") is None:
            continue
        tasks = recorded_tasks(group.runs + base.runs)
        if not tasks:
            continue
        forgot = paired_difference(base.runs, group.runs, tasks, seed, resamples)
        low, high = result["ci95"]
        points.append((group, {"value": -result["difference"], "ci95": [-high, -low]},
                       {"value": forgot["difference"], "ci95": forgot["ci95"]}, tasks))
    return points


# --------------------------------------------------------------------------- the study's findings


def verdict(result, more, less):
    if not result["significant"]:
        return "not significantly different from 0"
    return more if result["difference"] > 0 else less


def fmt_result(result):
    low, high = result["ci95"]
    return f"{result['difference']:+.3f} (95% CI {low:+.3f} to {high:+.3f})"


def findings_lines(summary, runs, seed=42, resamples=1000):
    """Markdown lines: per method at its picked rate, its benchmark accuracy minus the base's (forgetting), and per
    LoRA method its accuracy minus full fine-tuning's, on the mean of the tasks every run recorded; [] when none
    did."""
    base_file = (summary.get("base") or {}).get("file")
    base_runs = [runs[base_file]] if base_file in runs else []
    methods = [(name, summary["methods"][name], seed_runs(summary["methods"][name], runs))
               for name in method_order(summary)]
    methods = [(name, entry, seeded) for name, entry, seeded in methods if seeded]
    tasks = recorded_tasks(base_runs + [run for *_, seeded in methods for run in seeded])
    if not tasks or not base_runs:
        return []
    what = MEAN if len(tasks) > 1 else "accuracy"
    base = accuracy_summary(base_runs, tasks, seed, resamples)
    lines = [f"- Benchmarks ({', '.join(tasks)}; {base['items']} items, lm-eval-harness, zero-shot): the base "
             f"model's {what} is {base['mean']:.3f}. Tuned minus base:"]
    for name, _, seeded in methods:
        result = paired_difference(seeded, base_runs, tasks, seed, resamples)
        lines.append(f"  - {name}: {fmt_result(result)}, {len(seeded)} seed{'s' if len(seeded) > 1 else ''}: "
                     f"{verdict(result, 'it gained accuracy', 'it forgot')}.")
    full = next(((name, seeded) for name, entry, seeded in methods if is_full(name, entry)), None)
    if full is not None:
        for name, entry, seeded in methods:
            if is_full(name, entry):
                continue
            result = paired_difference(seeded, full[1], tasks, seed, resamples)
            lines.append(f"  - {name} minus {full[0]}: {fmt_result(result)}: "
                         f"{verdict(result, f'{name} kept more', f'{name} kept less')}.")
    return lines
