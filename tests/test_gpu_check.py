"""bench/gpu_check.py --tiny on the CPU: the GPU check's code runs, trains, and reports what it promises,
without datasets or bitsandbytes (which a GPU machine may lack)."""

import json
import math
import os
import subprocess
import sys

import pytest

import common

pytestmark = pytest.mark.slow  # runs the scripts end to end; `pytest -m 'not slow'` skips it

# Make `import datasets` and `import bitsandbytes` fail, as on a machine without them, then run the script.
RUN_WITHOUT_DATASETS = (
    "import runpy, sys; sys.modules['datasets'] = None; sys.modules['bitsandbytes'] = None; "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def test_tiny_gpu_check_trains_and_reports(tmp_path):
    output = tmp_path / "gpu_check.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "OUT": str(tmp_path / "unused")}
    script = common.PROJECT_DIR / "bench" / "gpu_check.py"
    command = [sys.executable, "-c", RUN_WITHOUT_DATASETS, str(script), "--tiny", "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())

    assert report["tiny"] is True and report["device"] == "cpu"
    assert report["sequence_length"] == 64 and report["batch_size"] == 2
    assert {(r["method"], r["gpu"]) for r in report["references"]} == {
        ("lora", "RTX 4090"), ("lora", "RTX A6000"), ("full", "RTX 4090"), ("full", "RTX A6000")}
    lora, full = report["results"]["lora"], report["results"]["full"]
    assert lora["trainable_params"] < lora["total_params"] and full["trainable_params"] == full["total_params"]
    for result in (lora, full):
        assert result["optimizer"] == "adamw_torch"  # bitsandbytes is absent here
        assert result["timed_steps"] == 2 and len(result["losses"]) == 3
        assert result["tokens_per_second"] == pytest.approx(2 * 64 * 2 / sum(result["step_seconds"]))
        assert all(math.isfinite(loss) for loss in [*result["losses"], result["loss_before"], result["loss_after"]])
        # Training changed the model: the watched weights moved and the loss on the trained batch changed.
        assert result["probe_change_norm"] > 0 and result["probe_changed_fraction"] > 0.5
        assert result["loss_after"] != result["loss_before"]
        assert result["max_memory_allocated_bytes"] is None and result["peak_rss_bytes"] > 0
    assert "lora_B" in lora["probe_parameter"]  # starts at zero: any change is LoRA training
