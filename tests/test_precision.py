"""Every method scored alike (lvf.precision): one evaluation dtype and one attention implementation for the base
model, LoRA, QLoRA and full fine-tuning; flash-attn refused before any training where a run would reach it in
float32."""

import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

import evaluate_base_model
import finetune
import full_finetune
from lvf import errors, full, lora, models, precision, preflight, settings, training

FLASH = ["--attn-implementation", "flash_attention_2"]


@pytest.fixture
def on_cuda(monkeypatch):
    """A CUDA machine with flash-attn installed, stood in for on this CPU: the runtimes resolve as they would there."""
    monkeypatch.setattr(settings, "resolve_device", lambda: "cuda")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: SimpleNamespace(name=name) if name == "flash_attn" else real(name, *rest))
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def resolved(module, argv):
    args = module.parse_args(argv)
    if module is evaluate_base_model:
        return args, settings.evaluation_runtime(args, "base"), "base"
    method, runtime = (lora if module is finetune else full).resolve_runtime(args)
    return args, runtime, method


@pytest.mark.parametrize("module, argv", [(evaluate_base_model, []), (finetune, []),
                                          (finetune, ["--quantize", "4bit"]), (full_finetune, [])])
def test_on_cuda_every_method_is_scored_in_bfloat16_and_flash_attn_is_accepted(on_cuda, module, argv):
    args, runtime, method = resolved(module, [*argv, *FLASH])
    assert runtime.eval_dtype == torch.bfloat16 and runtime.record()["eval_dtype"] == "bfloat16"
    assert precision.scoring_problem(args, runtime, method) is None
    precision.check_scoring(args, runtime, method)


@pytest.mark.parametrize("module", [evaluate_base_model, finetune, full_finetune])
def test_flash_attn_scoring_in_float32_is_refused_in_one_line_naming_the_fix(on_cuda, module):
    args, runtime, method = resolved(module, [*FLASH, "--eval-dtype", "float32"])
    problem = precision.scoring_problem(args, runtime, method)
    assert problem == ("--attn-implementation flash_attention_2 computes in bfloat16 or float16 only: this run would "
                       "be scored in float32 (--eval-dtype float32): pass --eval-dtype bfloat16, or "
                       "--attn-implementation sdpa")
    with pytest.raises(errors.UsageError, match="pass --eval-dtype bfloat16"):
        precision.check_scoring(args, runtime, method)
    # The dry run's pre-flight shows it as a problem, beside the package check that passes.
    found = [finding.text for finding in preflight.package_findings(args, runtime, method)
             if finding.level == "problem"]
    assert found == [problem]


def test_flash_attn_training_fp32_weights_without_autocast_is_refused(on_cuda):
    args, runtime, method = resolved(full_finetune, [*FLASH, "--bf16-autocast", "off"])
    assert "trains float32 weights without autocast: pass --bf16-autocast on" in precision.scoring_problem(
        args, runtime, method)


def test_a_flash_attn_full_run_scored_in_float32_stops_before_anything_loads(tmp_path, monkeypatch, tiny_llama_dir,
                                                                             records_path):
    """On this CPU the evaluation dtype is float32: with flash-attn (stood in for) the run used to train, then die
    scoring; now it stops before the data, the tokenizer or the model load."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: SimpleNamespace(name=name) if name == "flash_attn" else real(name, *rest))
    monkeypatch.setattr(models, "load_tokenizer", lambda *a, **k: pytest.fail("loaded the tokenizer"))
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(errors.UsageError, match="would be scored in float32 .* pass --eval-dtype bfloat16"):
        full_finetune.main(["--model", str(tiny_llama_dir), "--dataset", str(records_path), *FLASH,
                            "--output-dir", str(tmp_path / "full"), "--output", str(tmp_path / "full.json")])
    assert not (tmp_path / "full").exists()


def test_the_fully_fine_tuned_model_is_scored_as_a_copy_in_the_eval_dtype(tiny_llama_dir):
    """As the saved model loads in bf16: every weight rounded to bf16, the rotary embedding's inv_freq left in fp32
    (from_pretrained computes it in fp32 whatever the dtype; module.to(bfloat16) would round it)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    deployed = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    trainer = SimpleNamespace(model_wrapped=model,
                              accelerator=SimpleNamespace(unwrap_model=lambda m, keep_fp32_wrapper=True: m))
    runtime = settings.Runtime(device="cpu", dtype=torch.float32, experiment="x", output=None,
                               eval_dtype=torch.bfloat16)
    scored = training.scored_in_eval_dtype(trainer, runtime)
    for (name, tensor), (_, expected) in zip([*scored.named_parameters(), *scored.named_buffers()],
                                             [*deployed.named_parameters(), *deployed.named_buffers()], strict=True):
        assert tensor.dtype == expected.dtype and torch.equal(tensor, expected), name


@pytest.mark.slow  # trains the tiny Llama two steps through full_finetune.py
def test_a_full_run_saves_fp32_weights_and_is_scored_in_the_eval_dtype(tmp_path, tiny_llama_dir, records_path):
    full_finetune.main(["--model", str(tiny_llama_dir), "--dataset", str(records_path), "--eval-dtype", "bfloat16",
                        "--max-train-samples", "8", "--max-val-samples", "2", "--max-eval-samples", "4",
                        "--max-length", "128", "--batch-size", "2", "--max-steps", "2", "--general-file", "",
                        "--bootstrap-resamples", "10", "--output-dir", str(tmp_path / "full"),
                        "--output", str(tmp_path / "full.json")])
    result = json.loads((tmp_path / "full.json").read_text())
    assert result["eval_dtype"] == result["runtime"]["eval_dtype"] == "bfloat16" and result["dtype"] == "float32"
    assert result["eval_precision"]["weights"] == ["bfloat16"]
    with safe_open(tmp_path / "full" / "final" / "model.safetensors", "pt") as saved:
        assert {saved.get_slice(key).get_dtype() for key in saved.keys()} == {"F32"}  # saved before the cast
