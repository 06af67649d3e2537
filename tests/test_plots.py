"""lvf/plots.py and lvf/findings.py on a fake study folder laid out as study.py writes it (read by lvf/discovery.py):
what each plot draws (means over seeds, the picked rate, the Pareto front), the one colour scheme, and sentences
that follow the runs' JSON."""

import json

import numpy as np
import pytest

from lvf import discovery, errors, findings, plots
from lvf import groups as grouping

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EXAMPLES = 60
SEEDS = (42, 43)
GiB = 2**30


def fake_run(method, nll_scale, seed, learning_rate, validation, memory_gib=3.0, curve=(2.6, 2.5, 2.45)):
    """A results JSON: the same examples and token counts in every run; the NLL scaled per run, with a little
    noise per example and seed; validation loss logged at steps 8, 16 and 21."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(10, 60, size=EXAMPLES)
    base_nll = tokens * rng.uniform(1.5, 2.5, size=EXAMPLES)
    noise = np.random.default_rng([seed, int(nll_scale * 1000)]).normal(1.0, 0.02, size=EXAMPLES)
    nll = base_nll * nll_scale * noise
    loss = float(nll.sum() / tokens.sum())
    log = [{"loss": 3.0, "step": 8}] + [{"eval_loss": value, "step": step}
                                         for step, value in zip((8, 16, 21), curve, strict=True)]
    return {"method": method, "seed": seed, "perplexity": float(np.exp(loss)), "eval_loss": loss,
            "validation_loss": validation, "train_peak_memory_bytes": int(memory_gib * GiB),
            "config": {"learning_rate": learning_rate, "seed": seed}, "log_history": log,
            "per_example": [{"id": f"id{i}", "nll_sum": float(n), "tokens": int(t)}
                            for i, (n, t) in enumerate(zip(nll, tokens, strict=True))]}


# name: (script, family, rank, {rate: validation loss}, picked rate, NLL scale, training peak GiB)
METHODS = {
    "lora-all-linear": ("finetune", "lora-all-linear", 16, {1e-3: 2.50, 3e-3: 2.44, 1e-2: 2.80}, 3e-3, 0.70, 3.4),
    "lora-all-linear-r1": ("finetune", "lora-all-linear", 1, {1e-3: 2.62, 3e-3: 2.58, 1e-2: 2.90}, 3e-3, 0.90, 3.2),
    "lora-all-linear-r4": ("finetune", "lora-all-linear", 4, {3e-3: 2.50}, 3e-3, 0.78, 3.3),
    "lora-dora": ("finetune", "lora-dora", 16, {1e-3: 2.45, 3e-3: 2.47, 1e-2: 2.9}, 1e-3, 0.72, 3.9),
    "full": ("full_finetune", "full", None, {5e-5: 2.52, 1.5e-4: 2.45, 5e-4: 2.53}, 1.5e-4, 0.70, 4.5),
}


def curve_for(name, seed):
    """Distinct validation curves per method and seed, so a mean over seeds is a real mean."""
    shift = 0.01 * list(METHODS).index(name) + (0.04 if seed == 43 else 0.0)
    return tuple(value + shift for value in (2.6, 2.5, 2.45))


def write_study(folder, methods=METHODS):
    """summary.json and every run's JSON, as study.py lays them out (files relative to the folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.json").write_text(json.dumps(fake_run("base", 1.0, 42, None, None)))
    summary = {"experiment": "fake", "base": {"file": "base.json", "perplexity": 9.0, "general_perplexity": None},
               "methods": {}}
    for name, (script, family, rank, rates, picked, scale, memory) in methods.items():
        method = "full" if script == "full_finetune" else "lora"
        (folder / name).mkdir(exist_ok=True)
        tried = {}
        for rate, validation in rates.items():
            file = f"{name}/lr-{rate:g}-seed-42.json"
            # A rate that was not picked trained worse on the test split too.
            run = fake_run(method, scale + (0 if rate == picked else 0.05), 42, rate, validation, memory,
                           curve_for(name, 42))
            (folder / file).write_text(json.dumps(run))
            tried[f"{rate:g}"] = {"validation_loss": validation, "file": file}
        seeded = []
        for seed in SEEDS:
            file = f"{name}/lr-{picked:g}-seed-{seed}.json"
            if seed != 42:
                run = fake_run(method, scale + 0.004, seed, picked, rates[picked] + 0.01, memory, curve_for(name, seed))
                (folder / file).write_text(json.dumps(run))
            seeded.append({"seed": seed, "file": file})
        summary["methods"][name] = {
            "script": script, "family": family, "rank": rank,
            "variant": ({"use_dora": name == "lora-dora", "use_rslora": False, "init_lora_weights": "true"}
                        if method == "lora" else None),
            "learning_rates": tried, "picked_learning_rate": picked,
            "picked_from": "sweep" if family == name else f"{family} (rank axis)", "runs": seeded}
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


@pytest.fixture
def study(tmp_path):
    folder = tmp_path / "study"
    summary = write_study(folder)
    return folder, summary, discovery.load_study_runs(folder, summary)


def test_every_named_file_is_loaded(study):
    folder, summary, runs = study
    assert set(runs) == {path.relative_to(folder).as_posix() for path in folder.rglob("*.json")} - {"summary.json"}


def test_validation_curves_are_means_over_seeds(study, tmp_path):
    _, summary, runs = study
    curves = plots.validation_curves(summary, runs)
    assert list(curves) == ["lora-all-linear-r1", "lora-all-linear-r4", "lora-all-linear", "lora-dora", "full"]
    full = curves["full"]
    expected = np.mean([curve_for("full", 42), curve_for("full", 43)], axis=0)
    assert full["steps"] == [8, 16, 21] and full["seeds"] == 2
    assert full["mean"] == pytest.approx(expected)
    assert full["low"] == pytest.approx(curve_for("full", 42)) and full["high"] == pytest.approx(curve_for("full", 43))
    figure = plots.validation_figure(summary, curves)
    axis = figure.axes[0]
    assert axis.get_xscale() == "log"
    drawn = {line.get_label().split(",")[0]: line.get_ydata() for line in axis.lines}
    assert list(drawn["full"]) == pytest.approx(expected)
    path = plots.draw_validation_curves(summary, runs, tmp_path / "curves.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_a_seed_without_the_step_leaves_that_step_out(study):
    _, summary, runs = study
    run = runs["full/lr-0.00015-seed-43.json"]
    run["log_history"] = [entry for entry in run["log_history"] if entry["step"] != 16]
    assert plots.validation_curves(summary, runs)["full"]["steps"] == [8, 21]
    for name in ("full/lr-0.00015-seed-42.json", "full/lr-0.00015-seed-43.json"):
        runs[name]["log_history"] = []
    assert "full" not in plots.validation_curves(summary, runs)


def test_loss_by_learning_rate_marks_the_picked_rate(study, tmp_path):
    _, summary, runs = study
    curves = plots.loss_by_learning_rate(summary, runs)
    assert curves["full"]["rates"] == [5e-5, 1.5e-4, 5e-4]
    assert curves["full"]["losses"] == [2.52, 2.45, 2.53] and curves["full"]["picked"] == 1.5e-4
    assert curves["lora-all-linear-r4"]["rates"] == [3e-3]
    test_losses = plots.loss_by_learning_rate(summary, runs, loss="test")["full"]["losses"]
    assert test_losses == [runs[f"full/lr-{rate:g}-seed-42.json"]["eval_loss"] for rate in (5e-5, 1.5e-4, 5e-4)]
    axis = plots.learning_rate_figure(summary, curves, "validation").axes[0]
    stars = [(list(line.get_xdata()), list(line.get_ydata())) for line in axis.lines if line.get_marker() == "*"]
    assert ([1.5e-4], [2.45]) in stars and ([1e-3], [2.45]) in stars  # full's and DoRA's picked rates
    assert "validation loss" in axis.get_ylabel() and axis.get_xscale() == "log"
    path = plots.draw_loss_by_learning_rate(summary, runs, tmp_path / "u.png", loss="test")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_a_diverged_rate_is_shown_at_the_top_edge_not_scaled_in(study):
    _, summary, runs = study
    summary["methods"]["full"]["learning_rates"]["0.0005"]["validation_loss"] = 10.8
    curves = plots.loss_by_learning_rate(summary, runs)
    axis = plots.learning_rate_figure(summary, curves, "validation").axes[0]
    lowest = min(value for curve in curves.values() for value in curve["losses"])
    assert axis.get_ylim()[1] == pytest.approx(1.5 * lowest)
    edge = [(list(line.get_xdata()), list(line.get_ydata())) for line in axis.lines if line.get_marker() == "^"]
    assert edge == [([5e-4], [pytest.approx(1.5 * lowest)])] and axis.texts[0].get_text() == "10.8"


def test_perplexity_by_memory_and_its_pareto_front(study, tmp_path):
    _, summary, runs = study
    points = plots.perplexity_by_memory(summary, runs, resamples=200)
    full_runs = [runs[f"full/lr-0.00015-seed-{seed}.json"] for seed in SEEDS]
    assert points["full"]["mean"] == pytest.approx(np.mean([run["perplexity"] for run in full_runs]))
    assert points["full"]["memory_bytes"] == 4.5 * GiB and points["full"]["runs"] == 2
    low, high = points["full"]["ci95"]
    assert low < points["full"]["mean"] < high
    # r1 is the cheapest, r4 and r16 each beat the cheaper ranks; DoRA (more memory, worse than r16) and full
    # (most memory, no better than r16) are not on the front.
    front = {name for name, point in points.items() if point["pareto"]}
    assert front == {"lora-all-linear-r1", "lora-all-linear-r4", "lora-all-linear"}
    path = plots.draw_perplexity_by_memory(summary, runs, tmp_path / "pareto.png", resamples=200)
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_pareto_front():
    assert plots.pareto_front([(1, 5), (2, 4), (3, 4.5), (4, 1), (4, 0.5)]) == [0, 1, 4]


def test_all_three_plots_go_into_the_study_folder(study):
    folder, summary, runs = study
    drawn = plots.draw_study_plots(folder, summary, runs, resamples=100)
    assert [path.name for path in drawn] == ["validation_loss_by_step.png", "loss_by_learning_rate.png",
                                             "perplexity_by_memory.png"]


def test_rate_ratios_state_the_ratio_and_the_grids_bracket(study):
    _, summary, _ = study
    lines = findings.rate_ratios(summary)
    assert len(lines) == 2  # the swept LoRA methods; rank-axis methods took their family's rate
    linear, dora = lines
    # 3e-3 / 1.5e-4 = 20; LoRA's best lies in (1e-3, 1e-2), full's in (5e-5, 5e-4): the ratio in (2x, 200x).
    assert "= **20x**" in linear and "between 2x and 200x" in linear
    assert "(3x to 3.3x steps for lora-all-linear, 3x to 3.3x steps for full)" in linear
    assert "= **6.67x**" in dora and "lora-dora's 0.001 is the bottom of its grid: its best rate may be lower" in dora
    assert "at most 60x, with no lower bound" in dora  # 3e-3 / 5e-5


def test_rank_rate_check_says_whether_the_best_rate_moved(study):
    _, summary, _ = study
    (line,) = findings.rank_rate_checks(summary)
    assert line.startswith("- At rank 1 (lora-all-linear-r1), lora-all-linear's picked rate 0.003 is still the best")
    summary["methods"]["lora-all-linear-r1"]["learning_rates"]["0.001"]["validation_loss"] = 2.5
    (line,) = findings.rank_rate_checks(summary)
    assert "0.001 does better than lora-all-linear's picked 0.003: the best rate moved with rank" in line


def test_rank_reaching_full_follows_the_runs_json(study):
    folder, summary, runs = study
    (line,) = findings.rank_reaching_full(summary, runs, resamples=300)
    assert line.startswith("- lora-all-linear: the smallest rank") and "is **16** (ranks tried: 1, 4, 16)" in line
    # One rank-4 run's JSON changes (rank 4 now as good as full fine-tuning) and the sentence follows.
    for seed in SEEDS:
        file = f"lora-all-linear-r4/lr-0.003-seed-{seed}.json"
        scale = {42: 0.70, 43: 0.704}[seed]
        run = fake_run("lora", scale, seed, 3e-3, 2.5)
        (folder / file).write_text(json.dumps(run))
    (line,) = findings.rank_reaching_full(summary, discovery.load_study_runs(folder, summary), resamples=300)
    assert "is **4** (ranks tried: 1, 4, 16)" in line


def test_no_rank_reaching_full_is_said(study):
    _, summary, runs = study
    for seed in SEEDS:
        for name in ("lora-all-linear", "lora-all-linear-r4"):
            runs[f"{name}/lr-0.003-seed-{seed}.json"] = fake_run("lora", 0.9, seed, 3e-3, 2.5)
    (line,) = findings.rank_reaching_full(summary, runs, resamples=300)
    assert line.startswith("- lora-all-linear: at no rank tried (1, 4, 16) does LoRA reach full's")


def test_findings_lines_change_when_one_run_changes(study):
    folder, summary, runs = study
    before = findings.findings_lines(summary, runs, resamples=300)
    run = runs["full/lr-0.00015-seed-43.json"]
    run["per_example"][0]["nll_sum"] *= 1.5
    assert findings.findings_lines(summary, runs, resamples=300) != before


def test_ranks_scored_on_other_examples_are_not_compared(study):
    _, summary, runs = study
    for seed in SEEDS:
        for item in runs[f"full/lr-0.00015-seed-{seed}.json"]["per_example"]:
            item["id"] = "other-" + item["id"]
    assert findings.rank_reaching_full(summary, runs, resamples=100) == [
        "- lora-all-linear: its runs and full's share no held-out example: not compared."]


def test_one_colour_scheme_for_the_study_and_the_reports_groups(study):
    """A family's ranks are shades of one hue, the lowest rank lightest; the first LoRA family is LoRA's blue, a
    second one another hue, full fine-tuning red; a report group of the same runs takes the same colour."""
    _, summary, _ = study
    colors = plots.method_colors(summary)
    ranks = [colors[name] for name in ("lora-all-linear-r1", "lora-all-linear-r4", "lora-all-linear")]
    assert ranks[-1] == plots.METHOD_COLORS["lora"] and colors["full"] == plots.METHOD_COLORS["full"]
    assert colors["lora-dora"] not in ranks and colors["lora-dora"] != colors["full"]
    lightness = [sum(int(color[i:i + 2], 16) for i in (1, 3, 5)) for color in ranks]
    assert lightness == sorted(lightness, reverse=True) and len(set(lightness)) == 3
    groups = [grouping.Group("lora", (("lora_r", rank),), [], label=f"LoRA (r {rank})") for rank in (1, 4, 16)]
    groups.append(grouping.Group("full", (("lora_r", None),), [], label="Full fine-tuning"))
    assert list(plots.group_colors(groups).values()) == ranks + [colors["full"]]


def test_study_files_are_the_reported_runs_or_every_run_the_summary_names(study):
    folder, summary, runs = study
    reported = discovery.study_files(folder, summary, rates_tried=False)
    assert reported[0] == "base.json" and len(reported) == 1 + 2 * len(METHODS)
    assert set(reported) < set(discovery.study_files(folder, summary)) == set(runs)
    del summary["methods"]["full"]["runs"]
    with pytest.raises(errors.UsageError, match="summary.json has no 'runs' entries"):
        discovery.study_files(folder, summary)
