"""The study's scheduler (lvf.scheduling) on a stand-in script: one worker or two give the same results, a
killed worker's run is rerun and resumes, the serial engine needs no Ray, a stage returns once every run is
finished, two study processes never run the same run twice."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_study_plan import pruning_runs

from lvf import checkpoints, scheduling
from lvf.errors import UsageError

# A stand-in for a training script: a checkpoint-N folder per step (trainer_state.json written last), refuses to
# start over on checkpoints without --resume (as the real scripts do), continues from the newest with it, stops on
# SIGINT or SIGTERM after a moment (saying which), and writes a results JSON whose perplexity follows from its
# argv. Each start is appended to --events.
STAND_IN = r'''
import argparse, json, os, signal, sys, time
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--value", type=float, required=True)
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--output", required=True)
parser.add_argument("--output-dir", required=True)
parser.add_argument("--events", required=True)
parser.add_argument("--hang-after-step", type=int, default=None)
parser.add_argument("--rendezvous", default=None)
parser.add_argument("--fail", action="store_true")
parser.add_argument("--resume", action="store_true")
args = parser.parse_args()


def stop_on_signal(signum, frame):  # as the real scripts do in training: save a checkpoint (a moment), then stop
    time.sleep(0.5)
    Path(args.output_dir, "stopped-on-signal").write_text(str(signum))
    sys.exit(130)


signal.signal(signal.SIGTERM, stop_on_signal)
signal.signal(signal.SIGINT, stop_on_signal)
out = Path(args.output_dir)
saved = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "trainer_state.json").is_file())
if saved and not args.resume:
    sys.exit("checkpoints exist: pass --resume")
start = saved[-1] if args.resume and saved else 0
with open(args.events, "a") as events:
    events.write(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "start": start}) + "\n")
if args.fail:
    sys.exit(1)
if args.rendezvous:  # waits until another run has started too: only passes when two run at once
    Path(args.rendezvous).mkdir(exist_ok=True)
    (Path(args.rendezvous) / str(os.getpid())).touch()
    deadline = time.time() + 120
    while len(list(Path(args.rendezvous).iterdir())) < 2:
        if time.time() > deadline:
            sys.exit("no other run started beside this one")
        time.sleep(0.05)
for step in range(start + 1, args.steps + 1):
    time.sleep(0.1)
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if step == args.hang_after_step and not args.resume:
        (out / "hanging").write_text(str(os.getpid()))
        time.sleep(40)  # killed here by the test; left alive, it would finish without resuming
out.joinpath("final").mkdir(exist_ok=True)
out.joinpath("final", "model.safetensors").write_bytes(b"weights")
results = {"perplexity": 1.0 + args.value ** 2 + args.steps / 1000, "value": args.value, "resumed_from": start or None}
Path(args.output).write_text(json.dumps(results))
'''


@pytest.fixture
def stand_in(tmp_path):
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    return script


def make_run(script, folder, name, value, *extra):
    folder = Path(folder)
    results_path, output_dir = folder / "results" / f"{name}.json", folder / "outputs" / name
    argv = ["--value", value, "--output", results_path, "--output-dir", output_dir, "--events",
            folder / f"{name}.events", *extra]
    return scheduling.Run(name, script, argv, results_path, output_dir)


def starts(folder, name):
    path = Path(folder) / f"{name}.events"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def gone(pid, wait_seconds=10):
    """True once the process has exited (a zombie counts: it no longer runs)."""
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray", reason="Ray is not installed: the parallel engine is optional")
    yield ray
    ray.shutdown()


PROJECT_DIR = Path(__file__).resolve().parents[1]
VALUES = {"a": 1, "b": 2, "c": 3, "d": 0.5}


@pytest.mark.ray
def test_two_workers_give_the_same_results_as_one(tmp_path, stand_in, ray_instance):
    one = scheduling.run_stage([make_run(stand_in, tmp_path / "one", name, value) for name, value in VALUES.items()],
                               workers=1)
    # With two workers every run also waits until another has started: the stage only passes if two ran at once.
    two_runs = [make_run(stand_in, tmp_path / "two", name, value, "--rendezvous", tmp_path / "two" / "met")
                for name, value in VALUES.items()]
    two = scheduling.run_stage(two_runs, workers=2, engine="ray")
    assert two == one
    assert one["c"]["perplexity"] == pytest.approx(1 + 9 + 0.003, abs=1e-12)
    assert {len(starts(tmp_path / "two", name)) for name in VALUES} == {1}
    assert len({start["ppid"] for name in VALUES for start in starts(tmp_path / "two", name)}) == 2  # two workers


@pytest.mark.ray
def test_a_killed_worker_is_replaced_and_its_run_resumes_from_its_checkpoint(tmp_path, stand_in, ray_instance):
    run = make_run(stand_in, tmp_path, "killed", 3, "--hang-after-step", 1)

    def kill_the_worker():
        while not (Path(run.output_dir) / "hanging").exists():
            time.sleep(0.05)
        os.kill(starts(tmp_path, "killed")[0]["ppid"], signal.SIGKILL)  # the Ray worker the run's process hangs from

    killer = threading.Thread(target=kill_the_worker, daemon=True)
    killer.start()
    found = scheduling.run_stage([run], workers=2, engine="ray")["killed"]
    first, second = starts(tmp_path, "killed")
    assert first["ppid"] != second["ppid"]  # a new worker ran it
    assert (first["start"], second["start"]) == (0, 1)
    assert found["resumed_from"] == 1 and found["perplexity"] == pytest.approx(10.003)
    assert gone(first["pid"])  # the killed worker's run died with it (it would sleep on, holding the run's lock)


STUDY = """
import sys
from lvf import scheduling
run = scheduling.Run(sys.argv[1], sys.argv[2], sys.argv[6:], sys.argv[3], sys.argv[4])
scheduling.run_stage([run], engine=sys.argv[5])
"""


def start_study(run, engine="serial", cwd=PROJECT_DIR):
    """A study process of its own (the kill and Ctrl-C below are for it, not for pytest)."""
    # SIGINT back to its default, and unblocked, in the study: a child inherits an ignored or blocked SIGINT (a
    # shell starts background jobs with it ignored; threads of earlier tests may block it), and Python installs its
    # Ctrl-C handler only over the default. The tests below send the study SIGINT as a terminal would.
    return subprocess.Popen([sys.executable, "-c", STUDY, run.name, run.script, run.results_path, run.output_dir,
                             engine, *run.argv], cwd=cwd, preexec_fn=default_interrupts)


def default_interrupts():
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def wait_until_hanging(run, study, limit=300):
    """Until the run sits after its first checkpoint; a generous limit, as the machine may be busy with other work."""
    deadline = time.monotonic() + limit
    while not (Path(run.output_dir) / "hanging").exists():
        assert study.poll() is None, "the study stopped before its run reached its first checkpoint"
        if time.monotonic() > deadline:
            study.kill()
            pytest.fail(f"the run did not reach its first checkpoint in {limit} s")
        time.sleep(0.05)


@pytest.mark.ray
def test_ray_calls_the_finished_hook_as_each_run_finishes(tmp_path, ray_instance):
    # study.py prunes each run's checkpoints as it finishes (test_study_plan.py's serial test); under Ray too.
    runs, _ = pruning_runs(tmp_path)
    found = scheduling.run_stage(runs, workers=1, engine="ray", when_finished=lambda run: checkpoints.prune_outputs(
        run.output_dir, keep_final=True))
    assert found["b"]["checkpoints_seen_at_start"] == []


@pytest.mark.subprocess
def test_a_killed_study_takes_its_run_with_it_and_a_rerun_resumes(tmp_path, stand_in):
    run = make_run(stand_in, tmp_path, "orphan", 2, "--hang-after-step", 1)
    study = start_study(run)
    wait_until_hanging(run, study)
    study.kill()
    study.wait()
    first = starts(tmp_path, "orphan")[0]
    assert gone(first["pid"])  # left alive, it would sleep on for 40 s, then finish without resuming
    assert (Path(run.output_dir) / "stopped-on-signal").read_text() == str(int(signal.SIGTERM))
    assert scheduling.run_stage([run], engine="serial")["orphan"]["resumed_from"] == 1


@pytest.mark.subprocess
@pytest.mark.parametrize("engine", ["serial", pytest.param("ray", marks=pytest.mark.ray)])
def test_ctrl_c_lets_the_run_stop_on_its_own_terms(tmp_path, stand_in, engine):
    if engine == "ray":
        pytest.importorskip("ray", reason="Ray is not installed: the parallel engine is optional")
    run = make_run(stand_in, tmp_path, "interrupted", 2, "--hang-after-step", 1)
    # Started from another folder than the project's: Ray's workers get the study's working directory on their
    # path, not the study's path, so the run starts under Ray only if lvf is shipped to them.
    study = start_study(run, engine=engine, cwd=tmp_path)
    try:
        wait_until_hanging(run, study)
        study.send_signal(signal.SIGINT)  # to the study alone; from a terminal the run would get it too
        study.wait(timeout=120)
    finally:
        if study.poll() is None:  # failed: leave no study (nor, through it, its run) behind
            study.kill()
    # The run saved and stopped: it was passed the Ctrl-C (through Ray's task cancelling, with Ray) and waited for,
    # not killed (subprocess.run kills its child a quarter of a second after a Ctrl-C).
    assert (Path(run.output_dir) / "stopped-on-signal").read_text() == str(int(signal.SIGINT))
    assert scheduling.results_complete(run) is None


def test_serial_engine_runs_one_at_a_time_without_ray(tmp_path, stand_in, monkeypatch):
    monkeypatch.setattr(scheduling, "ray_available", lambda: False)
    runs = [make_run(stand_in, tmp_path, name, value) for name, value in VALUES.items()]
    found = scheduling.run_stage(runs, workers=1, engine="auto")
    assert {name: result["perplexity"] for name, result in found.items()} == pytest.approx(
        {name: 1 + value ** 2 + 0.003 for name, value in VALUES.items()})
    assert {start["ppid"] for name in VALUES for start in starts(tmp_path, name)} == {os.getpid()}
    with pytest.raises(UsageError, match="needs Ray: pip install"):
        scheduling.run_stage([make_run(stand_in, tmp_path / "more", "e", 4)], workers=2)


def test_a_stage_returns_once_every_run_is_finished_and_names_the_failed_ones(tmp_path, stand_in):
    runs = [make_run(stand_in, tmp_path, "first", 1), make_run(stand_in, tmp_path, "broken", 2, "--fail"),
            make_run(stand_in, tmp_path, "last", 3)]
    with pytest.raises(scheduling.StageFailed, match=r"1 run\(s\) did not finish: broken \(exit status 1\)"):
        scheduling.run_stage(runs, engine="serial")
    # The runs after the failed one ran all the same; a rerun runs only the unfinished one.
    assert scheduling.results_complete(runs[2])["perplexity"] == pytest.approx(10.003)
    fixed = [*runs[:1], make_run(stand_in, tmp_path, "broken", 2), runs[2]]
    found = scheduling.run_stage(fixed, engine="serial")
    assert set(found) == {"first", "broken", "last"}
    assert all(scheduling.results_complete(run) == found[run.name] for run in fixed)
    assert [len(starts(tmp_path, name)) for name in ("first", "broken", "last")] == [1, 2, 1]


def test_a_run_with_checkpoints_is_resumed_not_restarted(tmp_path, stand_in):
    run = make_run(stand_in, tmp_path, "cut", 2, "--steps", "4")
    for step in (1, 2):
        (Path(run.output_dir) / f"checkpoint-{step}").mkdir(parents=True)
        (Path(run.output_dir) / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (Path(run.output_dir) / "checkpoint-3").mkdir()  # cut short while saving: no trainer_state.json
    assert scheduling.run_stage([run], engine="serial")["cut"]["resumed_from"] == 2


def test_two_study_processes_never_run_the_same_run_twice(tmp_path, stand_in):
    run = make_run(stand_in, tmp_path, "base", 1)
    found = []
    studies = [threading.Thread(target=lambda: found.append(scheduling.run_stage([run], engine="serial")))
               for _ in range(2)]
    for study in studies:
        study.start()
    for study in studies:
        study.join()
    assert len(starts(tmp_path, "base")) == 1
    assert found[0]["base"] == found[1]["base"] == scheduling.results_complete(run)


def test_stage_preview_counts_the_runs_before_anything_runs(tmp_path, stand_in):
    runs = [make_run(stand_in, tmp_path, name, value) for name, value in VALUES.items()]
    scheduling.run_stage(runs[:1], engine="serial")
    (Path(runs[1].output_dir) / "checkpoint-5").mkdir(parents=True)
    (Path(runs[1].output_dir) / "checkpoint-5" / "trainer_state.json").write_text("{}")
    preview = scheduling.stage_preview(runs, final_models="kept for the picked rate only")
    assert preview.splitlines()[0] == "4 run(s): 1 finished already, 3 to run (1 resuming from a checkpoint)"
    assert "final models kept for the picked rate only" in preview
    assert "checkpoints while training, deleted when the run finishes" in preview
    kept = scheduling.stage_preview(runs, final_models="kept", keep_checkpoints=True)
    assert "checkpoints while training, kept (--keep-checkpoints)" in kept and "deleted" not in kept


def test_prune_outputs_keeps_the_final_model_only_when_asked(tmp_path):
    for name in ("checkpoint-2", "checkpoint-4", "final", "final-20260101T000000Z", "final.partial", "notes"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "weights").write_bytes(b"x" * 10)
    (tmp_path / "origin.json").write_text("{}")
    assert checkpoints.prune_outputs(tmp_path, keep_final=True) == 30
    assert sorted(item.name for item in tmp_path.iterdir()) == ["final", "final-20260101T000000Z", "notes",
                                                                 "origin.json"]
    assert checkpoints.prune_outputs(tmp_path, keep_final=False) == 20
    assert sorted(item.name for item in tmp_path.iterdir()) == ["notes", "origin.json"]


def test_run_is_hashable_and_plain_so_it_pickles_to_another_machine(tmp_path):
    run = scheduling.Run("r", tmp_path / "s.py", ["--value", 1], tmp_path / "r.json")
    assert run.argv == ("--value", "1") and run.script == str(tmp_path / "s.py") and hash(run)


@pytest.mark.ray
def test_a_lost_machines_run_is_rerun_on_another_and_resumes(tmp_path, stand_in, ray_instance):
    # Ray's own stand-in for several machines: a head that runs nothing and two nodes of one CPU, each with its
    # own raylet. When the run hangs, the node running it is killed outright, raylet and all.
    from ray.cluster_utils import Cluster

    ray_instance.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    run = make_run(stand_in, tmp_path, "lost", 4, "--hang-after-step", 1)

    def lose_the_machine():
        while not (Path(run.output_dir) / "hanging").exists():
            time.sleep(0.05)
        worker = starts(tmp_path, "lost")[0]["ppid"]
        raylet = int(Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[1])  # a worker's parent
        [node] = [node for node in nodes if node.all_processes["raylet"][0].process.pid == raylet]
        cluster.remove_node(node, allow_graceful=False)

    try:
        threading.Thread(target=lose_the_machine, daemon=True).start()
        found = scheduling.run_stage([run], workers=None, address=cluster.address)["lost"]
    finally:
        ray_instance.shutdown()
        cluster.shutdown()
    first, second = starts(tmp_path, "lost")
    assert first["ppid"] != second["ppid"] and (first["start"], second["start"]) == (0, 1)
    assert found["resumed_from"] == 1 and found["perplexity"] == pytest.approx(17.003)
    assert gone(first["pid"])
