"""Memory per phase (isolated, or said to be unavailable) and training's breakdown counted from its tensors."""

import pytest
import torch
from conftest import tiny_llama_config
from peft import LoraConfig, get_peft_model
from test_training_levers import features
from transformers import LlamaForCausalLM, TrainingArguments

from lvf import memory, models, training

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
    peak, kind = memory.process_peak("cpu")
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


def trained_breakdown(model, optim, max_steps, tokenizer, tmp_path):
    """A few CPU steps of `model` with the kit's Trainer and collator; returns the TrainingBreakdown it filled."""
    breakdown = memory.TrainingBreakdown()
    arguments = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=3,
                                  optim=optim, use_cpu=True, report_to="none", save_strategy="no",
                                  remove_unused_columns=False, learning_rate=1e-3)
    training.make_trainer_class()(model=model, args=arguments, train_dataset=features(), callbacks=[breakdown],
                                  data_collator=training.training_collator(tokenizer, "cpu")).train()
    return breakdown


@pytest.mark.parametrize("adapters", [False, True], ids=["full", "lora"])
def test_fp32_adamw_breakdown_is_4_bytes_of_gradient_and_8_of_state_per_trainable_parameter(
        adapters, llama3_tokenizer, tmp_path):
    model = tiny_fp32_llama()
    if adapters:
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_bytes = sum(p.numel() * 4 for p in model.parameters())
    parts = trained_breakdown(model, "adamw_torch", 2, llama3_tokenizer, tmp_path).breakdown(train_peak_bytes=10**10)
    assert parts["weights_by_dtype"] == {"float32": total_bytes}
    assert parts["gradients"] == 4 * trainable
    # exp_avg and exp_avg_sq; AdamW's 0-dimensional `step` counters are left to `other`
    assert parts["optimizer_states"] == 8 * trainable
    assert parts["other"] == 10**10 - total_bytes - 12 * trainable


def one_adamw_step(model):
    """A training step's gradients and AdamW states on a tiny model, with the breakdown callback around it."""
    breakdown = memory.TrainingBreakdown()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.arange(1, 17).unsqueeze(0)
    model(input_ids=ids, labels=ids).loss.backward()
    breakdown.on_pre_optimizer_step(None, None, None, model=model)
    optimizer.step()
    return breakdown, optimizer


def test_paged_optimizer_states_count_in_the_cuda_training_peak_and_other_is_not_negative(monkeypatch):
    """bitsandbytes' paged optimizers keep their states in CUDA managed memory, which max_memory_allocated never
    counts, while the breakdown counts them from the tensors: the training peak missed them and `other` came out
    negative. Stand-ins: the AdamW states of a tiny model on the CPU, marked as bitsandbytes marks paged tensors
    (functional.get_paged) and held by its page manager; an allocator whose statistics see everything else."""
    import bitsandbytes.functional as bnb_functional

    model = tiny_fp32_llama()
    breakdown, optimizer = one_adamw_step(model)
    paged = [state[key] for state in optimizer.state.values() for key in ("exp_avg", "exp_avg_sq")]
    for tensor in paged:
        tensor.is_paged, tensor.page_deviceid = True, 0
    monkeypatch.setattr(bnb_functional.GlobalPageManager.get_instance(), "paged_tensors", paged)
    breakdown.on_step_end(None, None, None, optimizer=optimizer)

    weights = sum(p.numel() * 4 for p in model.parameters())
    paged_bytes = sum(t.numel() * t.element_size() for t in paged)
    activations = 3 * MB
    allocator_peak = weights + weights + activations  # weights, gradients, activations: not the managed states
    for name, value in {"synchronize": None, "reset_peak_memory_stats": None, "max_memory_reserved": allocator_peak,
                        "max_memory_allocated": allocator_peak}.items():
        monkeypatch.setattr(torch.cuda, name, lambda *a, value=value, **kw: value)
    with memory.PhasePeak("cuda") as peak:
        pass
    parts = breakdown.breakdown(peak.bytes)
    assert parts["other"] == activations  # before: activations - paged_bytes, below zero
    assert peak.bytes == allocator_peak + paged_bytes and peak.paged_bytes == paged_bytes
    assert parts["optimizer_states"] == parts["paged_optimizer_states"] == paged_bytes
    assert memory.phase_fields(train=peak)["phase_paged_bytes"] == {"train": paged_bytes}


def test_other_is_never_negative_it_says_why_it_is_missing():
    model = tiny_fp32_llama()
    breakdown, optimizer = one_adamw_step(model)
    breakdown.on_step_end(None, None, None, optimizer=optimizer)
    parts = breakdown.breakdown(train_peak_bytes=1_000)  # a peak that missed memory the parts count
    assert parts["other"] is None and "exceed the measured training peak" in parts["other_unavailable"]
    assert breakdown.breakdown(train_peak_bytes=None)["other_unavailable"] == "the training peak was not measured"


def test_on_cuda_the_weights_land_on_the_gpu_inside_the_load_phase(monkeypatch):
    """from_pretrained reads the weights onto the CPU; load_model (called inside each script's load PhasePeak) moves
    them to this process's GPU, so the load phase's CUDA peak counts them, not the Trainer's later move. Stand-ins
    for the loaded model and the GPU: the device they are moved to is recorded."""

    class Loaded:
        device = "cpu"

        def to(self, device):
            self.device = device
            return self

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", lambda *args, **kwargs: Loaded())
    monkeypatch.setattr(models.torch.cuda, "current_device", lambda: 1)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert models.load_model("some/model", torch.bfloat16, "cuda").device == torch.device("cuda", 1)
    assert models.load_model("some/model", torch.float32, "cpu").device == "cpu"
    four_bit = models.load_model("some/model", torch.bfloat16, "cuda", quantization_config=object())
    assert four_bit.device == "cpu"  # stand-in: bitsandbytes puts 4-bit weights on the GPU as it reads them
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setattr(models, "receives_weights_by_broadcast", lambda: False)  # local rank 0 reads them
    assert models.load_model("some/model", torch.bfloat16, "cuda").device == "cpu"  # FSDP places them
