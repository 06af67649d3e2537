"""The study's scheduler: runs one stage's runs and returns when every one of them is finished.

A run is a subprocess of one of the kit's scripts (`python SCRIPT ARGV`), exactly what a user would type by hand;
it is finished when its results JSON holds a test perplexity. `run_stage` runs those not finished yet:

- engine "ray" (Ray installed, `pip install ray`): several at once, one per GPU (or `cpus_per_run` CPUs each on a
  machine without GPUs), on this machine or on every machine of a Ray cluster (`address="auto"` after
  `ray start`). A worker process that dies (killed, out of memory, its machine lost) is replaced by Ray's task
  retries, and the retried run resumes from its newest checkpoint.
- engine "serial": one at a time in this process, as the study always ran without Ray.
- engine "auto": Ray when more than one run at a time or a cluster address is asked for, else serial.

The record of which runs are done is the results JSON files themselves (complete = holds a perplexity): on a
shared filesystem every machine and every study process sees the same record, and a rerun after any
interruption runs only the unfinished runs. Ray's own bookkeeping only retries the runs of the stage in flight.
A lock file beside each results JSON (`.NAME.json.lock`, flock) is held for as long as the run's process lives,
so two study processes never run the same run at once: the second waits for the first and reads its results.

This module imports neither torch nor Ray at import time: Ray's workers import it to run a stage's runs.
"""

import fcntl
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from lvf.checkpoints import folder_bytes, latest_checkpoint
from lvf.errors import UsageError

ENGINES = ("auto", "ray", "serial")

# A small trampoline that then execs the run (subprocess's preexec_fn is unsafe in a process with threads, and a
# Ray worker has several). It has the run get SIGTERM when the process that started it dies (prctl
# PR_SET_PDEATHSIG = 1, Linux), so that a killed worker or study takes its run with it rather than leave it
# training beside the rerun; SIGTERM lets a training script save a checkpoint first. And it gives the run the
# signal handling a shell would: a Ray worker's threads block signals, and a child inherits that mask, which
# would leave the run deaf to the SIGINT that asks it to save and stop.
DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM) != 0: sys.exit('prctl failed')\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit('the process that started this run is gone')\n"
    "signal.pthread_sigmask(signal.SIG_SETMASK, set())\n"
    "for signum in (signal.SIGINT, signal.SIGTERM): signal.signal(signum, signal.SIG_DFL)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


@dataclass(frozen=True)
class Run:
    """One run: `python [LAUNCHER...] SCRIPT ARGV...`, which writes its results JSON to results_path and, when it
    trains, its checkpoints and final model to output_dir. launcher goes between the interpreter and the script,
    e.g. ("-m", "accelerate.commands.launch", "--config_file", "configs/fsdp_full_8b.yaml") for a run that
    shards one model over `gpus` GPUs; gpus None means the stage's gpus_per_run."""

    name: str
    script: str
    argv: tuple
    results_path: str
    output_dir: str | None = None
    launcher: tuple = ()
    gpus: int | None = None

    def __post_init__(self):
        # Plain strings and tuples: hashable, and the same when pickled to a worker on another machine.
        object.__setattr__(self, "script", str(self.script))
        object.__setattr__(self, "argv", tuple(str(item) for item in self.argv))
        object.__setattr__(self, "results_path", str(self.results_path))
        object.__setattr__(self, "launcher", tuple(str(item) for item in self.launcher))
        if self.output_dir is not None:
            object.__setattr__(self, "output_dir", str(self.output_dir))


class StageFailed(UsageError):
    """Some runs of a stage did not finish; the others did, and a rerun continues the failed ones."""

    def __init__(self, failures):
        self.failures = dict(failures)
        listed = "; ".join(f"{name} ({why})" for name, why in self.failures.items())
        super().__init__(f"{len(self.failures)} run(s) did not finish: {listed}. Their output is above; rerun the "
                         "study to continue: finished runs are kept, the others resume from their checkpoints")


def results_complete(run):
    """The run's results when its JSON exists and holds a test perplexity (the last thing a script records),
    else None."""
    path = Path(run.results_path)
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return found if isinstance(found, dict) and found.get("perplexity") is not None else None


def ray_available():
    return importlib.util.find_spec("ray") is not None  # without importing it: see run_with_ray


def choose_engine(engine, workers, address):
    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}: one of {', '.join(ENGINES)}")
    wants_ray = address is not None or workers is None or workers > 1
    if engine == "serial":
        if address is not None:
            raise UsageError("a cluster address needs the ray engine")
        return "serial"
    if engine == "ray" or wants_ray:
        if not ray_available():
            raise UsageError("running several runs at once, or on a cluster, needs Ray: pip install 'ray==2.60.0' "
                             "(or run one at a time with 1 worker)")
        return "ray"
    return "serial"


def stage_preview(runs, finished=results_complete, final_models="kept", keep_checkpoints=False):
    """What a stage will make, said before it starts: how many runs, how many are finished already or will
    resume, and what each writes where. final_models says what becomes of the final models (the study knows,
    e.g. "kept for the picked learning rate only"); checkpoints are deleted once a run finishes (the study does
    that with lvf.checkpoints.prune_outputs) unless keep_checkpoints."""
    runs = list(runs)
    done = [run for run in runs if finished(run) is not None]
    to_run = [run for run in runs if run not in done]
    resuming = [run for run in to_run if run.output_dir is not None and latest_checkpoint(run.output_dir)]
    training = [run for run in to_run if run.output_dir is not None]
    lines = [f"{len(runs)} run(s): {len(done)} finished already, {len(to_run)} to run"
             + (f" ({len(resuming)} resuming from a checkpoint)" if resuming else "")]
    if to_run:
        folders = sorted({str(Path(run.results_path).parent) for run in to_run})
        lines.append(f"  each writes its results JSON, in {', '.join(folders)}")
    if training:
        folders = sorted({str(Path(run.output_dir).parent) for run in training})
        held = sum(folder_bytes(run.output_dir) for run in training if Path(run.output_dir).is_dir())
        lines.append(f"  {len(training)} of them train, in {', '.join(folders)}: checkpoints while training, "
                     + ("kept (--keep-checkpoints)" if keep_checkpoints else "deleted when the run finishes")
                     + f"; final models {final_models}"
                     + (f" ({held / 1e9:.2f} GB there already)" if held else ""))
    return "\n".join(lines)


def wait_interruptibly(process):
    """The process's exit status. Waits a second at a time: Ray cancels a task with a simulated Ctrl-C, which
    Python acts on only between steps, never inside one blocking wait."""
    while True:
        try:
            return process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            continue


def run_process(run, argv, cwd, lock):
    """`python [LAUNCHER...] SCRIPT ARGV...` in cwd, a process of its own that inherits the open lock file; its
    exit status (negative: killed by that signal)."""
    # The interpreter of this process: on a cluster, the worker machine's own (the same path as the
    # study's only when every machine installs the project alike, as docs/study-engine.md asks).
    command = [sys.executable, *run.launcher, run.script, *argv]
    if sys.platform == "linux":
        command = [sys.executable, "-c", DIE_WITH_PARENT, str(os.getpid()), *command]
    process = subprocess.Popen(command, cwd=cwd, pass_fds=(lock.fileno(),))
    try:
        return wait_interruptibly(process)
    except KeyboardInterrupt:
        # Ctrl-C: a training script saves a checkpoint on SIGINT, so forward it and wait rather than kill
        # the run mid-save (the scripts take the same signal twice within a second, as the terminal's and
        # this one, as one). A second Ctrl-C leaves at once; the run then gets SIGTERM and stops at once.
        process.send_signal(signal.SIGINT)
        process.wait()
        raise


def execute(run, cwd=None):
    """Runs one run here (in the study process, or in a Ray worker) unless its results are complete, resuming
    from its newest checkpoint. Returns (results, None) or (None, why it failed). Holds the run's lock file for
    as long as the run's process lives: the lock's descriptor is passed down to it."""
    results_path = Path(run.results_path)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = results_path.with_name(f".{results_path.name}.lock")
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[study] {run.name}: another process is running it; waiting for it", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        found = results_complete(run)
        if found is not None:
            return found, None
        argv = list(run.argv)
        if run.output_dir is not None and latest_checkpoint(run.output_dir) is not None:
            argv.append("--resume")
        print(f"[study] {run.name}: {shlex.join([*run.launcher, run.script, *argv])}", file=sys.stderr, flush=True)
        status = run_process(run, argv, cwd, lock)
        if status < 0:
            return None, f"killed by signal {-status}"
        if status != 0:
            return None, f"exit status {status}"
        found = results_complete(run)
        if found is None:
            return None, f"exit status 0 but {results_path} holds no perplexity"
        return found, None


def run_serial(runs, cwd, when_finished):
    outcomes = {}
    for run in runs:
        outcomes[run.name] = execute(run, cwd)
        if outcomes[run.name][0] is not None:
            when_finished(run)
    return outcomes


def connect_ray(ray, workers, address, cpus_per_run):
    """This process's connection to Ray: the cluster at address, or a Ray instance on this machine sized so
    that `workers` runs of cpus_per_run CPUs fit at once (GPUs are found by Ray itself)."""
    if ray.is_initialized():
        return
    import lvf
    import usage_error

    # Ray's workers import this module to run the runs. They have the study's working directory on their path,
    # not the study's own path, and workers that `ray start` started have neither: Ray ships them this package.
    # (The runs' scripts must be at the same path on every machine: docs/study-engine.md.) lvf.errors imports
    # usage_error, which lives beside common.py.
    shipped = {"py_modules": [lvf, usage_error]}
    if address is not None:
        ray.init(address=address, runtime_env=shipped)
    elif workers is None:  # "local": a new instance, even where `ray start` ran
        ray.init(address="local", runtime_env=shipped, include_dashboard=False)
    else:
        ray.init(address="local", num_cpus=workers * cpus_per_run, runtime_env=shipped, include_dashboard=False)


def run_with_ray(runs, workers, address, gpus_per_run, cpus_per_run, cwd, max_retries, when_finished):
    # Ray prints every worker's output here, prefixed with the run's name; by default it also folds lines that
    # look alike across workers into one, which would hide one of two runs' progress. Read when Ray is imported.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray

    connect_ray(ray, workers, address, cpus_per_run)
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    if gpus_per_run is None:
        gpus_per_run = 1 if cluster_gpus else 0
    for run in runs:
        gpus = gpus_per_run if run.gpus is None else run.gpus
        if gpus > cluster_gpus:
            raise UsageError(f"{run.name} needs {gpus} GPU(s) and the Ray cluster has {cluster_gpus:g}")
    remote = ray.remote(execute)
    queue = list(runs)
    in_flight, outcomes = {}, {}

    def collect(ready):
        for reference in ready:
            run = in_flight.pop(reference)
            try:
                outcomes[run.name] = ray.get(reference)
            except ray.exceptions.TaskCancelledError:
                outcomes[run.name] = (None, "stopped")
            except ray.exceptions.RayError as error:
                last_line = str(error).strip().splitlines()[-1] if str(error).strip() else ""
                outcomes[run.name] = (None, f"{type(error).__name__} after {max_retries} retries: {last_line}")
            if outcomes[run.name][0] is not None:
                when_finished(run)

    try:
        while queue or in_flight:
            # At most `workers` submitted at once; Ray itself runs no more than the resources allow.
            while queue and (workers is None or len(in_flight) < workers):
                run = queue.pop(0)
                gpus = gpus_per_run if run.gpus is None else run.gpus
                # max_retries: Ray reruns a task whose worker died (a kill, out of memory, a lost machine). A run
                # that exits with an error is not retried: it returns its failure.
                task = remote.options(name=run.name, num_cpus=cpus_per_run, num_gpus=gpus, max_retries=max_retries)
                in_flight[task.remote(run, cwd)] = run
            # A second at a time, so that a Ctrl-C is seen between waits.
            collect(ray.wait(list(in_flight), num_returns=1, timeout=1.0)[0])
    except KeyboardInterrupt:
        # Ctrl-C: Ray raises KeyboardInterrupt in each running task, which passes SIGINT on to its run: a training
        # script saves a checkpoint and stops. Wait for them (a second Ctrl-C leaves at once).
        print("[study] stopping: each running run saves a checkpoint first (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)
        for reference in in_flight:
            ray.cancel(reference)
        while in_flight:
            collect(ray.wait(list(in_flight), num_returns=len(in_flight), timeout=1.0)[0])
        raise
    return outcomes


def keep_results_here(run, results):
    """A run finished on a machine that does not share this one's disk: its results JSON is written here too."""
    if results_complete(run) is None:
        from lvf.results import write_atomic  # imports torch: only in the study process, never in a worker

        write_atomic(run.results_path, json.dumps(results, indent=2) + "\n")


def run_stage(runs, workers=1, engine="auto", address=None, gpus_per_run=None, cpus_per_run=1,
              finished=results_complete, cwd=None, max_retries=3, when_finished=None):
    """Runs every run not finished yet and returns {run.name: results} for all of them once all are finished:
    the stage's barrier. Runs that fail do not stop the others; one StageFailed then names them all.

    workers: the most runs at once (None: as many as the engine's resources allow: on a Ray cluster, one per
    GPU). engine: "auto", "ray" or "serial" (see the module's doc). address: a Ray cluster ("auto" finds the one
    `ray start` started on this machine). gpus_per_run: GPUs per run (None: 1 where Ray sees GPUs, else 0);
    a Run's own `gpus` wins. cpus_per_run: Ray's CPU count per run (it sets the run's OMP_NUM_THREADS to it).
    finished(run): the run's results when complete, else None (it may raise UsageError, e.g. for results made
    with other flags); asked before anything runs. cwd: the runs' working directory. when_finished(run): called here
    as each run finishes, while the others go on (the study deletes the run's checkpoints there)."""
    runs = list(runs)
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise UsageError(f"run names repeat in one stage: {sorted({n for n in names if names.count(n) > 1})}")
    results = {run.name: finished(run) for run in runs}
    pending = [run for run in runs if results[run.name] is None]
    done_already = len(runs) - len(pending)
    if done_already:
        print(f"[study] {done_already} of {len(runs)} run(s) finished already", file=sys.stderr)
    if not pending:
        return results
    chosen = choose_engine(engine, workers, address)
    when_finished = when_finished or (lambda run: None)
    if chosen == "serial":
        outcomes = run_serial(pending, cwd, when_finished)
    else:
        outcomes = run_with_ray(pending, workers, address, gpus_per_run, cpus_per_run, cwd, max_retries,
                                when_finished)
    failures = {}
    for run in pending:
        found, why = outcomes[run.name]
        if found is None:
            failures[run.name] = why
        else:
            keep_results_here(run, found)
            results[run.name] = found
    if failures:
        raise StageFailed(failures)
    return results
