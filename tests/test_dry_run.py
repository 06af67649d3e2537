"""Exact parameter counts of Llama-3-8B on the meta device, offline."""

import importlib.util
import json
import os

import evaluate_base_model
import finetune
import full_finetune
from lvf import full, lora, memory

BASE = 8_030_261_248


def run(module, tmp_path, *extra):
    output = tmp_path / "out.json"
    module.main(["--dry-run", "--output", str(output), *extra])
    return json.loads(output.read_text())


def test_lora_dry_run_counts(tmp_path):
    result = run(finetune, tmp_path)
    assert result["method"] == "lora" and result["model"] == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert result["trainable_params"] == 13_631_488
    assert result["total_params"] == 8_043_892_736
    assert result["base_params"] == BASE
    assert abs(result["trainable_percent"] - 0.16946) < 1e-4
    assert result["perplexity"] is None and result["dry_run"] is True


def test_full_dry_run_counts(tmp_path):
    result = run(full_finetune, tmp_path)
    assert result["trainable_params"] == result["total_params"] == result["base_params"] == BASE


def test_base_dry_run_counts(tmp_path):
    result = run(evaluate_base_model, tmp_path)
    assert result["trainable_params"] == 0 and result["total_params"] == BASE


def test_lora_rank_changes_the_count(tmp_path):
    # r=8 halves the adapters: a count computed from the model, not a constant.
    assert run(finetune, tmp_path, "--lora-r", "8")["trainable_params"] == 13_631_488 // 2


def test_dry_run_without_output_writes_no_file(tmp_path, monkeypatch, capsys):
    from lvf import settings

    monkeypatch.setattr(settings, "PROJECT_DIR", tmp_path)  # where results/<method>.json would go
    for module in (evaluate_base_model, finetune, full_finetune):
        module.main(["--dry-run"])
    assert not (tmp_path / "results").exists()
    assert "trainable 13,631,488 of 8,043,892,736" in capsys.readouterr().out


def test_the_memory_plans_meta_model_leaves_the_runs_random_draws_alone():
    # peft initialises adapters on the CPU even on a meta base: built before the real model, the plan's copy had
    # consumed the draws the run's own adapters get, and LoRA trained from other initial values.
    import torch

    args = finetune.parse_args([])
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    lora.meta_model(args)
    assert torch.equal(torch.rand(3), expected)


def test_a_dry_run_without_a_gpu_also_plans_the_8b_defaults_on_an_80_gb_gpu(capsys):
    # Where the run is meant to go: full fine-tuning's default there (fp32 master weights, paged 8-bit AdamW stepped
    # in backward, batch 4 x 1,024 tokens, checkpointing) must fit one 80 GB GPU with room to spare.
    from lvf import models, plan

    args = full_finetune.parse_args([])
    method, runtime = full.resolve_runtime(args)
    if runtime.device != "cpu":
        return  # a machine with a GPU plans against its own
    model = models.meta_model(models.model_config(args.model))
    planned = plan.announce_gpu_plan(args, runtime, method, model, full.resolve_runtime)
    if importlib.util.find_spec("bitsandbytes") is not None:
        assert planned["setup"]["step_in_backward"] and planned["setup"]["optimizer"] == "paged_adamw_8bit"
    assert planned["total"] <= 70 * 2**30 and planned["fits"] is True
    assert "on one 80 GB CUDA GPU these flags would plan" in capsys.readouterr().err
    assert plan.announce_gpu_plan(full_finetune.parse_args(["--device", "cpu"]), runtime, method, model,
                                  full.resolve_runtime) is None  # the CPU asked for: no GPU plan


def test_each_script_sets_expandable_segments_unless_the_user_configured_the_allocator_and_records_it(
        tmp_path, monkeypatch):
    for module in (evaluate_base_model, finetune, full_finetune):
        for name in memory.ALLOCATOR_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        assert run(module, tmp_path)["cuda_allocator_config"] == "expandable_segments:True"
        assert all(os.environ[name] == "expandable_segments:True" for name in memory.ALLOCATOR_VARIABLES)
        # The user's own setting, under either name, is kept and recorded.
        monkeypatch.delenv("PYTORCH_ALLOC_CONF")
        monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
        assert run(module, tmp_path)["cuda_allocator_config"] == "max_split_size_mb:512"
        assert "PYTORCH_ALLOC_CONF" not in os.environ


def test_the_three_8b_dry_runs_name_one_scoring_precision_and_record_it(tmp_path, capsys):
    """Every method is scored alike (lvf.precision): on this machine in its evaluation dtype, recorded in each
    result; and, beside the plan for one 80 GB GPU, in the same words for the three scripts."""
    import re

    from lvf import settings

    recorded = {module.__name__: run(module, tmp_path) for module in (evaluate_base_model, finetune, full_finetune)}
    here = settings.dtype_name(settings.resolve_eval_dtype("auto", settings.resolve_device()))
    assert {result["eval_dtype"] for result in recorded.values()} == {here}
    assert {result["runtime"]["eval_dtype"] for result in recorded.values()} == {here}
    printed = capsys.readouterr()
    findings = re.findall(r"dtype: weights in \w+(?: while training)?, scored in (\w+)", printed.out)
    assert findings == [here] * 3
    if settings.resolve_device() == "cpu":  # where the runs are meant to go
        on_gpu = re.findall(r"on one 80 GB CUDA GPU these flags would .*(scored in \w+)$", printed.err, re.M)
        assert on_gpu == ["scored in bfloat16"] * 3


def test_eval_dtype_scores_every_method_in_it_and_the_base_refuses_another_dtype(tmp_path):
    import pytest

    from lvf import errors

    for module in (evaluate_base_model, finetune, full_finetune):
        assert run(module, tmp_path, "--eval-dtype", "float16")["eval_dtype"] == "float16"
    with pytest.raises(errors.UsageError, match="--dtype bfloat16 and --eval-dtype float32 .* pass --eval-dtype "
                                                "bfloat16, or leave out --dtype"):
        run(evaluate_base_model, tmp_path, "--dtype", "bfloat16", "--eval-dtype", "float32")
