"""QLoRA (--quantize 4bit): NF4 weights, parameter counts as if unquantised, method "qlora"."""

import json
import math

import pytest
import torch

import finetune
from lvf import adapters, errors, lora, models


def test_dry_run_for_the_8b_default_counts_like_lora(tmp_path):
    finetune.main(["--dry-run", "--quantize", "4bit", "--output", str(tmp_path / "qlora.json")])
    result = json.loads((tmp_path / "qlora.json").read_text())
    assert result["method"] == "qlora" and result["dry_run"] is True
    assert result["trainable_params"] == 13_631_488  # the same numbers as LoRA (tests/test_dry_run.py)
    assert result["total_params"] == 8_043_892_736
    assert result["base_params"] == 8_030_261_248


def test_qlora_loads_every_linear_layer_in_nf4_with_double_quantisation(tiny_llama_64_dir):
    import bitsandbytes

    model = models.load_model(str(tiny_llama_64_dir), torch.float32, "cpu",
                              quantization_config=models.four_bit_config("cpu"))
    four_bit = [module for module in model.modules() if isinstance(module, bitsandbytes.nn.Linear4bit)]
    assert len(four_bit) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    assert all(module.weight.quant_state.quant_type == "nf4" and module.weight.quant_state.nested  # double quant
               for module in four_bit)


@pytest.mark.slow
def test_qlora_trains_on_cpu_with_4bit_weights_and_unquantised_counts(trained_run, tiny_llama_64_dir):
    from conftest import TRAINED_RUNS
    from transformers import AutoModelForCausalLM

    result = trained_run("qlora").results  # finetune.py --quantize 4bit, 4 steps (tests/conftest.py)
    assert result["method"] == "qlora" and result["optimizer_steps"] == 4
    # What the run trained: the 4-bit model, prepared for training, with adapters (as the script builds it).
    args = finetune.parse_args(TRAINED_RUNS["qlora"][1])
    four_bit = models.load_model(str(tiny_llama_64_dir), torch.float32, "cpu",
                                 quantization_config=models.four_bit_config("cpu"))
    prepared = lora.add_adapters(adapters.prepare_for_4bit_training(four_bit), args)
    assert result["dtype_by_part"] == models.dtype_by_part(prepared) and "linear_4bit" in result["dtype_by_part"]
    assert math.isfinite(result["perplexity"]) and result["eval_tokens"] > 0
    # Scored as every method is (lvf.precision): the adapters on the base loaded unquantised in the evaluation dtype.
    # (a 4-bit model scored would show its packed uint8 weights here)
    assert result["eval_dtype"] == "float32" and result["eval_precision"]["weights"] == ["float32"]

    # Packed 4-bit weights hold two parameters per byte; the counts must be the unquantised model's.
    unquantised = AutoModelForCausalLM.from_pretrained(tiny_llama_64_dir)
    base_params = sum(parameter.numel() for parameter in unquantised.parameters())
    trainable, total = models.count_parameters(lora.add_adapters(unquantised, args))
    assert result["base_params"] == base_params == total - trainable
    assert (result["trainable_params"], result["total_params"]) == (trainable, total)


def test_4bit_preparation_keeps_embeddings_and_norms_in_fp32_and_results_say_so(tiny_llama_64_dir):
    """peft's prepare_model_for_kbit_training casts every weight that is not 4-bit to fp32, embeddings and
    lm_head included: the results' dtype_by_part records it, part by part."""
    quantization = models.four_bit_config("cuda")  # bf16 compute, as on a GPU; weights loaded in bf16
    model = models.load_model(str(tiny_llama_64_dir), torch.bfloat16, "cpu", quantization_config=quantization)
    assert models.dtype_by_part(model)["embed_tokens"] == "bfloat16"
    model = adapters.prepare_for_4bit_training(model)
    model = lora.add_adapters(model, finetune.parse_args([]))
    assert models.dtype_by_part(model) == {
        "linear_4bit": "nf4", "embed_tokens": "float32", "input_layernorm": "float32",
        "post_attention_layernorm": "float32", "norm": "float32", "lora_A": "float32", "lora_B": "float32"}


def test_4bit_without_bitsandbytes_is_a_clear_error(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else
                        find_spec(name, *a))
    with pytest.raises(errors.UsageError, match="--quantize 4bit needs bitsandbytes"):
        models.four_bit_config("cpu")
