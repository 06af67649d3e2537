"""Output a user reads is signal: a run shows no deprecation warning caused by the kit's own calls, and no notice
about what the kit itself chose."""

import logging
import os
import warnings
from pathlib import Path

import pytest

import finetune
import full_finetune

pytestmark = pytest.mark.slow  # runs the scripts end to end; `pytest -m 'not slow'` skips it

SHORT_RUN = ["--general-file", "",
             "--max-train-samples", "8", "--max-val-samples", "2", "--max-eval-samples", "4", "--max-length", "128",
             "--max-steps", "1", "--bootstrap-resamples", "10", "--batch-size", "2", "--grad-accum", "1"]
RUNS = {  # checkpointing on where it goes through another call (the Trainer's, or peft's for 4-bit)
    "lora": (finetune, ["--gradient-checkpointing", "on"]),
    "qlora": (finetune, ["--gradient-checkpointing", "on", "--quantize", "4bit"]),
    "full": (full_finetune, []),  # off: the CPU default
}


@pytest.mark.parametrize("method", RUNS)
def test_training_shows_no_checkpointing_deprecation_or_pad_token_notice(method, tmp_path, tiny_llama_64_dir,
                                                                         records_path):
    script, extra = RUNS[method]
    notices = Recorder()
    logging.getLogger("transformers").addHandler(notices)  # transformers' loggers do not reach the root one
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            script.main(["--model", str(tiny_llama_64_dir), "--dataset", str(records_path), *SHORT_RUN, *extra,
                         "--output", str(tmp_path / "results.json"), "--output-dir", str(tmp_path / "out")])
    finally:
        logging.getLogger("transformers").removeHandler(notices)
    assert (tmp_path / "results.json").is_file()
    deprecations = [f"{item.category.__name__}: {item.message}" for item in caught
                    if issubclass(item.category, (FutureWarning, DeprecationWarning))
                    and "checkpointing" in str(item.message)]
    assert deprecations == []
    # The pad id the kit gives the tokenizer is in the model's configs already: no alignment notice from the Trainer.
    assert not [message for message in notices.messages if "The tokenizer has new PAD/BOS/EOS tokens" in message]


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


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
