"""Full fine-tuning keeps its updates: at lr 1e-5 an AdamW step is far below half a bf16 step of a typical weight,
so weights held in bf16 lose most of them. The default on CUDA is fp32 master weights with bf16 autocast."""

import json

import pytest
import torch
from safetensors.torch import load_file

import full_finetune
from lvf import settings

pytestmark = pytest.mark.slow  # trains the tiny model twice through full_finetune.py


def cuda_default_runtime(monkeypatch, argv=()):
    """What full_finetune.py resolves on a CUDA machine, worked out on this one."""
    monkeypatch.setattr(settings, "resolve_device", lambda: "cuda")
    return settings.training_runtime(full_finetune.parse_args(list(argv)), "full", "adamw_torch")


def test_cuda_default_is_fp32_master_weights_with_bf16_autocast(monkeypatch):
    runtime = cuda_default_runtime(monkeypatch)
    assert runtime.dtype == torch.float32 and runtime.bf16_autocast
    assert runtime.record()["dtype"] == "float32"


def weight_change(tmp_path, name, tiny_llama_dir, records_path, precision):
    """Every weight's change after ten steps at lr 1e-5, flattened, in fp32."""
    output_dir = tmp_path / name
    full_finetune.main(["--model", str(tiny_llama_dir), "--dataset", str(records_path), *precision,
                        "--learning-rate", "1e-5", "--max-steps", "10", "--eval-steps", "10",
                        "--max-train-samples", "8", "--max-val-samples", "2", "--max-eval-samples", "2",
                        "--max-length", "256", "--batch-size", "2", "--grad-accum", "1", "--general-file", "",
                        "--output-dir", str(output_dir), "--output", str(tmp_path / f"{name}.json")])
    before = load_file(tiny_llama_dir / "model.safetensors")
    after = load_file(output_dir / "final" / "model.safetensors")
    return torch.cat([(after[key].float() - before[key].float()).flatten() for key in sorted(before)])


def test_default_precision_keeps_the_fp32_runs_updates(tmp_path, monkeypatch, tiny_llama_dir, records_path):
    runtime = cuda_default_runtime(monkeypatch)
    monkeypatch.undo()  # train on this machine's CPU, with the precision the CUDA default resolved to
    cuda_precision = ["--dtype", settings.dtype_name(runtime.dtype), "--bf16-autocast", "on"]
    reference = weight_change(tmp_path, "fp32", tiny_llama_dir, records_path, ["--bf16-autocast", "off"])
    default = weight_change(tmp_path, "default", tiny_llama_dir, records_path, cuda_precision)

    cosine = torch.nn.functional.cosine_similarity(default, reference, dim=0).item()
    assert cosine > 0.9, f"cosine {cosine:.3f} with {cuda_precision}"
    recorded = json.loads((tmp_path / "default.json").read_text())["runtime"]
    assert (recorded["dtype"], recorded["bf16_autocast"]) == (settings.dtype_name(runtime.dtype), True)
