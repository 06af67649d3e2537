"""The study plans disk and time before it runs: each stage's disk at its peak for --workers against the free disk
(refused before it starts when it does not fit, naming the fix), GPU-hours from bench/gpu_check.py's epoch times,
and the GPU study's rank axis counted. No training: meta models and stand-in scripts only."""

import json
import re
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import yaml

import study
from lvf import errors, preflight, scheduling, study_plan
from lvf.study_plan import RunCost

PROJECT_DIR = Path(__file__).resolve().parents[1]
GPU_STUDY = "experiments/study-llama3-8b-dolly.yaml"
Usage = namedtuple("Usage", "total used free")
GB = 10**9


def free_disk(monkeypatch, free_bytes):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(real(path).total, 0, free_bytes))


@pytest.fixture(scope="module")
def gpu_check_file(tmp_path_factory):
    """A gpu_check report as bench/gpu_check.py writes it: one dolly-15k epoch 1 h for LoRA and 2 h for full."""
    path = tmp_path_factory.mktemp("gpu-check") / "gpu_check.json"
    path.write_text(json.dumps({"tiny": False, "device_name": "a test GPU", "results": {
        "lora": {"estimated_epoch_hours": 1.0}, "full": {"estimated_epoch_hours": 2.0}}}))
    return path


@pytest.fixture(scope="module")
def gpu_study_dry_run(gpu_check_file):
    """The GPU study's dry run with 8 workers and 10 TB free: (its output, its exit status)."""
    import contextlib
    import io

    with pytest.MonkeyPatch.context() as patch:
        free_disk(patch, 10_000 * GB)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status = study.main(["--config", GPU_STUDY, "--dry-run", "--workers", "8", "--gpu-check",
                                 str(gpu_check_file)])
    return out.getvalue(), status


def stage_lines(output, number):
    """The lines of one stage's block in the dry run."""
    block = output.split(f"[study] stage {number}")[1].split("[study] stage")[0]
    return block.splitlines()


def test_the_gpu_study_dry_run_gives_each_stage_its_disk_peak_against_the_free_disk(gpu_study_dry_run):
    output, status = gpu_study_dry_run
    assert status == 0
    for number in (1, 2):
        disk = [line for line in stage_lines(output, number) if "disk:" in line and "free at" in line]
        assert len(disk) == 1 and disk[0].lstrip().startswith("ok")
        assert "10000.0 GB free" in disk[0]
        assert f"stage {number}'s checkpoints and final models at their peak with --workers 8" in disk[0]
    # Stage 1 with 8 workers: its 3 full fine-tunings train at once, each with up to 3 checkpoints and its final
    # model (the pre-flight's rule), so the peak holds three of them.
    full_line = re.search(r"full 3 x ([\d.]+) GB while training, ([\d.]+) GB kept", output)
    peak = re.search(r"stage 1's checkpoints and final models at their peak with --workers 8 ([\d.]+) GB", output)
    assert full_line and peak
    assert float(peak.group(1)) >= 3 * float(full_line.group(1))



def test_the_study_engine_doc_quotes_the_gpu_study_dry_run(gpu_study_dry_run):
    """docs/study-engine.md's disk figures for the GPU study are what its dry run prints (never typed by hand)."""
    output, _ = gpu_study_dry_run
    doc = " ".join((PROJECT_DIR / "docs" / "study-engine.md").read_text().split())
    quoted = re.search(r"each full fine-tuning run ([\d.]+ GB) while it trains and ([\d.]+ GB) kept; stage 1 at its "
                       r"peak ([\d.]+ GB) \(plus the model's ([\d.]+ GB) download.*?stage 2, with what stage 1 leaves, "
                       r"([\d.]+ GB); the rank axis adds (\d+) of stage 2's (\d+) runs", doc)
    assert quoted, "docs/study-engine.md no longer quotes the GPU study's dry run"
    training, kept, first, download, second, axis, later = quoted.groups()
    assert f"full 3 x {training} while training, {kept} kept" in output
    assert f"download {download}" in output
    assert f"stage 1's checkpoints and final models at their peak with --workers 8 {first}" in output
    assert re.search(rf"stage 2's checkpoints and final models at their peak with --workers 8 \(and [\d.]+ GB stage 1 "
                     rf"leaves\) {re.escape(second)}", output)
    assert f"adds {axis} of these runs" in output and f"about {later} runs" in output

def test_the_gpu_study_times_its_stages_from_gpu_check(gpu_study_dry_run):
    output, _ = gpu_study_dry_run
    contents = yaml.safe_load((PROJECT_DIR / GPU_STUDY).read_text())["study"]
    lora_sweeps = sum(len(m["learning_rates"]) for m in contents["methods"].values() if m["script"] == "finetune")
    full_sweeps = sum(len(m["learning_rates"]) for m in contents["methods"].values() if m["script"] != "finetune")
    # One epoch each (the scripts' default): 1 h a LoRA run, 2 h a full one in the gpu_check file above.
    assert f"time: {lora_sweeps * 1.0 + full_sweeps * 2.0:.1f} GPU-hours of training for the " in "\n".join(
        stage_lines(output, 1))


def test_the_gpu_study_has_the_rank_axis_and_its_dry_run_counts_it(gpu_study_dry_run):
    output, _ = gpu_study_dry_run
    method = yaml.safe_load((PROJECT_DIR / GPU_STUDY).read_text())["study"]["methods"]["lora-all-linear"]
    seeds = yaml.safe_load((PROJECT_DIR / GPU_STUDY).read_text())["study"]["seeds"]
    ranks = method["ranks"]
    assert min(ranks) <= 1 and max(ranks) >= 256 and method["flags"]["lora_targets"] == "all-linear"
    # Every other rank at every seed, and at the smallest and largest rank the middle rate's two neighbours.
    added = len(ranks) * len(seeds) + 2 * 2
    assert (f"the rank axis (lora-all-linear at ranks {', '.join(map(str, ranks))}, beside its own "
            f"{method['flags']['lora_r']}) adds "
            f"{added} of these runs: {added * 1.0:.1f} GPU-hours of training") in output


def test_without_gpu_check_figures_the_time_says_how_to_get_them(tmp_path):
    hours, why = study_plan.read_gpu_check(tmp_path / "gpu_check.json")
    assert hours is None and "bash bench/gpu_check.sh" in why
    (tmp_path / "tiny.json").write_text(json.dumps({"tiny": True, "results": {"lora": {"estimated_epoch_hours": 1}}}))
    assert study_plan.read_gpu_check(tmp_path / "tiny.json")[0] is None  # a CPU stand-in's figures are not the GPU's


def test_a_stage_holds_every_runs_kept_part_and_the_checkpoints_of_the_runs_at_once():
    full = [RunCost("full", training_bytes=187, kept_bytes=32) for _ in range(3)]
    lora = [RunCost("lora", training_bytes=2, kept_bytes=1) for _ in range(4)]
    assert study_plan.stage_peak_bytes(full + lora, workers=8) == 3 * 187 + 4 * 2
    assert study_plan.stage_peak_bytes(full + lora, workers=1) == 3 * 32 + 4 * 1 + (187 - 32)
    finished = [RunCost("full", 187, 32, done=True)] * 3
    assert study_plan.stage_peak_bytes(finished + lora, workers=8) == 3 * 32 + 4 * 2
    assert study_plan.most_workers_within(full + lora, 3 * 32 + 4 + 2 * 155 + 1, workers=8) == 2
    assert study_plan.most_workers_within(full + lora, 50, workers=8) == 0


def test_stage_hours_follow_the_schedulers_queue():
    costs = [RunCost("lora", 0, 0, hours=1.0)] * 4 + [RunCost("full", 0, 0, hours=2.0)] * 2
    assert study_plan.stage_hours(costs, workers=4) == (8.0, 3.0)  # 4 LoRA at once, then the 2 full
    assert study_plan.stage_hours(costs, workers=1) == (8.0, 8.0)
    assert study_plan.stage_hours(costs + [RunCost("qlora", 0, 0)], workers=4) == (None, None)


def gpu_study(*flags):
    return study.parse_args(["--config", GPU_STUDY, *flags])


def test_a_stage_over_the_free_disk_is_refused_before_it_starts_naming_the_workers_that_fit(monkeypatch):
    planned = gpu_study("--workers", "8")
    download = study.size_of(study.sweep_runs(planned)[-1])["download"]  # the model, when not in the Hub cache
    # The outputs beside the download (never created: the study stops first), so both count against one disk.
    outputs = (download.folder if download else Path("/tmp")) / "lvf-study-plan-never-written"
    flags = ["--workers", "8", "--study-dir", "/nonexistent/results", "--outputs-dir", str(outputs)]
    planned = gpu_study(*flags)
    one_at_a_time = study_plan.stage_peak_bytes(study.stage_costs(planned, study.sweep_runs(planned)), 1)
    free_disk(monkeypatch, one_at_a_time + (download.bytes if download else 0) + GB)  # one run at a time fits
    monkeypatch.setattr(scheduling, "run_stage", lambda *a, **k: pytest.fail("a run started"))
    with pytest.raises(errors.UsageError) as refused:
        study.main(["--config", GPU_STUDY, *flags])
    line = str(refused.value)
    assert "\n" not in line and line.startswith("disk: ") and "stage 1 writes about" in line
    assert f"pass --workers 1 ({preflight.gigabytes(one_at_a_time)} at its peak)" in line
    assert "--outputs-dir on a larger disk" in line
    assert not outputs.exists()


STAND_IN = r'''
import json, sys
from pathlib import Path
output, output_dir, others = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
seen = sorted(str(p.relative_to(others)) for p in others.glob("*/checkpoint-*"))
(output_dir / "checkpoint-1").mkdir(parents=True)
(output_dir / "checkpoint-1" / "trainer_state.json").write_text("{}")
(output_dir / "final").mkdir()
Path(output).write_text(json.dumps({"perplexity": 2.0, "checkpoints_seen_at_start": seen}))
'''


def pruning_runs(tmp_path):
    """Two runs of STAND_IN, a then b, their outputs side by side under tmp_path/outputs: (runs, that folder)."""
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    outputs = tmp_path / "outputs"
    return [scheduling.Run(name, script, (tmp_path / f"{name}.json", outputs / name, outputs),
                           tmp_path / f"{name}.json", outputs / name) for name in ("a", "b")], outputs


def test_each_runs_checkpoints_are_deleted_as_it_finishes_not_when_the_stage_ends(tmp_path, monkeypatch):
    runs, outputs = pruning_runs(tmp_path)
    planned = gpu_study("--study-dir", str(tmp_path), "--outputs-dir", str(outputs))
    monkeypatch.setattr(study, "complete_results", scheduling.results_complete)  # stand-ins: no flags to compare
    found = study.run_stage(planned, runs)
    assert found[tmp_path / "b.json"]["checkpoints_seen_at_start"] == []  # a's were gone when b started
    assert (outputs / "a" / "final").is_dir() and not (outputs / "b" / "checkpoint-1").exists()
