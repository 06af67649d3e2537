"""The write-up's recipe (lvf.writeup) is kept once, and serves its metric with the numbers it always had."""

import math

import pytest
import torch
from conftest import tiny_llama_config

import common
from lvf import writeup


def frozen_seed_style_perplexity(model, tokenizer, records, batch_size, max_length=512):
    """common.seed_style_perplexity as it was before lvf.writeup existed (commit 0b16b6f), kept to pin its numbers."""
    eos_id = tokenizer.eos_token_id
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": record["instruction"]},
                                            {"role": "assistant", "content": record["response"]}], tokenize=False)
             for record in records]
    batch_losses = []
    with torch.no_grad():
        for first in range(0, len(texts), batch_size):
            encoded = [tokenizer(text, add_special_tokens=False)["input_ids"][:max_length]
                       for text in texts[first:first + batch_size]]
            input_ids = torch.tensor([ids + [eos_id] * (max_length - len(ids)) for ids in encoded])
            attention = torch.tensor([[1] * len(ids) + [0] * (max_length - len(ids)) for ids in encoded])
            batch_losses.append(float(model(input_ids=input_ids, attention_mask=attention, labels=input_ids).loss))
    return math.exp(sum(batch_losses) / len(batch_losses))


@pytest.fixture(scope="module")
def demo_records(records_path):
    return common.load_records(str(records_path))[:5]


def test_seed_style_perplexity_keeps_its_numbers(llama3_tokenizer, demo_records):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    # Batches of 2, 2 and 1: the mean of per-batch means differs from the mean over tokens, as the write-up's did.
    expected = frozen_seed_style_perplexity(model, llama3_tokenizer, demo_records, batch_size=2)
    # Scored block by block (bounded logits), so sums run in another order: equal to float rounding.
    assert common.seed_style_perplexity(model, llama3_tokenizer, demo_records, batch_size=2) == pytest.approx(
        expected, rel=1e-6)


def test_writeup_rows_drop_context_pad_with_eos_to_512_and_score_everything(llama3_tokenizer, demo_records):
    record = {**demo_records[0], "context": "A CONTEXT THE WRITE-UP NEVER SHOWED"}
    long_record = {**record, "response": "word " * 2000}
    rows = writeup.encode(llama3_tokenizer, [record, long_record])
    for row in rows:
        assert len(row["input_ids"]) == len(row["attention_mask"]) == writeup.LENGTH
        assert row["labels"] == row["input_ids"]  # prompt and padding are targets
    short = rows[0]
    kept = sum(short["attention_mask"])
    assert short["input_ids"][kept:] == [llama3_tokenizer.eos_token_id] * (writeup.LENGTH - kept)
    assert "CONTEXT" not in llama3_tokenizer.decode(short["input_ids"][:kept])
    assert sum(rows[1]["attention_mask"]) == writeup.LENGTH  # cut at 512, never longer
    prompt = writeup.prompt_lengths(llama3_tokenizer, [record])[0]
    assert 0 < prompt < kept
    assert llama3_tokenizer.decode(short["input_ids"][prompt:kept]).startswith(record["response"][:20])
