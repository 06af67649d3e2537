"""Output a user reads is signal: a run shows no deprecation warning caused by the kit's own calls, and no notice
about what the kit itself chose."""

import os
from pathlib import Path

import pytest

import finetune


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_training_shows_no_checkpointing_deprecation_or_pad_token_notice(method, trained_run):
    # The session's runs (tests/conftest.py, TRAINED_RUNS) record every warning with the filters reset to "always",
    # and the transformers logger's warnings; LoRA and QLoRA with gradient checkpointing on, full with it off.
    run = trained_run(method)
    deprecations = [f"{item['categories'][0]}: {item['message']}" for item in run.warnings
                    if {"FutureWarning", "DeprecationWarning"} & set(item["categories"])
                    and "checkpointing" in item["message"]]
    assert deprecations == []
    # The pad id the kit gives the tokenizer is in the model's configs already: no alignment notice from the Trainer.
    assert not [message for message in run.notices if "The tokenizer has new PAD/BOS/EOS tokens" in message]


@pytest.mark.subprocess
def test_saving_an_adapter_whose_base_is_a_preset_name_does_not_warn(tiny_llama_dir):
    """In a process of its own, as a script runs: pytest resets warning filters set at import time."""
    import subprocess
    import sys

    code = f"""
import finetune
from peft import get_peft_model_state_dict
from transformers import AutoModelForCausalLM
from lvf import adapters, lora
model = adapters.add_adapters(AutoModelForCausalLM.from_pretrained({str(tiny_llama_dir)!r}),
                              lora.default_lora_config(), "q_proj")
model.peft_config["default"].base_model_name_or_path = "smollm2-135m"  # as lora.add_adapters names it
get_peft_model_state_dict(model)
print("saved")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(finetune.__file__).parent, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.stdout.strip() == "saved", done.stderr[-2000:]
    assert "Could not find a config file" not in done.stderr
