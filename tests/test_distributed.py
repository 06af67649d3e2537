"""Two processes under `accelerate launch` (DDP over gloo, CPU): one results file, from the main process,
with the same parameter counts as one process and the token count of the whole training set."""

import json
import os
import socket
import subprocess
import sys

import pytest

import common
import finetune
from lvf import lora, models

# 8 sampled demo records, all of which fit 384 tokens: 2 processes x batch 2 x 2 steps, so the launcher pads
# nothing and one epoch trains on every example exactly once.
RUN = ["--general-file", "",  # no forgetting measure: not what this test checks
       "--max-train-samples", "8", "--max-val-samples", "2", "--max-eval-samples", "4", "--max-length", "384",
       "--batch-size", "2", "--eval-batch-size", "4", "--learning-rate", "1e-2"]
CONFIGS = common.PROJECT_DIR / "configs"


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow  # trains, in two processes started by accelerate launch
@pytest.mark.subprocess
def test_lora_on_two_processes_writes_one_result_with_global_counts(tmp_path, tiny_llama_dir, records_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = ["--model", str(tiny_llama_dir), "--dataset", str(records_path), *RUN]
    # On a machine without GPUs, --multi_gpu starts the processes with torchrun and they join over gloo.
    # (`--cpu --num_processes 2` would start a single process: accelerate's CPU launcher needs mpirun.)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([*launch, str(common.PROJECT_DIR / "finetune.py"), *args,
                             "--output", str(tmp_path / "lora.json"), "--output-dir", str(tmp_path / "lora")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote") == 1  # the main process alone reports and writes
    assert sorted(item.name for item in tmp_path.iterdir()) == ["lora", "lora.json"]  # no history/: written once
    ddp = json.loads((tmp_path / "lora.json").read_text())

    # What one process would count, worked out here from the same arguments.
    parsed = finetune.parse_args(args)
    tokenizer = common.setup_tokenizer(AutoTokenizer.from_pretrained(tiny_llama_dir))
    train_records, val_records, eval_records = common.load_splits(parsed)
    examples, _ = common.tokenize_splits(tokenizer, parsed.max_length, train=train_records, eval=eval_records)
    assert len(examples["train"]) == 8
    trainable, total = models.count_parameters(
        lora.add_adapters(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), parsed))
    assert (ddp["trainable_params"], ddp["total_params"]) == (trainable, total)
    assert ddp["base_params"] == total - trainable
    assert ddp["train_examples"] == 8 and ddp["optimizer_steps"] == 2  # the examples split over 2 processes
    assert ddp["train_tokens"] == sum(sum(label != common.IGNORE_INDEX for label in example["labels"][1:])
                                      for example in examples["train"])

    # The reported perplexity is the saved adapter's on the whole evaluation set.
    assert ddp["eval_examples"] == len(examples["eval"])
    final = tmp_path / "lora" / "final"
    assert list(final.glob("*.safetensors")) and not list(final.glob("*.bin"))  # no pickles
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), final)
    again = common.evaluate_perplexity(model, examples["eval"], tokenizer.pad_token_id, batch_size=4)
    assert again["perplexity"] == pytest.approx(ddp["perplexity"], rel=1e-4)


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.stem)
def test_shipped_accelerate_configs_load(config):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(config))
    assert loaded.num_machines == 1 and loaded.mixed_precision == "bf16"
    if loaded.distributed_type == "FSDP":
        assert loaded.fsdp_config["fsdp_reshard_after_forward"] == "FULL_SHARD"
        assert loaded.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
        assert loaded.fsdp_config["fsdp_activation_checkpointing"] is True
