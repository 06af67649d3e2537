"""One experiment on any node: a script started directly where several GPUs are visible trains on one GPU, says
which, and schedules its steps from the batch the Trainer really takes (lvf.training.on_one_gpu)."""

import dataclasses

import pytest
import torch

import finetune
import full_finetune
from lvf import full, lora, settings, training


def arguments_on(monkeypatch, tmp_path, gpus, module=finetune, argv=()):
    """The Trainer's arguments of the script's defaults on one CUDA process that sees `gpus` GPUs (stood in for on
    this CPU: transformers' _setup_devices asks torch.cuda for the count and sets cuda:0 current), for dolly-15k's
    12,834 training examples."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Stand-in H100")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = module.parse_args([*argv, "--output-dir", str(tmp_path / "out")])
    _, runtime = (lora if module is finetune else full).resolve_runtime(args, device="cuda")
    # bf16 and checkpointing would ask this CPU build of torch about the GPU; neither changes the schedule.
    runtime = dataclasses.replace(runtime, bf16_autocast=False, gradient_checkpointing=False)
    return training.training_arguments(args, runtime, 12_834)


@pytest.mark.parametrize("module", [finetune, full_finetune])
def test_eight_visible_gpus_train_one_run_on_one_gpu_with_one_gpus_schedule(monkeypatch, tmp_path, capsys, module):
    one = arguments_on(monkeypatch, tmp_path, 1, module)
    eight = arguments_on(monkeypatch, tmp_path, 8, module)
    # No DataParallel (Trainer._wrap_model wraps when n_gpu > 1) and batch 4, not 32.
    assert (eight.n_gpu, eight.train_batch_size, str(eight.device)) == (1, 4, "cuda:0")
    assert training.examples_per_step(eight) == 4
    # 3,209 steps of 4 examples: warm-up and validation as on one GPU (not 24% warm-up, one validation per epoch).
    schedule = lambda a: (a.warmup_steps, a.eval_steps, a.save_steps, a.logging_steps)  # noqa: E731
    assert schedule(eight) == schedule(one) == (96, 642, 642, 10)
    said = capsys.readouterr().err
    assert "8 GPUs visible to one process: training on one, cuda:0 (Stand-in H100" in said
    assert "accelerate launch --num_processes 8" in said and "study.py --workers 8" in said


def test_the_schedule_follows_the_batch_the_trainer_takes(monkeypatch, tmp_path):
    arguments = arguments_on(monkeypatch, tmp_path, 1, finetune, ["--batch-size", "2", "--grad-accum", "2"])
    assert training.examples_per_step(arguments) == 4
    assert training.optimizer_steps(settings.freeze(settings.argparse.Namespace(max_steps=-1, num_epochs=2.0)),
                                    12_834, training.examples_per_step(arguments)) == 2 * 3_209


@pytest.mark.parametrize("visible, pinned", [(None, "0"), ("3,5", "3"), ("GPU-abc", "GPU-abc")])
def test_gpu_check_sh_pins_one_gpu(tmp_path, visible, pinned):
    import os
    import subprocess
    from pathlib import Path

    stand_in = tmp_path / "python"  # stands in for the interpreter: says what CUDA would be shown
    stand_in.write_text('#!/bin/sh\necho "CUDA sees: $CUDA_VISIBLE_DEVICES"\n')
    stand_in.chmod(0o755)
    env = {key: value for key, value in os.environ.items() if key != "CUDA_VISIBLE_DEVICES"}
    env.update({"PYTHON": str(stand_in), **({"CUDA_VISIBLE_DEVICES": visible} if visible is not None else {})})
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(f"CUDA sees: {pinned}\n") == 2  # the version line and the check itself
