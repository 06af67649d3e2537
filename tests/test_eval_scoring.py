"""Evaluation scores block by block, in the weights' precision, the same way for every method: results equal to
scoring the whole batch's logits at once, a bounded logits tensor, no autocast, and a LoRA model scored like
its base."""


import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from conftest import tiny_llama_config
from peft import LoraConfig, get_peft_model
from test_perplexity import random_examples
from test_writeup import writeup_perplexity_by_hand
from transformers import LlamaForCausalLM

import common
from lvf import writeup

VOCAB = 500


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                               tie_word_embeddings=False))
    model.config._attn_implementation = "sdpa"
    return model.eval()


def whole_batch_nll(model, batch):
    """The earlier way: every position's fp32 logits for the whole padded batch at once."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = batch["labels"][:, 1:]
    nll_sums, counts = [], []
    for row in range(logits.shape[0]):
        keep = targets[row] != common.IGNORE_INDEX
        nll_sums.append(float(F.cross_entropy(logits[row, :-1][keep], targets[row][keep], reduction="sum")))
        counts.append(int(keep.sum()))
    return nll_sums, counts


class LogitsRecorder:
    """Wraps the head's forward and keeps the largest output it produced, and whether autocast was on."""

    def __init__(self, lm_head):
        self.largest = 0
        self.autocast_seen = False
        original = lm_head.forward

        def recording(hidden):
            output = original(hidden)
            self.largest = max(self.largest, output.numel())
            self.autocast_seen |= torch.is_autocast_enabled("cpu")
            return output

        lm_head.forward = recording


def test_block_scoring_equals_whole_batch_logits_and_bounds_the_largest_logits(monkeypatch):
    monkeypatch.setattr(common, "LOGITS_BLOCK", 4)
    model = tiny_llama()
    batch = common.pad_batch(random_examples(6, VOCAB, seed=5), pad_token_id=0)
    with torch.no_grad():
        expected = whole_batch_nll(model, batch)
        recorder = LogitsRecorder(model.lm_head)
        scored = common.sequence_nll(model, **batch)
    assert scored[1] == expected[1]
    assert scored[0] == pytest.approx(expected[0], rel=1e-6)
    assert 0 < recorder.largest <= 4 * VOCAB  # one block of positions; the whole batch would be 6 x 19 x 500


def test_write_up_metric_is_unchanged_by_block_scoring(monkeypatch, llama3_tokenizer):
    records = [{"instruction": f"Say something about {topic}.", "context": "", "response": f"{topic} is fine."}
               for topic in ("rain", "tea", "maps", "owls", "glass")]
    model = LlamaForCausalLM(tiny_llama_config(hidden_size=16, intermediate_size=32)).eval()
    monkeypatch.setattr(common, "LOGITS_BLOCK", 16)
    recorder = LogitsRecorder(model.lm_head)
    blockwise = writeup.seed_style_perplexity(model, llama3_tokenizer, records, batch_size=2, max_length=40)
    assert recorder.largest <= 16 * model.config.vocab_size
    # The whole-batch way: the model's own loss over labels = input ids, batch by batch.
    expected = writeup_perplexity_by_hand(model, llama3_tokenizer, records, batch_size=2, max_length=40)
    assert blockwise == pytest.approx(expected, rel=1e-6)


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one process-wide state: a Trainer of an earlier test fixed its mixed precision."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_a_lora_model_from_training_is_scored_like_its_base_without_autocast(fresh_accelerator_state):
    """The kit's path after training: accelerate wrapped the tuned model's forward in bf16 autocast; the
    evaluation model has it taken off, so identical weights give identical per-example NLL."""
    from lvf.training import without_mixed_precision_wrapper

    examples = random_examples(9, VOCAB, seed=6)
    base = common.evaluate_perplexity(tiny_llama(), examples, pad_token_id=0, batch_size=4, resamples=10)

    # LoRA's B starts at zero: the adapted model computes exactly what its base does.
    lora = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    wrapped = accelerator.prepare_model(lora)
    assert hasattr(wrapped, "_original_forward") or hasattr(lora, "_original_forward")  # autocast is on

    class TrainerLike:  # what without_mixed_precision_wrapper reads from a Trainer
        pass

    trainer = TrainerLike()
    trainer.accelerator, trainer.model_wrapped = accelerator, wrapped
    recorder = LogitsRecorder(lora.get_output_embeddings())
    tuned = common.evaluate_perplexity(without_mixed_precision_wrapper(trainer), examples, pad_token_id=0,
                                       batch_size=4, resamples=10)
    assert not recorder.autocast_seen
    assert [item["nll_sum"] for item in tuned["per_example"]] == [item["nll_sum"] for item in base["per_example"]]
    assert common.eval_precision(lora)["autocast"] is False
