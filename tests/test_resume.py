"""A real SIGTERM during training saves a checkpoint and exits; --resume then finishes the run with the
same result as a run that was never interrupted (CPU, fp32, same seed)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import common
import finetune
from lvf import errors, training

pytestmark = pytest.mark.slow  # runs the scripts end to end; `pytest -m 'not slow'` skips it

RUN = ["--general-file", "",  # no forgetting measure: not what this test checks
       "--max-train-samples", "8", "--max-val-samples", "2", "--max-eval-samples", "4", "--max-length", "128",
       "--batch-size", "2", "--max-steps", "4", "--eval-steps", "2", "--learning-rate", "1e-2",
       "--dtype", "float32", "--bf16-autocast", "off"]


def wait_for_line(process, log_path, prefix, limit=300):
    """Waits (polling the log) until a line starts with prefix; fails if the process ends first."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if any(line.startswith(prefix) for line in log_path.read_text().splitlines()):
            return
        assert process.poll() is None, log_path.read_text()[-3000:]
        time.sleep(0.05)
    pytest.fail(f"no line starting with {prefix!r} in {log_path}")


def test_sigterm_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(tmp_path, tiny_llama_dir, records_path):
    def args(name, *extra):
        return ["--model", str(tiny_llama_dir), "--dataset", str(records_path), *RUN,
                "--output", str(tmp_path / f"{name}.json"), "--output-dir", str(tmp_path / name), *extra]

    # The run that gets the signal is a real process; the others run in this one (same code, no start-up).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = tmp_path / "run.log"
    with open(log, "w") as handle:  # a file, not a pipe: nothing blocks on a full pipe
        run = subprocess.Popen([sys.executable, str(common.PROJECT_DIR / "finetune.py"), *args("run")],
                               stdout=handle, stderr=subprocess.STDOUT, env=env)
    wait_for_line(run, log, "training:")  # printed once the handler is installed, just before the first step
    run.send_signal(signal.SIGTERM)

    finetune.main(args("reference"))  # meanwhile: the same run, never interrupted

    assert run.wait(timeout=300) == errors.SIGNAL_EXIT_STATUS == 130, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()
    assert "rerun the same command with --resume" in log.read_text()
    assert not (tmp_path / "run.json").exists()  # an interrupted run writes no results
    checkpoint = training.latest_checkpoint(tmp_path / "run")
    assert checkpoint is not None and checkpoint.endswith("checkpoint-1")

    finetune.main(args("run", "--resume"))

    expected = json.loads((tmp_path / "reference.json").read_text())
    result = json.loads((tmp_path / "run.json").read_text())
    assert result["resumed_from"] == checkpoint and expected["resumed_from"] is None
    assert result["optimizer_steps"] == expected["optimizer_steps"] == 4
    assert result["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-4)
    assert result["best_validation_loss"] == pytest.approx(expected["best_validation_loss"], rel=1e-4)


def test_sigterm_outside_training_exits_130_without_a_traceback(capsys):
    def main():
        os.kill(os.getpid(), signal.SIGTERM)  # e.g. while the model loads
        time.sleep(5)
        pytest.fail("SIGTERM did not stop the script")

    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_info:
        errors.main_guard(main)
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "stopped: by a signal, before any results were written\n"
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is the caller's again
