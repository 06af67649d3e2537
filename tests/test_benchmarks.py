"""--benchmarks: lm-eval-harness tasks scored on the model each script evaluates, on a tiny random Llama and the
project's own task (data/benchmarks/demo-mc.yaml), a few items of it."""

import math

import pytest
from conftest import BENCHMARK_LIMIT as LIMIT
from conftest import BENCHMARK_TASKS_DIR as TASKS_DIR

from lvf import benchmarks


@pytest.fixture(scope="module")
def scored(trained_run):
    """The session's base, LoRA and full runs, each with the demo task's first LIMIT items (conftest.BENCHMARK)."""
    runs = {method: trained_run(method) for method in ("base", "lora", "full")}
    return {**{method: run.results for method, run in runs.items()},
            "artifacts": {method: run.output_dir / "final" for method, run in runs.items() if method != "base"}}


def lm_eval_scores(**model_args):
    """The demo task's first LIMIT items as the lm_eval command scores them: it loads the model itself."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model="hf", model_args={"dtype": "float32", "device": "cpu", **model_args},
                           tasks=["demo_mc"], limit=LIMIT, batch_size=4, bootstrap_iters=0,
                           task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False))


def assert_same_scores(ours, theirs):
    assert ours["accuracy"] == theirs["results"]["demo_mc"]["acc,none"]
    assert ours["accuracy_norm"] == theirs["results"]["demo_mc"]["acc_norm,none"]
    samples = sorted(theirs["samples"]["demo_mc"], key=lambda sample: sample["doc_id"])
    assert [item["correct"] for item in ours["per_item"]] == [int(sample["acc"]) for sample in samples]
    assert [item["correct_norm"] for item in ours["per_item"]] == [int(sample["acc_norm"]) for sample in samples]
    assert [item["loglikelihoods"] for item in ours["per_item"]] == [
        [float(response[0]) for response in sample["filtered_resps"]] for sample in samples]


def test_base_accuracy_equals_lm_evals_own_run_of_the_same_model(scored, tiny_llama_64_dir):
    """What the lm_eval command gives for the model folder (it loads it itself) is what the script recorded from the
    model in memory: the accuracy and every item's correctness, exactly."""
    assert_same_scores(scored["base"]["benchmarks"]["demo_mc"], lm_eval_scores(pretrained=str(tiny_llama_64_dir)))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_tuned_run_scores_the_weights_it_saved(scored, method, tiny_llama_64_dir):
    """The trained model is the one scored (LoRA as its adapters on the base in the evaluation dtype): lm_eval on the
    saved artifact (docs/method.md's command) gives the recorded figures."""
    artifact = str(scored["artifacts"][method])
    theirs = (lm_eval_scores(pretrained=str(tiny_llama_64_dir), peft=artifact) if method == "lora"
              else lm_eval_scores(pretrained=artifact))
    assert_same_scores(scored[method]["benchmarks"]["demo_mc"], theirs)
    tuned, base = (scored[name]["benchmarks"]["demo_mc"]["per_item"] for name in (method, "base"))
    assert [item["loglikelihoods"] for item in tuned] != [item["loglikelihoods"] for item in base]  # not the base


@pytest.mark.parametrize("method", ["base", "lora", "full"])
def test_every_method_records_the_task_with_its_interval_and_each_item(scored, method):
    task = scored[method]["benchmarks"]["demo_mc"]
    correct = [item["correct"] for item in task["per_item"]]
    assert [item["id"] for item in task["per_item"]] == list(range(LIMIT))  # the first LIMIT items, in order
    assert task["items"] == LIMIT and task["limit"] == LIMIT and task["requests"] == 4 * LIMIT
    assert set(correct) <= {0, 1} and math.isclose(task["accuracy"], sum(correct) / LIMIT)
    low, high = task["accuracy_ci95"]
    assert 0 <= low <= task["accuracy"] <= high <= 1 and low < high or low == high == task["accuracy"]
    assert task["chat_template"] is False and task["num_fewshot"] == 0
    assert scored[method]["benchmark_seconds"] > 0


def test_item_interval_is_the_bootstrap_of_the_items():
    import numpy as np

    correct = np.array([1.0] * 30 + [0.0] * 10)
    low, high = benchmarks.item_interval(correct, seed=0, resamples=2000)
    assert low < 0.75 < high and 0.55 < low and high < 0.9
    assert benchmarks.item_interval(np.ones(20), seed=0, resamples=200) == [1.0, 1.0]


def test_the_report_shows_the_benchmarks_beside_perplexity_and_plots_them(scored, tmp_path):
    import report
    from lvf import benchmark_tables, plots
    from lvf import groups as grouping

    runs = [{**scored[method], "source": f"{method}.json"} for method in ("base", "lora", "full")]
    groups = grouping.group_runs(runs, grouping.VARIANT_KEYS.split(","))
    text = "\n".join(report.render_block(groups, 0, 100))
    assert f"| benchmark accuracy (95% CI) | demo_mc ({LIMIT} items) |" in text
    for row in ("| LoRA − Full fine-tuning |", "| LoRA − Zero-shot (base) |",
                "| Full fine-tuning − Zero-shot (base) |"):
        assert text.count(row) == 2  # in the perplexity comparison and in the benchmark one
    points = benchmark_tables.tradeoff_points(grouping.comparisons(groups, 0, 100), 0, 100)
    drawn = plots.draw_benchmark_tradeoff(points, groups, tmp_path / "learning_vs_benchmarks.png")
    assert drawn == tmp_path / "learning_vs_benchmarks.png" and drawn.is_file()
