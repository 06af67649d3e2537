"""The write-up's recipe, kept once: the examples its Trainer trained on and its evaluation scored, and its metric
(seed_style_perplexity, reproduced to explain it, with --seed-style-metric). Used by lvf.scoring and by
bench/throughput_worker.py (its training, as the benchmark's "writeup" contender). Never a way to train or score
models here.

The recipe: Dolly's context dropped (user turn = instruction alone), the chat template's text (which already
starts with the BOS) tokenized with the tokenizer's default add_special_tokens=True, so a tokenizer that adds a
BOS itself (Llama 3's does) gives two, as the write-up's did; cut at 512 tokens, right-padded to 512 with
pad = eos, and labels = input_ids, so the prompt and every padding position are targets too (the attention
mask still hides the padding from the model).
"""

import math

import torch

import common

LENGTH = 512


def messages(record):
    return [{"role": "user", "content": record["instruction"]}, {"role": "assistant", "content": record["response"]}]


def encode(tokenizer, records, max_length=LENGTH):
    """One row per record: input_ids padded with eos to max_length, its attention mask, labels = input_ids."""
    eos_id = tokenizer.eos_token_id
    rows = []
    for record in records:
        text = tokenizer.apply_chat_template(messages(record), tokenize=False)
        ids = tokenizer(text)["input_ids"][:max_length]  # the default add_special_tokens=True, as the write-up
        padding = max_length - len(ids)
        input_ids = ids + [eos_id] * padding
        rows.append({"input_ids": input_ids, "attention_mask": [1] * len(ids) + [0] * padding,
                     "labels": list(input_ids)})
    return rows


def prompt_lengths(tokenizer, records):
    """Tokens of each record's prompt (its user turn and the assistant header): what precedes the response."""
    prompts = [tokenizer.apply_chat_template(messages(record)[:1], add_generation_prompt=True, tokenize=False)
               for record in records]
    return [len(ids) for ids in tokenizer(prompts)["input_ids"]]  # tokenized as encode() does


def seed_style_perplexity(model, tokenizer, records, batch_size=8, device=None, max_length=LENGTH):
    """The write-up's number, reproduced to explain it: its examples (lvf.writeup: context dropped, two BOS on
    Llama 3, padded to 512 with pad = eos, labels = input ids, so prompt and padding are scored) and exp of
    Trainer's eval_loss, which weights each batch's mean loss by the batch's size. Never use it to compare
    models."""
    device = device or next(model.parameters()).device
    rows = encode(tokenizer, records, max_length)
    batch_losses, batch_sizes = [], []
    model.eval()
    with torch.no_grad(), common.no_autocast(device):
        for first in range(0, len(rows), batch_size):
            batch = {key: torch.tensor([row[key] for row in rows[first:first + batch_size]], device=device)
                     for key in ("input_ids", "attention_mask", "labels")}
            # labels = input_ids: padding (= eos) positions are targets too, as in the write-up; the batch's
            # loss is the Trainer's, the mean over every target of the batch.
            nll_sums, token_counts = common.sequence_nll(model, batch["input_ids"], batch["attention_mask"],
                                                         labels=batch["labels"])
            batch_losses.append(sum(nll_sums) / sum(token_counts))
            batch_sizes.append(len(nll_sums))
    return math.exp(batch_size_weighted_mean(batch_losses, batch_sizes))


def batch_size_weighted_mean(batch_losses, batch_sizes):
    """Trainer's eval_loss: each batch's mean loss repeated once per example, then averaged."""
    return sum(loss * size for loss, size in zip(batch_losses, batch_sizes, strict=True)) / sum(batch_sizes)
