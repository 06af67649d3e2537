"""Full fine-tuning keeps its updates: at lr 1e-5 an AdamW step is far below half a bf16 step of a typical weight,
so weights held in bf16 lose most of them. The default on CUDA is fp32 master weights with bf16 autocast and paged
8-bit AdamW stepped in backward on every GPU, whatever its memory, so that no fp32 gradients are held and every card
runs the same update (docs/performance.md, "Full fine-tuning on one 80 GB GPU", "One recipe on every card")."""

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import full_finetune
from lvf import errors, full, settings, training

GIB = 2**30


def cuda_default_runtime(monkeypatch, gpu_gib, argv=()):
    """What full_finetune.py resolves on a CUDA machine with one GPU of gpu_gib GiB, worked out on this one."""
    monkeypatch.setattr(settings, "resolve_device", lambda: "cuda")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index=None: SimpleNamespace(total_memory=int(gpu_gib * GIB), name="stand-in GPU"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return full.resolve_runtime(full_finetune.parse_args(list(argv)))[1]


def training_arguments_here(runtime):
    """The Trainer's arguments for the default flags and this runtime, built on this machine's CPU."""
    return training.training_arguments(full_finetune.parse_args([]), dataclasses.replace(runtime, device="cpu"), 100)


@pytest.mark.parametrize("gpu_gib", [79.1, 139.8])  # an 80 GB A100 or H100 reports about 79 GiB; an H200 139.8
def test_on_every_gpu_the_default_is_fp32_master_weights_stepped_in_backward_unclipped(monkeypatch, gpu_gib):
    runtime = cuda_default_runtime(monkeypatch, gpu_gib)
    assert runtime.dtype == torch.float32 and runtime.bf16_autocast
    assert (runtime.optimizer, runtime.optimizer_in_backward, runtime.max_grad_norm) == ("paged_adamw_8bit", True, 0)
    assert (runtime.record()["optimizer_in_backward"], runtime.record()["max_grad_norm"]) == (True, 0)  # recorded
    args = training_arguments_here(runtime)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.max_grad_norm) == (4, 1, 0)


def test_the_step_after_backward_is_asked_for_and_clips_and_cpus_keep_it(monkeypatch):
    runtime = cuda_default_runtime(monkeypatch, 139.8, ["--optim-in-backward", "off"])
    assert (runtime.dtype, runtime.optimizer, runtime.optimizer_in_backward, runtime.max_grad_norm) == (
        torch.float32, "paged_adamw_8bit", False, 1.0)
    assert training_arguments_here(runtime).max_grad_norm == 1.0
    monkeypatch.undo()
    runtime = full.resolve_runtime(full_finetune.parse_args([]))[1]
    assert (runtime.device, runtime.optimizer, runtime.optimizer_in_backward, runtime.max_grad_norm) == (
        "cpu", "adamw_torch", False, 1.0)


def test_gradient_accumulation_with_the_step_in_backward_is_refused_with_the_fix(monkeypatch):
    with pytest.raises(errors.UsageError, match="pass --batch-size 4 --grad-accum 1 .* or --optim-in-backward off"):
        cuda_default_runtime(monkeypatch, 139.8, ["--batch-size", "2", "--grad-accum", "2"])
    runtime = cuda_default_runtime(monkeypatch, 79.1, ["--grad-accum", "2", "--optim-in-backward", "off"])
    assert not runtime.optimizer_in_backward
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(errors.UsageError, match="single process"):
        monkeypatch.setattr(settings, "resolve_device", lambda: "cpu")
        full.resolve_runtime(full_finetune.parse_args(["--optim-in-backward", "on"]))


def test_the_step_in_backward_is_the_optimizers_own_step_and_frees_every_gradient():
    """Same weights as AdamW stepped after backward (no accumulation, no clipping), no gradient left, and the
    gradients' global norm kept for the logs."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    reference = torch.nn.Sequential(*(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)))
    reference.load_state_dict(model.state_dict())
    in_backward = training.OptimizerInBackward()
    in_backward.attach(torch.optim.AdamW(model.parameters(), lr=1e-2), model.parameters())
    after_backward = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    for _ in range(3):
        inputs = torch.randn(5, 8)
        model(inputs).square().mean().backward()
        assert all(parameter.grad is None for parameter in model.parameters())
        reference(inputs).square().mean().backward()
        expected_norm = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()])
        after_backward.step()
        after_backward.zero_grad()
        torch.testing.assert_close(in_backward.take_grad_norm(), expected_norm)
        for parameter, expected in zip(model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(parameter, expected, rtol=0, atol=0)
    in_backward.detach()
    model(torch.randn(5, 8)).sum().backward()  # detached: gradients stay, nothing is stepped
    assert all(parameter.grad is not None for parameter in model.parameters())


@pytest.fixture(scope="module")
def bf16_tiny_llama_dir(tmp_path_factory, tiny_llama_dir):
    """The tiny Llama stored in bf16, as Llama 3's own weights are: loading it in bf16 rounds nothing, so what a
    bf16 run loses is its updates, not the initial cast."""
    folder = tmp_path_factory.mktemp("tiny-llama-bf16")
    for item in tiny_llama_dir.iterdir():
        if item.name != "model.safetensors":
            (folder / item.name).write_bytes(item.read_bytes())
    weights = load_file(tiny_llama_dir / "model.safetensors")
    save_file({key: tensor.to(torch.bfloat16) for key, tensor in weights.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    return folder


def weight_change(output_dir, model_dir, records_path, precision):
    """Every weight's change after ten steps at lr 1e-5, flattened, in fp32, and the run's results."""
    full_finetune.main(["--model", str(model_dir), "--dataset", str(records_path), *precision,
                        "--learning-rate", "1e-5", "--max-steps", "10", "--eval-steps", "10",
                        "--max-train-samples", "8", "--max-val-samples", "2", "--max-eval-samples", "2",
                        "--max-length", "256", "--batch-size", "2", "--grad-accum", "1", "--general-file", "",
                        "--bootstrap-resamples", "10",
                        "--output-dir", str(output_dir), "--output", str(output_dir.with_suffix(".json"))])
    before = load_file(model_dir / "model.safetensors")
    after = load_file(output_dir / "final" / "model.safetensors")
    change = torch.cat([(after[key].float() - before[key].float()).flatten() for key in sorted(before)])
    return change, json.loads(output_dir.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory, bf16_tiny_llama_dir, records_path):
    """The pure fp32 run: fp32 weights and compute, AdamW stepped after backward."""
    folder = tmp_path_factory.mktemp("fp32-run") / "fp32"
    return weight_change(folder, bf16_tiny_llama_dir, records_path, ["--dtype", "float32", "--bf16-autocast", "off",
                                                                     "--optim", "adamw_torch"])


def default_precision(monkeypatch, dtype=None):
    """The flags that make this CPU train as the default does on an 80 GB GPU (dtype: that one changed)."""
    runtime = cuda_default_runtime(monkeypatch, 79.1)
    monkeypatch.undo()
    on_off = lambda enabled: "on" if enabled else "off"  # noqa: E731
    return ["--dtype", dtype or settings.dtype_name(runtime.dtype), "--bf16-autocast", on_off(runtime.bf16_autocast),
            "--gradient-checkpointing", on_off(runtime.gradient_checkpointing),
            "--optim", runtime.optimizer, "--optim-in-backward", on_off(runtime.optimizer_in_backward)]


def cosine(change, reference):
    return torch.nn.functional.cosine_similarity(change, reference, dim=0).item()


@pytest.mark.slow  # trains the tiny model through full_finetune.py (with fp32_run: twice)
def test_the_default_keeps_the_fp32_runs_updates(tmp_path, monkeypatch, bf16_tiny_llama_dir, records_path, fp32_run):
    precision = default_precision(monkeypatch)
    change, result = weight_change(tmp_path / "default", bf16_tiny_llama_dir, records_path, precision)
    reference, reference_result = fp32_run

    assert cosine(change, reference) >= 0.99, f"cosine {cosine(change, reference):.4f} with {precision}"
    recorded = result["runtime"]
    assert (recorded["dtype"], recorded["bf16_autocast"], recorded["gradient_checkpointing"], recorded["optimizer"],
            recorded["optimizer_in_backward"]) == ("float32", True, True, "paged_adamw_8bit", True)
    # The logged gradient norm is the real one (the Trainer, finding no gradients left, would log 0).
    norms = [[entry["grad_norm"] for entry in run["log_history"] if "grad_norm" in entry]
             for run in (result, reference_result)]
    assert norms[0] and norms[0] == pytest.approx(norms[1], rel=0.05)


@pytest.mark.slow
def test_the_same_check_fails_for_plain_bf16_weights(tmp_path, monkeypatch, bf16_tiny_llama_dir, records_path,
                                                     fp32_run):
    precision = default_precision(monkeypatch, dtype="bfloat16")
    change, result = weight_change(tmp_path / "bf16", bf16_tiny_llama_dir, records_path, precision)
    assert result["runtime"]["dtype"] == "bfloat16"
    assert cosine(change, fp32_run[0]) < 0.99
