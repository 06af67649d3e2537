"""A real SIGTERM during training saves a checkpoint and exits 130; --resume then finishes the run with the
same result as a run that was never interrupted (CPU, fp32, same seed), step for step and weight for weight."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import common
import finetune
import full_finetune
from lvf import errors, training

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


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigterm_to_the_script_saves_a_checkpoint_exits_130_and_resume_finishes(tmp_path, tiny_llama_dir,
                                                                               records_path):
    """finetune.py as a user runs it: a real SIGTERM to a real process, then the same command with --resume. That
    the resumed run matches an uninterrupted one is checked, step by step, by the in-process sequences below."""
    from test_end_to_end import run_script

    args = ["--model", str(tiny_llama_dir), "--dataset", str(records_path), *RUN,
            "--output", str(tmp_path / "run.json"), "--output-dir", str(tmp_path / "run")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = tmp_path / "run.log"
    with open(log, "w") as handle:  # a file, not a pipe: nothing blocks on a full pipe
        run = subprocess.Popen([sys.executable, str(common.PROJECT_DIR / "finetune.py"), *args],
                               stdout=handle, stderr=subprocess.STDOUT, env=env)
    wait_for_line(run, log, "training:")  # printed once the handler is installed, just before the first step
    run.send_signal(signal.SIGTERM)

    assert run.wait(timeout=300) == errors.SIGNAL_EXIT_STATUS == 130, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()
    assert "rerun the same command with --resume" in log.read_text()
    assert not (tmp_path / "run.json").exists()  # an interrupted run writes no results
    checkpoint = training.latest_checkpoint(tmp_path / "run")
    assert checkpoint is not None and checkpoint.endswith("checkpoint-1")

    run_script("finetune.py", *args, "--resume")  # exits 0, without a traceback

    result = json.loads((tmp_path / "run.json").read_text())
    assert result["resumed_from"] == checkpoint
    assert result["optimizer_steps"] == 4 and result["perplexity"] > 0


# 16 demo records of which 8 fit in 64 tokens (pinned below): at 2 a step, 4 optimizer steps an epoch, a checkpoint
# every 4 steps, 8 steps in all.
CUT_RUN = ["--general-file", "",
           "--max-train-samples", "16", "--max-val-samples", "2", "--max-eval-samples", "4", "--max-length", "64",
           "--max-steps", "8", "--eval-steps", "4", "--learning-rate", "1e-2", "--dtype", "float32",
           "--bf16-autocast", "off", "--bootstrap-resamples", "10"]
# One run stopped by SIGTERM during step 2 (first epoch, before any checkpoint), then resumed and stopped again
# during step 5 (second epoch, just after checkpoint 4) and step 7 (just before checkpoint 8), then resumed to the end.
CUTS = (2, 5, 7)
# One sequence per resume mechanism (docs/testing.md says what the two removed ones, qlora and full, were covered by):
METHODS = {
    # The Trainer's optimizer, resumed from an adapter checkpoint, with gradient accumulation over two batches and
    # LoRA dropout on (the default 0.05): the random state must be restored too.
    "lora": (finetune, ["--batch-size", "1", "--grad-accum", "2"]),
    # The default on every GPU: AdamW stepped in backward; its states and schedule must survive a resume.
    "full-in-backward": (full_finetune, ["--batch-size", "2", "--grad-accum", "1", "--optim-in-backward", "on"]),
}


@pytest.mark.slow  # five runs each: an uninterrupted one, and one cut three times
@pytest.mark.parametrize("method", METHODS)
def test_resume_after_sigterm_at_several_steps_matches_an_uninterrupted_run(method, tmp_path, monkeypatch,
                                                                            tiny_llama_dir, records_path):
    script, extra = METHODS[method]
    signal_at = {"step": None}

    class SigtermDuringStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == signal_at["step"]:
                os.kill(os.getpid(), signal.SIGTERM)  # a real signal, handled by training.StopOnSignal

    make_trainer_class = training.make_trainer_class

    def with_signal(*a, **kw):
        class Signalled(make_trainer_class(*a, **kw)):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.add_callback(SigtermDuringStep())
        return Signalled

    monkeypatch.setattr(training, "make_trainer_class", with_signal)

    def args(name, *more):
        return ["--model", str(tiny_llama_dir), "--dataset", str(records_path), *CUT_RUN, *extra,
                "--output", str(tmp_path / f"{name}.json"), "--output-dir", str(tmp_path / name), *more]

    script.main(args("reference"))
    for number, step in enumerate(CUTS):
        signal_at["step"] = step
        with pytest.raises(errors.Interrupted):
            script.main(args("run", *(["--resume"] if number else [])))
        assert training.latest_checkpoint(tmp_path / "run").endswith(f"checkpoint-{step}")
    signal_at["step"] = None
    script.main(args("run", "--resume"))

    expected = json.loads((tmp_path / "reference.json").read_text())
    result = json.loads((tmp_path / "run.json").read_text())
    assert result["train_examples"] == expected["train_examples"] == 8  # the epochs the cuts were placed in
    assert result["optimizer_steps"] == expected["optimizer_steps"] == 8
    assert result["resumed_from"].endswith(f"checkpoint-{CUTS[-1]}")
    measured = lambda run: (run["perplexity"], run["best_validation_loss"])  # noqa: E731
    assert measured(result) == pytest.approx(measured(expected), rel=1e-6, abs=0)
    # The perplexity is that of the best checkpoint, which may come from the first epoch (before a wrong order
    # would show), so the last checkpoint's weights (the adapter, or every weight) and validation loss are
    # compared too.
    last = lambda run: tmp_path / run / "checkpoint-8"  # noqa: E731
    torch.testing.assert_close(saved_weights(last("run")), saved_weights(last("reference")), rtol=1e-6, atol=1e-9)
    assert last_validation_loss(last("run")) == pytest.approx(last_validation_loss(last("reference")), rel=1e-6)


def last_validation_loss(checkpoint):
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return [entry["eval_loss"] for entry in history if "eval_loss" in entry][-1]


def saved_weights(folder):
    return {name: tensor for path in sorted(folder.glob("*.safetensors")) for name, tensor in load_file(path).items()}


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
