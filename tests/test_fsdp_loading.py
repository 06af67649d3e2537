"""configs/fsdp_full_8b.yaml on two CPU processes (accelerate launch, gloo): FSDP's cpu-ram-efficient loading
takes effect at load time, so only rank 0 reads the weights. FSDP itself needs an accelerator
(accelerate's sync_module_states asks for a CUDA/XPU/... device), so the worker stops before training."""

import json
import os
import subprocess
import sys

import pytest
from test_distributed import free_port
from transformers import AutoModelForCausalLM

import common

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]  # two processes through the script's loading path


def test_fsdp_ranks_see_fsdp_at_load_and_only_rank_0_holds_the_weights(tmp_path, tiny_llama_dir, records_path):
    launch = [sys.executable, "-m", "accelerate.commands.launch",
              "--config_file", str(common.PROJECT_DIR / "configs" / "fsdp_full_8b.yaml"),
              "--num_processes", "2", "--main_process_port", str(free_port())]
    worker = common.PROJECT_DIR / "tests" / "fsdp_load_worker.py"
    args = ["--model", str(tiny_llama_dir), "--dataset", str(records_path), "--general-file", "",
            "--max-train-samples", "8",
            "--max-val-samples", "2", "--max-eval-samples", "4", "--max-length", "256",
            "--output-dir", str(tmp_path / "full"), "--output", str(tmp_path / "full.json"),
            # the config's mixed precision (bf16) is what the sharded forward scores in (lvf.precision)
            "--eval-dtype", "bfloat16"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(common.PROJECT_DIR)}
    result = subprocess.run([*launch, str(worker), str(tmp_path), *args], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))

    whole = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    whole_bytes = sum(p.untyped_storage().nbytes() for p in whole.parameters())
    assert rank0["fsdp_enabled_at_load"] and rank1["fsdp_enabled_at_load"]
    assert rank0["parameter_bytes"] == whole_bytes and rank0["devices"] == ["cpu"]
    assert rank1["parameter_bytes"] == 0 and rank1["devices"] == ["meta"]  # FSDP fills it from rank 0
    assert rank0["numel"] == rank1["numel"] == whole.num_parameters()
