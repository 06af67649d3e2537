"""All three scripts on a tiny random Llama (real Llama 3 tokenizer) and the project's own Dolly-schema records."""

import json
import math
import os
import subprocess
import sys

import pytest

import common
from lvf import results

PROJECT_DIR = common.PROJECT_DIR


def run_script(script, *args, check=True):
    """A script as a user runs it, in a fresh Python process: it must exit 0 without a traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(PROJECT_DIR / script), *map(str, args)], capture_output=True,
                            text=True, env=env, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def runs(trained_run):
    """The session's base, LoRA and full runs (tests/conftest.py, TRAINED_RUNS), trained once for every test."""
    return {method: trained_run(method).results for method in ("base", "lora", "full")}


def test_results_follow_the_definitions(runs):
    for method, result in runs.items():
        assert result["method"] == method
        nll = sum(item["nll_sum"] for item in result["per_example"])
        tokens = sum(item["tokens"] for item in result["per_example"])
        assert result["eval_tokens"] == tokens > 0
        assert result["eval_examples"] == len(result["per_example"])
        assert result["eval_loss"] == pytest.approx(nll / tokens, rel=1e-9)
        assert result["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-9)
        low, high = result["perplexity_ci95"]
        assert low <= result["perplexity"] <= high
        assert set(results.RESULT_FIELDS) <= set(result)
        assert result["versions"]["torch"] and result["created_at"]
        assert result["truncation"]["eval"]["examples"] == 12


def test_methods_are_paired_on_the_same_examples(runs):
    ids = [sorted(item["id"] for item in result["per_example"]) for result in runs.values()]
    assert ids[0] == ids[1] == ids[2]
    token_counts = [sorted((i["id"], i["tokens"]) for i in r["per_example"]) for r in runs.values()]
    assert token_counts[0] == token_counts[1] == token_counts[2]


def test_general_text_is_scored_alike_for_every_method(runs):
    blocks = [sorted((i["id"], i["tokens"]) for i in r["general_per_example"]) for r in runs.values()]
    assert blocks[0] == blocks[1] == blocks[2] and len(blocks[0]) == 6
    assert all(tokens == 255 for _, tokens in blocks[0])  # --max-length 256: a BOS and 255 scored tokens
    for result in runs.values():
        nll = sum(item["nll_sum"] for item in result["general_per_example"])
        tokens = sum(item["tokens"] for item in result["general_per_example"])
        assert result["general_file"] == "python-docs" and result["general_eval_tokens"] == tokens
        assert result["general_perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-9)
        low, high = result["general_perplexity_ci95"]
        assert low <= result["general_perplexity"] <= high
    assert runs["full"]["general_perplexity"] != runs["base"]["general_perplexity"]


def test_training_fields_and_counts(runs):
    base, lora, full = runs["base"], runs["lora"], runs["full"]
    assert base["train_tokens"] is None and base["artifact_path"] is None and base["train_seconds"] is None
    assert base["seed_style_perplexity"] is not None
    assert lora["trainable_params"] < full["trainable_params"] == full["total_params"]
    assert lora["base_params"] == full["total_params"] == base["total_params"]
    assert lora["total_params"] == lora["base_params"] + lora["trainable_params"]
    for result in (lora, full):
        assert result["optimizer_steps"] == 4
        assert result["train_tokens"] > 0 and result["train_tokens_per_second"] > 0
        assert result["train_step_seconds"] <= result["train_seconds"]
        assert result["peak_memory_bytes"] > 0 and result["memory_kind"] == "cpu_peak_rss"
        assert result["best_checkpoint"] and result["best_validation_loss"] is not None
    # An adapter is a small fraction of a full copy of the weights.
    assert lora["artifact_bytes"] < full["artifact_bytes"] / 20
    assert full["perplexity"] < base["perplexity"]  # a few full steps fit a random model's output distribution


def test_memory_is_recorded_per_phase_and_training_is_broken_down(runs):
    for result in runs.values():
        assert result["phase_memory_kind"] == "cpu_peak_rss_since_reset" and result["phase_memory_unavailable"] is None
        assert 0 < result["load_peak_memory_bytes"] <= result["peak_memory_bytes"]
        assert 0 < result["eval_peak_memory_bytes"] <= result["peak_memory_bytes"]
        assert result["eval_precision"] == {"weights": ["float32"], "autocast": False, "log_softmax": "float32",
                                            "logits_block": common.LOGITS_BLOCK}
    for result in (runs["lora"], runs["full"]):
        assert 0 < result["train_peak_memory_bytes"] <= result["peak_memory_bytes"]
        parts = result["train_memory_breakdown"]
        assert parts["gradients"] == 4 * result["trainable_params"]  # fp32 AdamW on the CPU
        assert parts["optimizer_states"] == 8 * result["trainable_params"]
        assert parts["other"] == (result["train_peak_memory_bytes"] - sum(parts["weights_by_dtype"].values())
                                  - parts["gradients"] - parts["optimizer_states"])


@pytest.mark.parametrize("method", ["lora", "full"])
def test_saved_artifact_reproduces_the_reported_perplexity(runs, method, tiny_llama_64_dir, records_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = runs[method]
    if method == "lora":
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_64_dir)
        model = PeftModel.from_pretrained(base, result["artifact_path"])
    else:
        model = AutoModelForCausalLM.from_pretrained(result["artifact_path"])
    tokenizer = common.setup_tokenizer(AutoTokenizer.from_pretrained(result["artifact_path"]))
    wanted = {item["id"] for item in result["per_example"]}
    records = [r for r in common.load_records(str(records_path)) if r["id"] in wanted]
    examples, _ = common.tokenize_records(tokenizer, records, 256)
    again = common.evaluate_perplexity(model, examples, tokenizer.pad_token_id, batch_size=3)
    assert again["perplexity"] == pytest.approx(result["perplexity"], rel=1e-4)


@pytest.mark.subprocess
def test_eval_file_replaces_the_test_split_and_base_reads_nothing_else(tmp_path, tiny_llama_dir, records_path):
    eval_file = tmp_path / "eval.jsonl"
    lines = records_path.read_text(encoding="utf-8").splitlines()[:5]
    eval_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    output = tmp_path / "base.json"
    run_script("evaluate_base_model.py", "--model", tiny_llama_dir, "--dataset", tmp_path / "missing.jsonl",
               "--eval-file", eval_file, "--max-length", "4096", "--general-file", "", "--output", output)
    result = json.loads(output.read_text())
    assert result["eval_examples"] == 5 and result["eval_file"] == str(eval_file)


@pytest.mark.subprocess
def test_full_finetune_script_runs_from_the_command_line(tmp_path, tiny_llama_dir, records_path):
    # finetune.py's command line is run by tests/test_resume.py (a real SIGTERM, then --resume).
    output = tmp_path / "full.json"
    run_script("full_finetune.py", "--model", tiny_llama_dir, "--dataset", records_path, "--general-file", "",
               "--max-train-samples", "4", "--max-val-samples", "2", "--max-eval-samples", "2", "--max-length", "128",
               "--max-steps", "1", "--bootstrap-resamples", "10", "--output", output, "--output-dir", tmp_path / "full")
    result = json.loads(output.read_text())
    assert result["method"] == "full" and result["optimizer_steps"] == 1 and (tmp_path / "full" / "final").is_dir()
