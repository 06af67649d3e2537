"""The study: rates picked on validation loss, the picked rate at several seeds, resumable; all-linear LoRA."""

import contextlib
import json
import runpy
import shutil
import sys

import pytest

import finetune
import study
from lvf import errors, experiments, scheduling

SMOKE = "tests/study-smoke.yaml"
METHODS = list(experiments.load(SMOKE)["study"]["methods"])

def test_all_linear_targets_every_linear_layer_but_the_output(tmp_path, tiny_llama_dir):
    output = tmp_path / "dry.json"
    finetune.main(["--dry-run", "--model", str(tiny_llama_dir), "--lora-targets", "all-linear", "--lora-r", "16",
                   "--output", str(output)])
    # Tiny Llama, per layer: q, o 32->32; k, v 32->16; gate, up 32->64; down 64->32. LoRA adds r x (in + out).
    per_layer = 16 * (2 * (32 + 32) + 2 * (32 + 16) + 3 * (32 + 64))
    assert json.loads(output.read_text())["trainable_params"] == 2 * per_layer


def run_in_this_process(run, argv, cwd, lock):
    """lvf.scheduling.run_process without the process: `python SCRIPT ARGV` as runpy runs it (the script as
    __main__, sys.argv as the command line gives it) in cwd; its exit status. The study's runs are the scripts'
    command lines all the same, and the scheduler around them (locks, completion, --resume, failures) is the
    study's own; the separate process, its signals and its lock are proven by tests/test_scheduling.py's
    stand-ins. Each process would cost an import of torch and transformers, ten times over."""
    assert not run.launcher  # the smoke study launches no run through accelerate
    with contextlib.chdir(cwd), pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [run.script, *argv])
        try:
            runpy.run_path(run.script, run_name="__main__")
        except SystemExit as stopped:
            return stopped.code if isinstance(stopped.code, int) else 1
    return 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, tiny_llama_dir, records_path):
    folder = tmp_path_factory.mktemp("study")
    argv = ["--config", SMOKE, "--study-dir", str(folder / "results"), "--outputs-dir", str(folder / "outputs"),
            "--", "--model", str(tiny_llama_dir), "--dataset", str(records_path)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scheduling, "run_process", run_in_this_process)
        study.main(argv)
        yield folder, argv  # the patch holds for the tests that run the study again


@pytest.mark.slow  # reads the smoke study (the first to ask runs it)
def test_smoke_study_picks_each_rate_on_validation_and_trains_it_at_every_seed(smoke):
    folder, _ = smoke
    summary = json.loads((folder / "results" / "summary.json").read_text())
    base = json.loads((folder / "results" / "base.json").read_text())
    assert set(summary["methods"]) == {*METHODS, "lora-all-linear-r4"}
    for method, found in summary["methods"].items():
        if method == "lora-all-linear-r4":
            continue
        sweep = found["learning_rates"]
        assert len(sweep) == 2
        best = min(sweep, key=lambda rate: sweep[rate]["validation_loss"])
        assert study.rate_name(found["picked_learning_rate"]) == best
        assert [run["seed"] for run in found["runs"]] == [42, 43]
        for run in found["runs"]:
            result = json.loads((folder / "results" / method / f"lr-{best}-seed-{run['seed']}.json").read_text())
            assert result["config"]["learning_rate"] == found["picked_learning_rate"]
            assert result["log_history"] and any("eval_loss" in entry for entry in result["log_history"])
            assert result["validation_tokens"] > 0 and result["general_perplexity"] > 0
            # Paired with the base run on every example it scored (of 6 sampled, those that fit 128 tokens).
            assert run["improvement_over_base"]["examples"] == base["eval_examples"] == result["eval_examples"]
            assert run["forgetting"]["examples"] == 2
            assert not list((folder / "outputs" / method / f"lr-{best}-seed-{run['seed']}").glob("checkpoint-*"))
    lora = json.loads(next((folder / "results" / "lora-all-linear").glob("*.json")).read_text())
    assert lora["config"]["lora_targets"] == "all-linear"


@pytest.mark.slow  # reads the smoke study (the first to ask runs it)
def test_the_rank_axis_trains_the_picked_rate_at_every_seed_and_checks_its_neighbour(smoke):
    folder, _ = smoke
    summary = json.loads((folder / "results" / "summary.json").read_text())
    family, ranked = summary["methods"]["lora-all-linear"], summary["methods"]["lora-all-linear-r4"]
    picked = family["picked_learning_rate"]
    assert (ranked["rank"], ranked["family"], ranked["picked_from"]) == (4, "lora-all-linear",
                                                                         "lora-all-linear (rank axis)")
    assert ranked["picked_learning_rate"] == picked and [run["seed"] for run in ranked["runs"]] == [42, 43]
    # r=4 is the axis's smallest rank: the grid's other rate is tried there too, at the first seed.
    assert set(ranked["learning_rates"]) == set(family["learning_rates"])
    best = min(ranked["learning_rates"], key=lambda rate: ranked["learning_rates"][rate]["validation_loss"])
    assert ranked["rate_check"] == {"best_learning_rate": float(best), "picked_is_best": float(best) == picked}
    trained = json.loads((folder / "results" / ranked["runs"][1]["file"]).read_text())
    assert trained["config"]["lora_r"] == 4 and trained["config"]["lora_targets"] == "all-linear"
    assert trained["trainable_params"] * 4 == json.loads(
        (folder / "results" / family["runs"][0]["file"]).read_text())["trainable_params"]


@pytest.mark.slow  # reads the smoke study (the first to ask runs it)
def test_rerun_skips_finished_runs_and_redoes_only_a_missing_one(smoke):
    folder, argv = smoke
    results = sorted((folder / "results").rglob("lr-*.json"))
    written = {path: path.stat().st_mtime_ns for path in results}
    missing = folder / "results" / "full" / "lr-0.001-seed-42.json"
    kept = json.loads(missing.read_text())
    missing.unlink()
    study.main(argv)
    assert {path: path.stat().st_mtime_ns for path in results if path != missing} == {
        path: when for path, when in written.items() if path != missing}  # nothing else ran again
    again = json.loads(missing.read_text())
    assert again["resumed_from"] is None and again["perplexity"] == pytest.approx(kept["perplexity"], rel=1e-6)


@pytest.mark.slow  # reads the smoke study (the first to ask runs it)
def test_the_full_models_of_unpicked_rates_are_not_kept(smoke):
    folder, _ = smoke
    summary = json.loads((folder / "results" / "summary.json").read_text())
    picked = study.rate_name(summary["methods"]["full"]["picked_learning_rate"])
    for rate in summary["methods"]["full"]["learning_rates"]:
        final = folder / "outputs" / "full" / f"lr-{rate}-seed-42" / "final"
        assert final.is_dir() == (rate == picked)


@pytest.mark.slow  # reads the smoke study (the first to ask runs it)
def test_a_study_of_some_methods_writes_the_summary_of_every_methods_finished_runs(smoke, tmp_path):
    # Two study processes, each given some --methods, share one summary.json: whichever writes it last, it holds
    # every method whose runs are finished, not only its own.
    folder, argv = smoke
    shutil.copytree(folder / "results", tmp_path / "results")
    whole = json.loads((folder / "results" / "summary.json").read_text())
    study.main(["--config", SMOKE, "--methods", "full", "--study-dir", str(tmp_path / "results"),
                "--outputs-dir", str(tmp_path / "outputs"), *argv[argv.index("--"):]])
    written = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert set(written["methods"]) == set(whole["methods"]) == {*METHODS, "lora-all-linear-r4"}
    for name, method in whole["methods"].items():
        assert written["methods"][name]["picked_learning_rate"] == method["picked_learning_rate"]
        assert [run["perplexity"] for run in written["methods"][name]["runs"]] == [
            run["perplexity"] for run in method["runs"]]


@pytest.mark.slow  # reads the smoke study (the first to ask runs it)
def test_report_shows_the_study_at_each_methods_picked_rate_in_its_own_block(smoke, tmp_path):
    import report
    from lvf import docs_blocks

    folder, _ = smoke
    summary = json.loads((folder / "results" / "summary.json").read_text())
    readme = tmp_path / "README.md"
    demo_block = "<!-- experiment:demo:start -->\nthe demo's table\n<!-- experiment:demo:end -->"
    start, end = docs_blocks.experiment_markers("results")
    readme.write_text(f"# x\n{demo_block}\n\n{start}\n{end}\n")
    report.main([str(folder / "results"), "--readme", str(readme), "--resamples", "50"])
    text = readme.read_text()
    assert demo_block in text  # the demo's block is left alone
    block = text.split(start)[1].split(end)[0]
    rows = [line for line in block.splitlines() if line.startswith("| ") and "`" in line]
    assert len(rows) == 2 + len(METHODS)  # the base model, one group per method at its picked rate, and rank 4
    assert all("| 42, 43 |" in row for row in rows[1:])
    for method, found in summary["methods"].items():
        line = next(line for line in block.splitlines() if line.startswith(f"| {method} |"))
        assert line.endswith(f"| {found['picked_learning_rate']:g} |")
        assert all(rate in line for rate in found["learning_rates"])
    assert "forgetting" in block and (folder / "results" / "learning_vs_forgetting.png").is_file()


@pytest.mark.slow  # reads the smoke study (the first to ask runs it)
def test_a_json_made_with_other_flags_is_not_mixed_in(smoke):
    folder, argv = smoke
    with pytest.raises(errors.UsageError, match="other flags.*max_length"):
        study.main([*argv, "--max-length", "96"])


@pytest.mark.parametrize("flag, expected", [([], []), (["--report-to", "tensorboard"], ["tensorboard"])])
def test_report_to_reaches_the_trainer_and_is_off_by_default(tmp_path, flag, expected):
    from lvf import settings, training

    args = finetune.parse_args(["--output-dir", str(tmp_path), *flag])
    arguments = training.training_arguments(args, settings.training_runtime(args, "lora", "adamw_torch"), 8)
    assert arguments.report_to == expected
