"""The write-up's recipe (lvf.writeup) is kept once, and its metric is the write-up's, computed by hand."""

import math

import pytest
import torch
from conftest import tiny_llama_config

import common
from lvf import writeup


def writeup_perplexity_by_hand(model, tokenizer, records, batch_size, max_length=512):
    """The write-up's metric written out plainly: its chat text tokenized with the default special tokens (two
    BOS on Llama 3), padded with eos, labels = input ids, and the Trainer's eval_loss (each batch's mean loss
    weighted by the batch's size)."""
    eos_id = tokenizer.eos_token_id
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": record["instruction"]},
                                            {"role": "assistant", "content": record["response"]}], tokenize=False)
             for record in records]
    weighted, examples = 0.0, 0
    with torch.no_grad():
        for first in range(0, len(texts), batch_size):
            encoded = [tokenizer(text)["input_ids"][:max_length] for text in texts[first:first + batch_size]]
            input_ids = torch.tensor([ids + [eos_id] * (max_length - len(ids)) for ids in encoded])
            attention = torch.tensor([[1] * len(ids) + [0] * (max_length - len(ids)) for ids in encoded])
            loss = float(model(input_ids=input_ids, attention_mask=attention, labels=input_ids).loss)
            weighted, examples = weighted + loss * len(encoded), examples + len(encoded)
    return math.exp(weighted / examples)


@pytest.fixture(scope="module")
def demo_records(records_path):
    return common.load_records(str(records_path))[:5]


def test_seed_style_perplexity_is_the_writeups_metric(llama3_tokenizer, demo_records):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    # Batches of 2, 2 and 1: weighting by batch size differs from the plain mean of batch means.
    expected = writeup_perplexity_by_hand(model, llama3_tokenizer, demo_records, batch_size=2)
    # Scored block by block (bounded logits), so sums run in another order: equal to float rounding.
    assert writeup.seed_style_perplexity(model, llama3_tokenizer, demo_records, batch_size=2) == pytest.approx(
        expected, rel=1e-6)


def test_writeup_rows_drop_context_pad_with_eos_to_512_and_score_everything(llama3_tokenizer, demo_records):
    record = {**demo_records[0], "context": "A CONTEXT THE WRITE-UP NEVER SHOWED"}
    long_record = {**record, "response": "word " * 2000}
    rows = writeup.encode(llama3_tokenizer, [record, long_record])
    for row in rows:
        assert len(row["input_ids"]) == len(row["attention_mask"]) == writeup.LENGTH
        assert row["labels"] == row["input_ids"]  # prompt and padding are targets
        assert row["input_ids"][:2] == [llama3_tokenizer.bos_token_id] * 2  # the template's BOS and the tokenizer's
    short = rows[0]
    kept = sum(short["attention_mask"])
    assert short["input_ids"][kept:] == [llama3_tokenizer.eos_token_id] * (writeup.LENGTH - kept)
    assert "CONTEXT" not in llama3_tokenizer.decode(short["input_ids"][:kept])
    assert sum(rows[1]["attention_mask"]) == writeup.LENGTH  # cut at 512, never longer
    prompt = writeup.prompt_lengths(llama3_tokenizer, [record])[0]
    assert 0 < prompt < kept
    assert llama3_tokenizer.decode(short["input_ids"][prompt:kept]).startswith(record["response"][:20])
