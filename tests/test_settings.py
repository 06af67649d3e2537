"""Settings stay as given; what the run resolves is kept, and recorded, apart; each script offers only its flags."""

import dataclasses
import json
import os
import re

import pytest

import evaluate_base_model
import finetune
import full_finetune
from lvf import settings

TRAINING_FLAGS = ["--learning-rate", "--batch-size", "--grad-accum", "--max-steps", "--num-epochs", "--eval-steps",
                  "--packing", "--gradient-checkpointing", "--bf16-autocast", "--max-train-samples",
                  "--max-val-samples", "--val-fraction", "--output-dir", "--resume"]


def help_text(module, capsys):
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    return capsys.readouterr().out


def test_base_script_offers_no_training_flag(capsys):
    text = help_text(evaluate_base_model, capsys)
    assert [flag for flag in TRAINING_FLAGS if flag in text] == []
    for flag in TRAINING_FLAGS:
        assert flag in help_text(finetune, capsys)


@pytest.mark.parametrize("module", [evaluate_base_model, finetune, full_finetune])
def test_every_help_line_shows_its_default_once(module, capsys):
    text = help_text(module, capsys)
    per_flag = re.split(r"\n  (?=-)", text)
    assert per_flag and all(chunk.count("(default") <= 1 for chunk in per_flag)
    assert "(default: None)" not in text and "(default: False)" not in text


def test_each_training_script_keeps_its_own_defaults():
    lora, full = finetune.parse_args([]), full_finetune.parse_args([])
    assert (lora.learning_rate, lora.batch_size, lora.grad_accum) == (2e-4, 4, 1)
    assert (full.learning_rate, full.batch_size, full.grad_accum) == (1e-5, 4, 1)


def test_settings_cannot_be_changed_once_parsed():
    args = finetune.parse_args(["--learning-rate", "1e-3"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.learning_rate = 5.0
    runtime = settings.training_runtime(args, "lora", "adamw_torch")
    with pytest.raises(dataclasses.FrozenInstanceError):
        runtime.device = "cuda"


def test_results_record_what_was_asked_apart_from_what_was_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "runs" / "lora.json"
    finetune.main(["--dry-run", "--output", str(output), "--output-dir", str(tmp_path / "out" / "lora")])
    record = json.loads(output.read_text())
    config, runtime = record["config"], record["runtime"]
    # As asked: the choices, not what they resolved to; nothing derived mixed in.
    assert config["dtype"] == "auto" and config["bf16_autocast"] == "auto" and config["device"] == "auto"
    assert config["output_dir"] == str(tmp_path / "out" / "lora")
    assert not {"torch_dtype", "bf16", "optim"} & set(config)
    # As resolved, with paths relative to the working directory they sit in.
    assert runtime["device"] == "cpu" and runtime["optimizer"] == "adamw_torch"
    assert isinstance(runtime["bf16_autocast"], bool)
    # LoRA trains on a bf16 copy of the base where autocast is on (AMX or AVX512-BF16), and is scored in fp32.
    assert runtime["dtype"] == ("bfloat16" if runtime["bf16_autocast"] else "float32")
    assert runtime["eval_dtype"] == "float32"
    assert runtime["output"] == os.path.join("runs", "lora.json") and runtime["output_dir"] == "out/lora"
    assert record["dtype"] == runtime["dtype"] and record["bf16_autocast"] == runtime["bf16_autocast"]


def test_a_dry_run_writes_nothing_unless_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(settings, "PROJECT_DIR", tmp_path)
    full_finetune.main(["--dry-run"])
    assert "trainable 8,030,261,248 of 8,030,261,248" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
