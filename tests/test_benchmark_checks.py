"""--benchmarks before anything loads: lm-eval and each task checked with a one-line fix, and the dry run's count
of what the benchmarks add. No model is loaded."""

import json
import re
from types import SimpleNamespace

import pytest
from lm_eval.tasks import TaskManager

import common
from lvf import benchmarks, experiments
from lvf.errors import UsageError

TASKS_DIR = str(common.PROJECT_DIR / "data" / "benchmarks")


def asked(tasks, limit=None, tasks_dir=None):
    return SimpleNamespace(benchmarks=tasks, benchmark_limit=limit, benchmark_tasks_dir=tasks_dir,
                           benchmark_batch_size=8, benchmark_chat_template=False)


def test_without_lm_eval_the_run_stops_naming_the_install(monkeypatch):
    monkeypatch.setattr(benchmarks, "lm_eval_installed", lambda: False)
    with pytest.raises(UsageError, match=r"pip install lm-eval==0\.4\.13"):
        benchmarks.check_benchmarks(asked("demo_mc", tasks_dir=TASKS_DIR))
    (level, text), = benchmarks.preflight_lines(asked("demo_mc", tasks_dir=TASKS_DIR))
    assert level == "problem" and "pip install lm-eval" in text
    assert benchmarks.check_benchmarks(asked(None)) is None and benchmarks.preflight_lines(asked("")) == []


def test_an_unknown_task_or_a_missing_folder_is_one_line_naming_the_fix(tmp_path):
    with pytest.raises(UsageError, match=r"--benchmarks demo_mcq: not a task lm-eval knows nor a task file in .*"
                                         r"lm_eval ls tasks"):
        benchmarks.check_benchmarks(asked("demo_mcq", tasks_dir=TASKS_DIR))
    with pytest.raises(UsageError, match=r"--benchmark-tasks-dir .*nowhere: not a folder"):
        benchmarks.check_benchmarks(asked("demo_mc", tasks_dir=str(tmp_path / "nowhere")))


def test_the_dry_run_counts_the_requests_and_names_missing_data(monkeypatch):
    monkeypatch.setattr(common, "in_hub_cache", lambda repo, kind: repo == "allenai/winogrande")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lines = benchmarks.preflight_lines(asked("demo_mc,hellaswag,winogrande", limit=100, tasks_dir=TASKS_DIR))
    text = "\n".join(f"{level}: {line}" for level, line in lines)
    assert "info: benchmark demo_mc: 100 items x 4 choices = 400 log-likelihood requests" in text
    assert "info: benchmark hellaswag: 100 items x 4 choices = 400" in text
    assert "info: benchmark winogrande: 100 items x 2 choices = 200" in text
    assert "problem: benchmark hellaswag: its data Rowan/hellaswag is not in the Hub cache and HF_HUB_OFFLINE=1" in text
    assert "winogrande: its data" not in text  # cached
    assert "benchmarks add 1000 log-likelihood requests in 125 forward passes of 8" in text


def test_the_time_is_estimated_from_an_earlier_run_of_the_experiment(tmp_path):
    (tmp_path / "base.json").write_text(json.dumps({"benchmarks": {"demo_mc": {"requests": 600}},
                                                    "benchmark_seconds": 120.0}))
    rate = benchmarks.measured_rate(tmp_path)
    assert rate == (0.2, tmp_path / "base.json")
    line = benchmarks.time_line(asked("demo_mc"), 3000, rate)
    assert "about 10.0 min at the 0.2 s per request base.json measured" in line
    nothing_earlier = benchmarks.measured_rate(tmp_path / "elsewhere")
    assert "time not estimated" in benchmarks.time_line(asked("demo_mc"), 3000, nothing_earlier)


def test_lm_evals_own_tasks_are_indexed_from_their_folders_alone_as_the_whole_index_gives_them():
    """lm-eval indexes its ~14,000 task files by parsing each; read as text, they give the GPU experiment's tasks
    and only their folders are indexed: the same entries (file, config, tags) as the whole index."""
    gpu_tasks = experiments.load(common.PROJECT_DIR / "experiments" / "llama3-8b-dolly.yaml")["shared"]["benchmarks"]
    names = benchmarks.task_names(asked(gpu_tasks))
    assert names == ["hellaswag", "arc_challenge", "winogrande"]
    narrowed = benchmarks.task_manager(asked(gpu_tasks))
    with_own = benchmarks.task_manager(asked(f"demo_mc,{gpu_tasks}", tasks_dir=TASKS_DIR))
    whole = benchmarks.whole_index(None)  # lm-eval's own, all of it
    assert len(whole.all_tasks) > 10_000 and len(narrowed.all_tasks) < 20 and len(with_own.all_tasks) < 20
    for name in names:
        assert narrowed.task_index[name] == whole.task_index[name] == with_own.task_index[name]
    assert with_own.task_index["demo_mc"] == TaskManager(include_path=TASKS_DIR, include_defaults=False).task_index[
        "demo_mc"]
    # A group is left to the whole index (which says the name is a group), and so would a task also declared as one.
    assert benchmarks.task_manager(asked("ai2_arc")) is whole
    # What makes a name that lm-eval's task files do not contain unknown without the whole index: every name the
    # whole index knows is in their text.
    text = "\n".join(text for _, text in benchmarks.lm_eval_task_files())
    words = set(re.findall(r"[^\s'\"\[\]{},:]+", text))
    assert [name for name in whole.all_tasks if name not in words and name not in text] == []
    assert "demo_mcq" not in text and benchmarks.task_manager(asked("demo_mcq")).all_tasks == []
