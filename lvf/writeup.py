"""The write-up's recipe, kept once: the examples its Trainer trained on and its evaluation scored. Used by
common.seed_style_perplexity (its metric, reproduced to explain it) and by bench/throughput_worker.py (its
training, as the benchmark's "writeup" contender). Never a way to train or score models here.

The recipe: Dolly's context dropped (user turn = instruction alone), the chat template's text (which already
starts with the BOS) tokenized with the tokenizer's default add_special_tokens=True, so a tokenizer that adds a
BOS itself (Llama 3's does) gives two, as the write-up's did; cut at 512 tokens, right-padded to 512 with
pad = eos, and labels = input_ids, so the prompt and every padding position are targets too (the attention
mask still hides the padding from the model).
"""

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
