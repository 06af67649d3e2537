"""report.py on fixture results: groups by method and variant, refusal of runs on different examples, the
two-level bootstrap and its verdicts, --check, and the plots."""

import json
import shutil
import subprocess

import numpy as np
import pytest

import report
from lvf import discovery, errors, plots, statistics, tables
from lvf import groups as grouping

README = "# Title\n\n<!-- experiment:results:start -->\nold\n<!-- experiment:results:end -->\n\nafter\n"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def per_example_rows(nll, tokens):
    return [{"id": f"id{i}", "nll_sum": float(n), "tokens": int(t)} for i, (n, t) in
            enumerate(zip(nll, tokens, strict=True))]


def fake_run(method, nll_scale, seed=42, examples=80, config=None, **extra):
    """A results JSON: the same 80 examples (ids and token counts) for every run; the NLL scaled per run."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(10, 60, size=examples)
    nll = tokens * rng.uniform(1.5, 2.5, size=examples) * nll_scale
    loss = float(nll.sum() / tokens.sum())
    run = {
        "method": method, "model": "smollm2-135m", "dataset": "data/demo.jsonl", "eval_file": None,
        "perplexity": float(np.exp(loss)), "perplexity_ci95": [float(np.exp(loss)) * 0.9, float(np.exp(loss)) * 1.1],
        "eval_loss": loss, "eval_tokens": int(tokens.sum()), "eval_examples": examples,
        "seed_style_perplexity": 1234.5, "trainable_params": None, "total_params": 134_515_008,
        "trainable_percent": None, "peak_memory_bytes": 3 * 2**30, "memory_kind": "cpu_peak_rss",
        "train_seconds": None, "train_tokens_per_second": None, "artifact_bytes": None, "device": "cpu",
        "created_at": "2026-11-28T12:00:00+00:00", "git_commit": "abcdef1234", "dry_run": False, "seed": seed,
        "config": {"learning_rate": 1e-3, "seed": seed, "split_seed": 42, **(config or {})},
        "per_example": per_example_rows(nll, tokens),
    }
    run.update(extra)
    return run


TRAINING = {"train_seconds": 420.0, "train_step_seconds": 300.0, "train_tokens_per_second": 150.0,
            "train_peak_memory_bytes": 2 * 2**30,
            "phase_memory_kind": "cpu_peak_rss_since_reset"}
FULL_BREAKDOWN = {"weights_by_dtype": {"float32": 2**29}, "gradients": 2**29, "optimizer_states": 2**30, "other": 0}
LORA = {"trainable_params": 1_843_200, "trainable_percent": 1.35, "artifact_bytes": 7 * 2**20, **TRAINING}
FULL = {"trainable_params": 134_515_008, "trainable_percent": 100.0, "artifact_bytes": 513 * 2**20,
        "train_memory_breakdown": FULL_BREAKDOWN, **TRAINING}


def write_runs(folder, runs):
    folder.mkdir(parents=True, exist_ok=True)
    for name, run in runs.items():
        (folder / f"{name}.json").write_text(json.dumps(run))
    return folder


@pytest.fixture
def results_dir(tmp_path):
    """One run each, as the committed demo results: base, LoRA and full (same NLL), and a dry run."""
    lora = fake_run("lora", 0.7, **LORA)
    return write_runs(tmp_path / "results", {
        "base": fake_run("base", 1.0), "lora": lora, "full": fake_run("full", 0.7, **FULL),
        "dry": {**lora, "dry_run": True, "perplexity": None},
    })


def at(results_dir):
    """report.py's flags for an experiment whose results folder is results_dir (the README block named after it)."""
    return ["--results-root", str(results_dir.parent)]


def readme_beside(results_dir):
    readme = results_dir.parent / "README.md"
    readme.write_text(README)
    return readme


def render(tmp_path, *argv):
    """Runs report.py on a fresh README and returns the block's table rows (ad hoc files: the printed table)."""
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert report.main([*argv, "--readme", str(readme), "--resamples", "300"]) == 0
    return [line for line in readme.read_text().splitlines() if line.startswith("| ")], readme.read_text()


def row(rows, start):
    return next(line for line in rows if line.startswith(start))


def test_table_check_and_plot(tmp_path, results_dir):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    argv = [*at(results_dir), "--readme", str(readme)]
    assert report.main([*argv, "--check"]) == 1  # "old" is stale
    assert report.main(argv) == 0
    text = readme.read_text()
    assert text.startswith("# Title") and text.endswith("after\n") and "\nold\n" not in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[2].startswith("| Zero-shot (base) |") and rows[4].startswith("| Full fine-tuning |")
    assert "1.84 M (1.35%)" in text and "7.0 MiB" in text and "513.0 MiB" in text
    assert "| 5.0 min | 150.0 |" in rows[4] and "7.0 min" not in text  # the steps' time, not train()'s wall time
    assert "| training steps' time | train tokens/s (steps) |" in rows[0]  # their total, not one step's time
    assert "| 1,234 |" in text  # the write-up's metric column
    assert "+0.000" in row(rows, "| LoRA − Full fine-tuning")  # identical per-example NLL
    assert "| 2.0 GiB = 512.0 MiB + 512.0 MiB + 1.0 GiB + 0 B |" in rows[4]  # full: training peak, its parts
    assert "| 2.0 GiB |" in rows[3]  # LoRA without a breakdown: the peak alone
    assert report.main([*argv, "--check"]) == 0
    for name in ("comparison.png", "memory-breakdown.png"):
        png = results_dir / name
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000


def test_check_fails_when_a_result_changes(tmp_path, results_dir):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    argv = [*at(results_dir), "--readme", str(readme)]
    report.main(argv)
    changed = json.loads((results_dir / "full.json").read_text())
    changed["peak_memory_bytes"] *= 2
    (results_dir / "full.json").write_text(json.dumps(changed))
    assert report.main([*argv, "--check"]) == 1


def test_one_run_each_says_seed_variance_is_not_measured_and_never_significant(tmp_path, results_dir):
    rows, text = render(tmp_path, *at(results_dir))
    # The tuned runs scale NLL by 0.7: their intervals are far from 0, and still no verdict is drawn.
    lora_vs_base = row(rows, "| LoRA − Zero-shot")
    assert lora_vs_base.endswith("| 80 | one run each: seed variance not measured |")
    assert "significant" not in text


def test_runs_of_one_method_with_different_variants_are_kept_apart(tmp_path):
    folder = write_runs(tmp_path / "results", {
        "base": fake_run("base", 1.0),
        "lora": fake_run("lora", 0.7, config={"lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}, **LORA),
        "lora-all": fake_run("lora", 0.6, config={"lora_targets": "all-linear"}, **LORA),
        "lora-lr": fake_run("lora", 0.8, config={"lora_targets": "all-linear", "learning_rate": 3e-4}, **LORA),
    })
    rows, _ = render(tmp_path, *at(folder))
    labels = [line.split(" | ")[0] for line in rows[2:6]]
    assert labels[0] == "| Zero-shot (base)" and set(labels[1:]) == {
        "| LoRA (lr 0.0003, targets all-linear)", "| LoRA (lr 0.001, targets all-linear)",
        "| LoRA (lr 0.001, targets q_proj+k_proj+v_proj+o_proj)"}
    assert row(rows, "| LoRA (lr 0.001, targets all-linear) − Zero-shot")


def test_ranks_are_listed_by_value_not_as_text(tmp_path):
    runs = {"base": fake_run("base", 1.0)}
    runs |= {f"lora-r{rank}": fake_run("lora", 0.7, config={"lora_r": rank}, **LORA) for rank in (64, 16, 4, 1)}
    rows, _ = render(tmp_path, *at(write_runs(tmp_path / "results", runs)))
    assert [line.split(" | ")[0] for line in rows[3:7]] == ["| LoRA (r 1)", "| LoRA (r 4)", "| LoRA (r 16)",
                                                             "| LoRA (r 64)"]


def test_seeds_of_one_variant_form_one_group_with_mean_and_sd(tmp_path):
    runs = {"base": fake_run("base", 1.0)}
    runs |= {f"lora-{seed}": fake_run("lora", scale, seed=seed, **LORA)
             for seed, scale in ((43, 0.68), (42, 0.7), (44, 0.72))}
    runs |= {f"full-{seed}": fake_run("full", 0.8, seed=seed, **FULL) for seed in (42, 43)}
    rows, text = render(tmp_path, *at(write_runs(tmp_path / "results", runs)))
    lora = row(rows, "| LoRA |")
    assert "| 42, 43, 44 |" in lora and " ± " in lora
    assert row(rows, "| LoRA − Zero-shot").endswith("LoRA is lower (significant) |")
    assert row(rows, "| LoRA − Full fine-tuning").endswith("LoRA is lower (significant) |")
    assert text.count("| LoRA |") == 1  # no second LoRA row: seeds are not variants


def test_one_trained_run_on_one_side_is_named(tmp_path):
    runs = {f"lora-{seed}": fake_run("lora", 0.7 + seed / 1000, seed=seed, **LORA) for seed in (42, 43, 44)}
    runs["full"] = fake_run("full", 0.8, **FULL)
    rows, text = render(tmp_path, *at(write_runs(tmp_path / "results", runs)))
    assert row(rows, "| LoRA − Full").endswith("| one run of Full fine-tuning: seed variance not measured |")
    assert "significant" not in text


def test_history_is_left_out_and_given_files_are_read(tmp_path, results_dir, capsys):
    write_runs(results_dir / "history", {"lora-20261127": fake_run("lora", 0.9, seed=7, **LORA)})
    rows, _ = render(tmp_path, *at(results_dir))
    assert "| 42 |" in row(rows, "| LoRA |")  # the kept earlier version is not a second seed
    capsys.readouterr()
    rows, text = render(tmp_path, str(results_dir / "base.json"), str(results_dir / "lora.json"))
    assert text == README  # files named: an ad hoc table, printed, no README block touched
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in printed] == ["| method", "| ---", "| Zero-shot (base)", "| LoRA",
                                                         "| comparison", "| ---", "| LoRA − Zero-shot (base)"]


def base_on_another_file():
    other = fake_run("base", 1.0, dataset=None, eval_file="held_out.jsonl")
    for item in other["per_example"]:
        item["id"] = "held-" + item["id"]
    return other


def test_runs_on_different_examples_are_refused_naming_them(tmp_path, results_dir, capsys):
    (results_dir / "base.json").write_text(json.dumps(base_on_another_file()))
    readme = tmp_path / "README.md"
    readme.write_text(README)
    with pytest.raises(SystemExit) as stopped:
        errors.main_guard(lambda: report.main([*at(results_dir), "--readme", str(readme)]))
    assert stopped.value.code == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and message.startswith("error: runs evaluated on different examples")
    assert "results/lora.json vs " in message and "results/base.json (80 vs 80 examples, 0 shared)" in message
    assert readme.read_text() == README


def test_different_token_counts_are_refused(results_dir):
    full = json.loads((results_dir / "full.json").read_text())
    full["per_example"][3]["tokens"] += 1
    (results_dir / "full.json").write_text(json.dumps(full))
    with pytest.raises(errors.UsageError, match="full.json .same 80 examples, token counts differ on 1"):
        report.main([*at(results_dir), "--readme", str(readme_beside(results_dir))])


def test_intersection_flag_compares_shared_examples_and_says_so(tmp_path, results_dir):
    full = json.loads((results_dir / "full.json").read_text())
    full["per_example"] = full["per_example"][:50]
    (results_dir / "full.json").write_text(json.dumps(full))
    with pytest.raises(errors.UsageError, match="full.json"):
        report.main([*at(results_dir), "--readme", str(readme_beside(results_dir))])
    rows, text = render(tmp_path, *at(results_dir), "--allow-intersection")
    assert "| 50 of 80 (shared only) |" in row(rows, "| LoRA − Full fine-tuning")
    assert "| 80 |" in row(rows, "| LoRA − Zero-shot")
    assert "compared on the shared ones only (--allow-intersection): LoRA and Full fine-tuning on 50" in text


def test_runs_sharing_no_example_are_named_not_dropped(tmp_path, results_dir):
    (results_dir / "base.json").write_text(json.dumps(base_on_another_file()))
    rows, _ = render(tmp_path, *at(results_dir), "--allow-intersection")
    assert row(rows, "| LoRA − Zero-shot").endswith(
        "| – | 0 of 80 (shared only) | not compared: evaluated on different examples (none shared) |")


def seed_group(method, seed_scales, nll, tokens):
    runs = [fake_run(method, 1.0, seed=42 + index, **LORA) for index in range(len(seed_scales))]
    for run, scale in zip(runs, seed_scales, strict=True):
        run["per_example"] = per_example_rows(nll * scale, tokens)
    return grouping.Group(method, (), runs, label=method)


def test_two_level_interval_widens_with_seed_variance():
    """Two groups of 3 seeds with the same per-example mean NLL: one whose seeds agree, one whose seeds spread.
    An interval over examples alone is the same for both; resampling seeds widens the spread one's."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(10, 60, size=200)
    nll = tokens * rng.uniform(1.5, 2.5, size=200)
    base = seed_group("base", [1.2], nll, tokens)
    steady = seed_group("lora", [1.0, 1.0, 1.0], nll, tokens)
    spread = seed_group("lora", [0.9, 1.0, 1.1], nll, tokens)
    width = {}
    for name, group in (("steady", steady), ("spread", spread)):
        result = statistics.compare(group.runs, base.runs, seed=0, resamples=2000)
        width[name] = result["ci95"][1] - result["ci95"][0]
    assert width["spread"] > 1.5 * width["steady"]


def test_tradeoff_and_validation_curves_are_drawn(tmp_path, results_dir):
    history = [{"step": step, "epoch": step / 8, "eval_loss": 2.5 - step / 20} for step in (4, 8, 12, 16)]
    rng = np.random.default_rng(2)
    for name, forgetting in (("base", 1.0), ("lora", 1.02), ("full", 1.1)):
        run = json.loads((results_dir / f"{name}.json").read_text())
        run["general_per_example"] = per_example_rows(rng.uniform(2, 3, 30) * 20 * forgetting, [20] * 30)
        if name != "base":
            run |= {"log_history": history, "train_tokens": 4000, "optimizer_steps": 16}
        (results_dir / f"{name}.json").write_text(json.dumps(run))
    rows, text = render(tmp_path, *at(results_dir))
    assert "forgetting: general-text perplexity difference (95% CI)" in rows[5]
    assert row(rows, "| Full fine-tuning − Zero-shot").split(" | ")[-1].startswith("+")  # full forgot more
    for name in ("learning_vs_forgetting.png", "validation_curves.png"):
        assert (results_dir / name).read_bytes()[:8] == PNG_MAGIC
    assert plots.validation_by_tokens(json.loads((results_dir / "lora.json").read_text()))[0] == (1000.0, 2.3)


def test_general_text_on_different_examples_is_refused(results_dir):
    for name, prefix in (("lora", "wiki"), ("full", "other")):
        run = json.loads((results_dir / f"{name}.json").read_text())
        run["general_per_example"] = [{"id": f"{prefix}{i}", "nll_sum": 40.0, "tokens": 20} for i in range(5)]
        (results_dir / f"{name}.json").write_text(json.dumps(run))
    with pytest.raises(errors.UsageError, match="full.json .general text: 5 vs 5 examples, 0 shared"):
        report.main([*at(results_dir), "--readme", str(readme_beside(results_dir))])


def git(repo, *args):
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)


def test_check_reads_the_committed_results_not_a_local_run(tmp_path, results_dir, monkeypatch, capsys):
    """A user's run rewrites results/*.json in the working tree: make test must still pass, and say why."""
    repo = tmp_path / "repo"
    shutil.copytree(results_dir, repo / "results")
    # and an experiment not run yet: --check reads a copy of results/, but names the folder as the README does
    (repo / "README.md").write_text(README + "<!-- experiment:gpu:start -->\n<!-- experiment:gpu:end -->\n")
    argv = [*at(repo / "results"), "--readme", str(repo / "README.md")]
    monkeypatch.setattr(discovery, "PROJECT_DIR", repo)  # how the README names the results folder
    report.main(argv)
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "demo")

    local = json.loads((repo / "results" / "full.json").read_text())
    local["peak_memory_bytes"] *= 2  # a local run, not committed
    (repo / "results" / "full.json").write_text(json.dumps(local))
    assert report.main([*argv, "--check"]) == 0
    assert "a local run since the last commit" in capsys.readouterr().err

    git(repo, "commit", "-qam", "results changed, table not regenerated")
    assert report.main([*argv, "--check"]) == 1


def test_each_experiment_is_its_own_block_and_folder(tmp_path, results_dir):
    # An experiment's block is built from its own folder only: another experiment's runs (another recipe, other
    # examples) are neither pooled with them nor refused over.
    other = tmp_path / "other"
    write_runs(other, {"lora": {**base_on_another_file(), "method": "lora", **LORA}})
    readme = tmp_path / "README.md"
    readme.write_text(README + "<!-- experiment:other:start -->\n<!-- experiment:other:end -->\n"
                      "<!-- experiment:gpu:start -->\n<!-- experiment:gpu:end -->\n")
    assert report.main([*at(results_dir), "--readme", str(readme), "--resamples", "100"]) == 0
    text = readme.read_text()
    mine, rest = text.split("<!-- experiment:other:start -->")
    assert "| 42 |" in row(mine.splitlines(), "| LoRA |") and "held_out.jsonl" not in mine
    assert "`held_out.jsonl`" in rest.split("<!-- experiment:gpu:start -->")[0]
    assert "_Not run yet: no results in" in rest.split("<!-- experiment:gpu:start -->")[1]
    assert (results_dir / "report.md").read_text().startswith("# results\n")
    assert (other / "comparison.png").is_file() and not (tmp_path / "gpu").exists()


def test_a_group_whose_runs_share_no_example_is_shown_not_crashed(tmp_path, results_dir):
    other_seed = base_on_another_file()
    write_runs(results_dir, {"lora-seed-43": {**other_seed, "method": "lora", "seed": 43,
                                              "config": {"learning_rate": 1e-3, "seed": 43, "split_seed": 42},
                                              "eval_file": None, "dataset": "data/demo.jsonl", **LORA}})
    rows, _ = render(tmp_path, *at(results_dir), "--allow-intersection")
    assert "| – (its runs share no example) |" in row(rows, "| LoRA |")


def fake_study(results_dir):
    """A study.py folder: base, and one method with two rates tried, the lower picked, at two seeds."""
    folder = results_dir.parent / "study"
    runs = {"base": fake_run("base", 1.0)}
    for rate, seeds, scale in ((1e-3, (42, 43), 0.7), (3e-3, (42,), 0.8)):
        for seed in seeds:
            runs[f"full/lr-{rate:g}-seed-{seed}"] = fake_run("full", scale + 0.01 * (seed - 42), seed=seed,
                                                               config={"learning_rate": rate}, **FULL)
    (folder / "full").mkdir(parents=True)
    write_runs(folder, runs)
    summary = {"base": {"file": "base.json"}, "methods": {"full": {
        "learning_rates": {"0.001": {"validation_loss": 2.1, "file": "full/lr-0.001-seed-42.json"},
                           "0.003": {"validation_loss": 2.3, "file": "full/lr-0.003-seed-42.json"}},
        "picked_learning_rate": 1e-3,
        "runs": [{"seed": seed, "file": f"full/lr-0.001-seed-{seed}.json"} for seed in (42, 43)]}}}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_a_study_is_reported_in_its_own_block_and_checked(tmp_path, results_dir):
    study = fake_study(results_dir)
    readme = tmp_path / "README.md"
    readme.write_text(README + "<!-- experiment:study:start -->\n<!-- experiment:study:end -->\n")
    argv = [*at(results_dir), "--readme", str(readme), "--resamples", "100"]
    report.main(argv)
    text = readme.read_text()
    block = text.split("<!-- experiment:study:start -->")[1]
    assert "| Full fine-tuning | `smollm2-135m` | `data/demo.jsonl` | 42, 43 |" in block  # the picked rate only
    assert "| full | **0.001: 2.1000**, 0.003: 2.3000 | 0.001 |" in block
    assert text.split("<!-- experiment:study:start -->")[0].count("| Full fine-tuning |") == 1  # its own block
    assert report.main([*argv, "--check"]) == 0
    changed = json.loads((study / "full" / "lr-0.001-seed-43.json").read_text())
    changed["train_step_seconds"] *= 2  # a figure the table shows
    (study / "full" / "lr-0.001-seed-43.json").write_text(json.dumps(changed))
    assert report.main([*argv, "--check"]) == 1


def test_the_caption_says_the_scoring_precision_and_full_fine_tunings_recipe():
    def run(method, **runtime):
        return {"model": "m", "dataset": "d", "method": method, "created_at": "2026-12-07T00:00:00",
                "git_commit": "abcdef0", "machine": None, "device": "cuda", "eval_dtype": "bfloat16",
                "runtime": runtime}

    caption = tables.caption([run("base"), run("full", optimizer_in_backward=True, max_grad_norm=0.0)])
    assert "; scored in bfloat16; full fine-tuning stepped in backward, no clipping;" in caption
    after = run("full", optimizer_in_backward=False, max_grad_norm=1.0)
    assert "full fine-tuning stepped after backward, gradients clipped at norm 1.0;" in tables.caption([after])
    # Older results: eval_dtype only in the runtime, clipping implied by the step (1.0 exactly after backward).
    older = {**run("full", optimizer_in_backward=False, eval_dtype="float32"), "eval_dtype": None}
    assert "scored in float32; full fine-tuning stepped after backward, gradients clipped at norm 1.0;" in (
        tables.caption([older]))


def test_the_sessions_trained_runs_are_tabled_paired_and_checked(tmp_path, trained_run):
    # Real results (tests/conftest.py, TRAINED_RUNS) rather than made-up ones: every method gets its row, and each
    # difference is paired over every example the runs scored.
    results_dir = write_runs(tmp_path / "results", {method: trained_run(method).results
                                                    for method in ("base", "lora", "qlora", "full")})
    readme = readme_beside(results_dir)
    argv = [*at(results_dir), "--readme", str(readme), "--resamples", "100"]
    assert report.main(argv) == 0
    rows = [line for line in readme.read_text().splitlines() if line.startswith("| ")]
    for label in ("| Zero-shot (base) |", "| LoRA |", "| QLoRA |", "| Full fine-tuning |"):
        assert [line for line in rows if line.startswith(label)], label
    examples = trained_run("base").results["eval_examples"]
    for method in ("LoRA", "QLoRA", "Full fine-tuning"):
        assert f"| {examples} | one run each: seed variance not measured |" in row(rows, f"| {method} − Zero-shot")
    assert report.main([*argv, "--check"]) == 0
