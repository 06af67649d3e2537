"""bench/gpu_check.py --tiny on the CPU: the GPU check's code runs, trains with the kit's own Trainer setup, and
reports what it promises, without datasets or bitsandbytes under transformers 5.17.0 (the oldest it supports), which
`make test`'s setup installs into .venv-tf517 to shadow the pinned one on PYTHONPATH. Under the pinned transformers
the same report is checked by tests/test_gpu_smoke.py, whose CPU dry run ends with this check."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

import common
from lvf import plan, settings

# bench/ is no package: its script, loaded from its file for the cheap test of its skip.
_spec = importlib.util.spec_from_file_location("gpu_check", common.PROJECT_DIR / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)

GPU_IMAGE_TRANSFORMERS = common.PROJECT_DIR / ".venv-tf517"  # see requirements-tf517.txt and the Makefile
# Make `import datasets` and `import bitsandbytes` fail, as on a machine without them, then run the script.
RUN_WITHOUT_DATASETS = (
    "import runpy, sys; sys.modules['datasets'] = None; sys.modules['bitsandbytes'] = None; "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def run_tiny_check(tmp_path, python_path):
    output = tmp_path / "gpu_check.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "OUT": str(tmp_path / "unused")}
    env["PYTHONPATH"] = str(python_path)
    script = common.PROJECT_DIR / "bench" / "gpu_check.py"
    command = [sys.executable, "-c", RUN_WITHOUT_DATASETS, str(script), "--tiny", "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(output.read_text())


@pytest.mark.slow  # runs the scripts end to end; `pytest -m 'not slow'` skips it
@pytest.mark.subprocess  # trains, in bench/gpu_check.py's own process
def test_tiny_gpu_check_trains_with_the_kits_trainer_and_reports_under_transformers_5_17(tmp_path):
    if not (GPU_IMAGE_TRANSFORMERS / "transformers").is_dir():
        pytest.skip(f"{GPU_IMAGE_TRANSFORMERS} missing: `make test` installs it (requirements-tf517.txt)")
    check_tiny_report(run_tiny_check(tmp_path, GPU_IMAGE_TRANSFORMERS), "5.17.0")


def check_tiny_report(report, transformers_version):
    """What `bench/gpu_check.py --tiny` must report; transformers_version "pinned" is requirements.txt's."""
    imported = report["versions"]["transformers_imported"]
    if transformers_version == "pinned":
        assert imported == common_transformers_pin()
    else:
        assert imported == transformers_version  # the shadowing worked: 5.17's code ran, not the pinned one
    assert report["tiny"] is True and report["device"] == "cpu"
    assert report["sequence_length"] == 64 and report["batch_size"] == 2
    assert {(r["method"], r["gpu"]) for r in report["references"]} == {
        ("lora", "RTX 4090"), ("lora", "RTX A6000"), ("full", "RTX 4090"), ("full", "RTX A6000")}
    lora, full = report["results"]["lora"], report["results"]["full"]
    assert lora["trainable_params"] < lora["total_params"] and full["trainable_params"] == full["total_params"]
    assert (lora["learning_rate"], full["learning_rate"]) == (2e-4, 1e-5)  # the scripts' own defaults
    for result in (lora, full):
        # The optimizer the Trainer builds for the kit on the CPU (with or without bitsandbytes): not fused, no
        # weight decay.
        assert result["optimizer"] == "adamw_torch"
        assert result["optimizer_built"]["class"] == "torch.optim.adamw.AdamW"
        assert result["optimizer_built"]["weight_decay"] == 0.0 and not result["optimizer_built"]["fused"]
        assert result["gradient_checkpointing"] == "use_reentrant=False"
        # 5.17's Llama takes logits_to_keep as 1-D positions only; the kit's collator must have noticed.
        assert result["logits_to_keep"] == ("positions" if transformers_version == "5.17.0" else "mask")
        assert result["optimizer_steps"] == 3 and result["timed_steps"] == 2 and len(result["losses"]) == 3
        assert result["scored_tokens"] == 3 * 2 * 63  # every target of every row, counted by MeasuredTrainer
        assert result["tokens_per_second"] == pytest.approx(2 * 64 * 2 / sum(result["step_seconds"]))
        # The epoch estimate is one dolly-15k epoch's input tokens at the measured speed.
        assert result["estimated_epoch_hours"] == pytest.approx(12_834 * 342 / result["tokens_per_second"] / 3600)
        assert all(math.isfinite(loss) for loss in [*result["losses"], result["loss_before"], result["loss_after"]])
        # Training changed the model: the watched weights moved and the loss on the trained batch changed.
        assert result["probe_change_norm"] > 0 and result["probe_changed_fraction"] > 0.5
        assert result["loss_after"] != result["loss_before"]
        assert result["max_memory_allocated_bytes"] is None and result["peak_rss_bytes"] > 0
    assert "lora_B" in lora["probe_parameter"]  # starts at zero: any change is LoRA training
    # The plan (computed) beside the measurement, for this check's own rows: 2 x 64 tokens, no accumulation.
    for result in (lora, full):
        planned = result["planned_memory"]
        assert (planned["setup"]["micro_batch"], planned["setup"]["max_length"], planned["setup"]["grad_accum"]) == (
            2, 64, 1)
        assert planned["total"] == sum(planned[part] for part in ("weights", "gradients", "optimizer_states",
                                                                  "optimizer_temporary", "autocast_copies",
                                                                  "gathered_weights", "activations"))
        assert planned["device_total_bytes"] is None and result["planned_over_measured"] is None  # no CUDA here
    assert full["planned_memory"]["weights"] == 4 * full["total_params"]  # fp32 on the CPU


def common_transformers_pin():
    pins = (common.PROJECT_DIR / "requirements.txt").read_text().splitlines()
    return next(line.split("==")[1] for line in pins if line.startswith("transformers=="))


def test_on_a_24_gb_gpu_full_fine_tuning_is_skipped_by_its_plan_not_failed(monkeypatch):
    """A 24 GB card stood in for: full fine-tuning's plan exceeds it before anything is built on it."""
    card = 24 * 10**9
    monkeypatch.setattr(settings, "resolve_device", lambda: "cuda")
    monkeypatch.setattr(plan, "cuda_device", lambda: (card, "NVIDIA L4"))
    args = gpu_check.parse_args([])
    script_args = gpu_check.script_settings(args, "full", "unused")
    _, runtime = gpu_check.METHODS["full"].resolve_runtime(script_args)
    planned = gpu_check.planned_memory(args, "full", script_args, runtime,
                                       gpu_check.build_model(args, "full", script_args, runtime, device="meta"))
    reason = gpu_check.skip_reason(planned)
    assert reason == (f"skipped: the plan needs {plan.gib(planned['total'])} GiB, more than this GPU's "
                      f"{plan.gib(card)} GiB (NVIDIA L4)")
    assert planned["weights"] == 4 * 8_030_261_248  # fp32 master weights alone exceed the card
    report = {"results": {"full": {"skipped": reason, "planned_memory": planned},
                          "lora": {"losses": [2.0, 1.5]}}}
    assert gpu_check.failed_methods(report) == []
    report["results"]["lora"] = {"error": "OutOfMemoryError: CUDA out of memory"}
    assert gpu_check.failed_methods(report) == ["lora"]
