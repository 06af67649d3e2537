"""Experiments as files: every shipped file parses for every script it addresses, a flag overrides its file, the
results record the file, and each experiment writes into its own folder (never into a committed demo's)."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

import evaluate_base_model
import finetune
import full_finetune
import study
from lvf import errors, experiments, full, lora, settings

PROJECT_DIR = Path(__file__).resolve().parents[1]
SHIPPED = sorted((PROJECT_DIR / "experiments").glob("*.yaml"))
SCRIPTS = (evaluate_base_model, finetune, full_finetune)
GPU = PROJECT_DIR / "experiments" / "llama3-8b-dolly.yaml"


def as_dict(parsed):
    return {key: value for key, value in settings.as_dict(parsed).items() if key != "config"}


def test_the_shipped_experiments_are_the_gpu_run_the_demo_and_the_studies():
    names = {experiments.experiment_name(path) for path in SHIPPED}
    assert {"llama3-8b-dolly", "demo-cpu", "study-cpu", "study-llama3-8b-dolly"} <= names
    assert len(names) == len(SHIPPED)  # one results folder per file


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: path.stem)
def test_each_shipped_file_parses_for_every_script(path):
    contents = experiments.load(path)
    for module in SCRIPTS:
        parsed = module.parse_args(["--config", str(path)])
        assert parsed.config == str(path)
        for key, (value, _) in experiments.flag_values(path, ("shared",)).items():
            assert getattr(parsed, key) == value, key
    if "study" in contents:
        planned = study.parse_args(["--config", str(path), "--dry-run"])
        assert planned.methods and planned.seeds
        for run in study.sweep_runs(planned):  # each run's command is one its script accepts
            study.run_settings(run)


def test_a_flag_overrides_its_file():
    demo = PROJECT_DIR / "experiments" / "demo-cpu.yaml"
    from_file = finetune.parse_args(["--config", str(demo)])
    assert from_file.learning_rate == 1e-3 and from_file.max_length == 512 and from_file.model == "smollm2-135m"
    overridden = finetune.parse_args(["--config", str(demo), "--learning-rate", "3e-3", "--max-length", "64"])
    assert overridden.learning_rate == 3e-3 and overridden.max_length == 64
    assert overridden.max_train_samples == from_file.max_train_samples == 128  # the rest still from the file
    # Each script reads its own section: full fine-tuning's rate is not LoRA's.
    assert full_finetune.parse_args(["--config", str(demo)]).learning_rate == 5e-5


def test_the_gpu_file_is_the_scripts_defaults_and_repeats_none_of_them():
    # The file is the defaults plus the forgetting benchmarks it lists.
    benchmarks = ["--benchmarks", "hellaswag,arc_challenge,winogrande", "--benchmark-limit", "1000"]
    for module in SCRIPTS:
        assert as_dict(module.parse_args(["--config", str(GPU)])) == as_dict(module.parse_args(benchmarks))
    # Each default lives in one place (lvf/settings.py, lvf/defaults.py): the file sets the benchmarks only.
    set_by_the_file = experiments.flag_values(GPU, ("shared", "training", *experiments.SCRIPT_SECTIONS))
    assert {key: value for key, (value, _) in set_by_the_file.items()} == {
        "benchmarks": "hellaswag,arc_challenge,winogrande", "benchmark_limit": 1000}


def write(tmp_path, text):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    experiments._read.cache_clear()
    return str(path)


@pytest.mark.parametrize("text, message", [
    ("shared:\n  max_lenght: 12\n", r"shared.max_lenght is not a flag of"),
    ("shared:\n  max_length: 0\n", r"shared.max_length: must be a positive integer"),
    ("finetune:\n  quantize: 8bit\n", r"finetune.quantize: '8bit' is not one of none, 4bit"),
    ("shared:\n  seed_style_metric: 3\n", r"shared.seed_style_metric: expected true or false"),
    ("sharde:\n  max_length: 12\n", r"unknown section 'sharde'"),
    ("shared: [1, 2\n", r"not valid YAML"),
])
def test_a_bad_file_stops_with_one_line_naming_it(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(errors.UsageError, match=message) as stopped:
        finetune.parse_args(["--config", path])
    assert str(stopped.value).startswith(f"--config {path}") and "\n" not in str(stopped.value)


def test_the_results_record_the_file_and_go_to_its_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(settings, "PROJECT_DIR", tmp_path)
    path = write(tmp_path, "name: my-exp\nshared:\n  model: meta-llama/Meta-Llama-3-8B-Instruct\n"
                           "finetune:\n  lora_r: 8\n")
    output = tmp_path / "dry.json"
    finetune.main(["--config", path, "--dry-run", "--output", str(output)])
    record = json.loads(output.read_text())
    assert record["experiment"] == "my-exp" and record["config"]["lora_r"] == 8
    assert record["config_file"] == {"file": path, "name": "my-exp", "contents": experiments.load(path)}
    assert record["trainable_params"] == 13_631_488 // 2
    _, runtime = lora.resolve_runtime(finetune.parse_args(["--config", path]))
    assert runtime.output == tmp_path / "results" / "my-exp" / "lora.json"
    assert runtime.output_dir == tmp_path / "outputs" / "my-exp" / "lora"


def tracked_files():
    listing = subprocess.run(["git", "-C", str(PROJECT_DIR), "ls-files"], capture_output=True, text=True)
    if listing.returncode != 0:
        pytest.skip("not a git checkout")
    return {(PROJECT_DIR / name).resolve() for name in listing.stdout.splitlines()}


def test_the_8b_defaults_write_outside_the_committed_demo_and_over_no_tracked_file():
    tracked = tracked_files()
    demo_folders = [PROJECT_DIR / "results" / name for name in ("demo-cpu", "study-cpu")]
    resolved = {"base": lambda args: settings.evaluation_runtime(args, "base"),
                "lora": lambda args: lora.resolve_runtime(args)[1], "full": lambda args: full.resolve_runtime(args)[1]}
    for module, method in ((evaluate_base_model, "base"), (finetune, "lora"), (full_finetune, "full")):
        args = module.parse_args([])
        runtime = resolved[method](args)
        assert runtime.output.parent == PROJECT_DIR / "results" / "Meta-Llama-3-8B-Instruct--databricks-dolly-15k"
        for written in (runtime.output, runtime.output_dir):
            if written is not None:
                assert not any(Path(written).resolve().is_relative_to(folder.resolve()) for folder in demo_folders)
                assert Path(written).resolve() not in tracked
        with_file = module.parse_args(["--config", str(GPU)])
        runtime = resolved[method](with_file)
        assert runtime.output == PROJECT_DIR / "results" / "llama3-8b-dolly" / f"{method}.json"
        assert runtime.output.resolve() not in tracked


def test_a_fresh_gpu_study_plans_without_stopping(capsys):
    study.main(["--config", "experiments/study-llama3-8b-dolly.yaml", "--dry-run"])
    out = capsys.readouterr().out
    assert "stage 1: 12 runs" in out and "results/study-llama3-8b-dolly/base.json" in out
    assert out.count("python finetune.py --config experiments/study-llama3-8b-dolly.yaml") == 8


def test_make_study_on_a_fresh_clone_reuses_the_committed_runs_instead_of_stopping(tmp_path):
    # The committed runs were written elsewhere (another clone, the folder before it moved): where a run wrote is
    # not what it computed, so they count as done, and `make study` trains nothing again. The copy makes "elsewhere"
    # true here too.
    shutil.copytree(PROJECT_DIR / "results" / "study-cpu", tmp_path / "study-cpu")
    planned = study.parse_args(["--config", "experiments/study-cpu.yaml", "--study-dir", str(tmp_path / "study-cpu"),
                                "--outputs-dir", str(tmp_path / "outputs")])
    summary = json.loads((tmp_path / "study-cpu" / "summary.json").read_text())
    picked = {method.name: summary["methods"][method.name]["picked_learning_rate"] for method in planned.methods}
    runs = study.sweep_runs(planned) + study.second_stage_runs(planned, picked)
    assert all(study.complete_results(run) is not None for run in runs)
    recorded = json.loads(Path(runs[1].results_path).read_text())["config"]["output"]
    assert recorded != runs[1].results_path


def test_a_diverged_rate_is_never_picked():
    sweep = {1e-3: {"validation_loss": float("nan")}, 3e-3: {"validation_loss": 2.5}, 1e-2: {"validation_loss": None}}
    assert study.pick_rate(sweep) == 3e-3


def test_the_dry_run_checks_the_second_stage_flags_too(tmp_path, capsys):
    # A rank only the second stage trains at: before, the dry run checked the sweep's commands only and passed.
    bad = tmp_path / "study-bad-rank.yaml"
    bad.write_text("name: study-bad-rank\nstudy:\n  methods:\n    lora:\n      script: finetune\n"
                   "      learning_rates: [1.0e-3, 3.0e-3]\n      ranks: [0]\n")
    with pytest.raises(SystemExit):
        study.main(["--config", str(bad), "--dry-run"])
    assert "--lora-r" in capsys.readouterr().err
