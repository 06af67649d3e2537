"""The report's benchmark figures (lvf.benchmark_tables) on fabricated item results: paired differences per task and
on the mean of the tasks, their two-level intervals, the tables, the plot and the study's findings. No model."""

import copy
from dataclasses import dataclass

import numpy as np
import pytest

from lvf import benchmark_tables as tables
from lvf import plots

TASKS = {"task_a": 20, "task_b": 10}


def fabricated_run(seed, rate, method="lora"):
    """A run whose items are right with probability `rate`, drawn from `seed`."""
    rng = np.random.default_rng(seed)
    return {"method": method, "seed": seed, "benchmarks": {
        task: {"items": count, "per_item": [{"id": i, "correct": int(rng.random() < rate)} for i in range(count)]}
        for task, count in TASKS.items()}}


def accuracy(run, task):
    items = run["benchmarks"][task]["per_item"]
    return sum(item["correct"] for item in items) / len(items)


@dataclass
class Group:
    method: str
    runs: list
    label: str
    variant: tuple = ()


@pytest.fixture
def sides():
    base = [fabricated_run(0, 0.8, "base")]
    lora = [fabricated_run(1, 0.7), fabricated_run(2, 0.7)]
    full = [fabricated_run(3, 0.4, "full"), fabricated_run(4, 0.4, "full")]
    return base, lora, full


def test_the_difference_is_of_mean_accuracies_per_task_and_on_the_mean_of_tasks(sides):
    _, lora, full = sides
    for task in TASKS:
        expected = np.mean([accuracy(run, task) for run in lora]) - np.mean([accuracy(run, task) for run in full])
        assert tables.paired_difference(lora, full, [task], 0, 200)["difference"] == pytest.approx(expected)
    both = tables.paired_difference(lora, full, list(TASKS), 0, 200)["difference"]
    assert both == pytest.approx(np.mean([tables.paired_difference(lora, full, [task], 0, 200)["difference"]
                                          for task in TASKS]))  # each task weighs the same, whatever its items


def test_changing_one_item_changes_the_figure_by_its_share(sides):
    _, lora, full = sides
    before = tables.paired_difference(lora, full, list(TASKS), 0, 500)
    changed = copy.deepcopy(lora)
    item = changed[1]["benchmarks"]["task_b"]["per_item"][3]
    item["correct"] = 1 - item["correct"]
    after = tables.paired_difference(changed, full, list(TASKS), 0, 500)
    step = (1 if item["correct"] else -1) / (2 * TASKS["task_b"] * len(TASKS))  # one of 2 seeds' 10 items, 2 tasks
    assert after["difference"] - before["difference"] == pytest.approx(step)
    assert after["ci95"] != before["ci95"]


def test_identical_sides_differ_by_exactly_zero_and_pairing_narrows_the_interval(sides):
    base, lora, _ = sides
    lora = lora[:1]  # one run each side: only the items are resampled (two seeds a side would add seed variance)
    same = tables.paired_difference(lora, copy.deepcopy(lora), list(TASKS), 0, 300)
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0] and not same["significant"]
    # One item changed on one side: the paired interval only sees that item (drawn 0, 1, 2... times), far narrower
    # than either side's own interval.
    nudged = copy.deepcopy(lora)
    for run in nudged:
        item = run["benchmarks"]["task_a"]["per_item"][0]
        item["correct"] = 1 - item["correct"]
    low, high = tables.paired_difference(nudged, lora, list(TASKS), 0, 300)["ci95"]
    own_low, own_high = tables.accuracy_summary(lora, list(TASKS), 0, 300)["ci95"]
    assert low <= 0 <= high and (high - low) < (own_high - own_low) / 2


def test_a_clear_loss_of_accuracy_is_significant_and_the_tables_show_it(sides):
    base, lora, full = sides
    forgetting = tables.paired_difference(full, base, list(TASKS), 0, 1000)
    assert forgetting["difference"] < 0 and forgetting["significant"]
    groups = [Group("base", base, "Zero-shot (base)"), Group("lora", lora, "LoRA"), Group("full", full, "Full")]
    lines = tables.benchmark_lines(groups, [(groups[1], groups[2]), (groups[2], groups[0])], 0, 200)
    text = "\n".join(lines)
    assert "task_a (20 items)" in text and "task_b (10 items)" in text and tables.MEAN in text
    row = next(line for line in lines if line.startswith("| Full − Zero-shot (base) |"))
    assert f"{forgetting['difference']:+.3f}" in row.split("|")[-2] and row.rstrip(" |").endswith("*")
    assert tables.benchmark_lines([Group("base", [{"method": "base"}], "base")], [], 0, 200) == []


def test_the_study_findings_say_it_in_words(sides):
    base, lora, full = sides
    runs = {"base.json": base[0], **{f"lora-{i}.json": run for i, run in enumerate(lora)},
            **{f"full-{i}.json": run for i, run in enumerate(full)}}
    summary = {"base": {"file": "base.json"}, "methods": {
        "lora-all-linear": {"script": "finetune", "runs": [{"file": f"lora-{i}.json"} for i in range(2)]},
        "full": {"script": "full_finetune", "runs": [{"file": f"full-{i}.json"} for i in range(2)]}}}
    lines = tables.findings_lines(summary, runs, 0, 1000)
    full_line = next(line for line in lines if line.startswith("  - full:"))
    lora_vs_full = next(line for line in lines if "lora-all-linear minus full" in line)
    expected = tables.paired_difference(full, base, list(TASKS), 0, 1000)
    assert f"{expected['difference']:+.3f}" in full_line and full_line.endswith("it forgot.")
    assert lora_vs_full.endswith("lora-all-linear kept more.")
    assert tables.findings_lines({"methods": {}}, {}, 0, 100) == []


def test_the_tradeoff_plot_takes_benchmark_accuracy_as_forgetting(sides, tmp_path):
    base, _, full = sides
    groups = Group("base", base, "base"), Group("full", full, "Full")
    learned = {"difference": -2.0, "ci95": [-3.0, -1.0]}  # report.py's tuned − base perplexity
    points = tables.tradeoff_points([(groups[1], groups[0], learned, None)], 0, 200)
    (_, learning, forgetting, tasks), = points
    assert learning == {"value": 2.0, "ci95": [1.0, 3.0]}
    forgot = tables.paired_difference(full, base, list(TASKS), 0, 200)["difference"]
    assert forgetting["value"] == pytest.approx(-forgot)
    path = plots.draw_benchmark_tradeoff(points, groups, tmp_path / "plot.png")
    assert path.is_file() and tasks == list(TASKS)
