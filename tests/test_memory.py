"""Memory per phase (isolated, or said to be unavailable) and training's breakdown counted from its tensors."""

import pytest
import torch
from conftest import tiny_llama_config
from peft import LoraConfig, get_peft_model
from test_training_levers import features
from transformers import LlamaForCausalLM, TrainingArguments

from lvf import memory, results, training

MB = 2**20


def test_a_phase_peak_is_its_own_not_the_process_peak_before_it():
    with memory.PhasePeak("cpu") as busy:
        block = torch.ones(200 * MB, dtype=torch.uint8)  # touched: resident
        del block
    with memory.PhasePeak("cpu") as quiet:
        pass
    assert busy.unavailable is None and busy.kind == "cpu_peak_rss_since_reset"
    assert busy.bytes - quiet.bytes > 150 * MB


def test_a_phase_peak_does_not_start_from_memory_an_earlier_phase_freed_in_small_blocks():
    with memory.PhasePeak("cpu") as busy:
        blocks = [torch.ones(16_000) for _ in range(4_000)]  # 64 KB each: the C heap, not their own mappings
        del blocks
    with memory.PhasePeak("cpu") as quiet:
        pass
    assert busy.bytes - quiet.bytes > 150 * MB  # 250 MB freed by the first phase is not the second's


def test_the_whole_process_peak_survives_the_phase_resets():
    with memory.PhasePeak("cpu"):
        block = torch.ones(200 * MB, dtype=torch.uint8)
        del block
    with memory.PhasePeak("cpu") as quiet:
        pass
    peak, kind = results.peak_memory("cpu")
    assert kind == "cpu_peak_rss" and peak - quiet.bytes > 150 * MB


def test_a_refused_reset_records_no_phase_peak_and_says_why(monkeypatch, tmp_path):
    monkeypatch.setattr(memory, "CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    with memory.PhasePeak("cpu") as peak:
        pass
    fields = memory.phase_fields(train=peak, eval=None)
    assert fields["train_peak_memory_bytes"] is None and "eval_peak_memory_bytes" not in fields
    assert fields["phase_memory_kind"] == "unavailable"
    assert "cannot reset the peak resident set" in fields["phase_memory_unavailable"]


def tiny_fp32_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(tiny_llama_config(), attn_implementation="sdpa",
                                         dtype=torch.float32)


@pytest.mark.parametrize("adapters", [False, True], ids=["full", "lora"])
def test_fp32_adamw_breakdown_is_4_bytes_of_gradient_and_8_of_state_per_trainable_parameter(
        adapters, llama3_tokenizer, tmp_path):
    model = tiny_fp32_llama()
    if adapters:
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_bytes = sum(p.numel() * 4 for p in model.parameters())
    breakdown = memory.TrainingBreakdown()
    arguments = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=3,
                                  optim="adamw_torch", use_cpu=True, report_to="none", save_strategy="no",
                                  remove_unused_columns=False, learning_rate=1e-3)
    trainer = training.make_trainer_class()(
        model=model, args=arguments, train_dataset=features(), callbacks=[breakdown],
        data_collator=training.training_collator(llama3_tokenizer, "cpu"))
    trainer.train()
    parts = breakdown.breakdown(train_peak_bytes=10**10)
    assert parts["weights_by_dtype"] == {"float32": total_bytes}
    assert parts["gradients"] == 4 * trainable
    # exp_avg and exp_avg_sq; AdamW's 0-dimensional `step` counters are left to `other`
    assert parts["optimizer_states"] == 8 * trainable
    assert parts["other"] == 10**10 - total_bytes - 12 * trainable
