"""Prompt formatting and label masking, with the real Llama 3 tokenizer."""

import pytest

import common
from lvf import errors
from lvf.llama3_tokenizer import BOS_ID, EOT_ID

RECORD = {"id": "r1", "instruction": "Who wrote the passage?", "context": "A note by Ada, 1843.",
          "response": "Ada Lovelace wrote it.", "category": "closed_qa"}


def test_user_turn_appends_context_only_when_present():
    assert common.user_turn(RECORD) == "Who wrote the passage?\n\nContext:\nA note by Ada, 1843."
    assert common.user_turn({**RECORD, "context": "  \n"}) == "Who wrote the passage?"
    assert common.user_turn({**RECORD, "context": None}) == "Who wrote the passage?"


def test_llama3_example_has_one_bos_masked_prompt_context_and_eot(llama3_tokenizer):
    example, status = common.tokenize_example(llama3_tokenizer, RECORD, max_length=1024)
    ids, labels = example["input_ids"], example["labels"]
    assert status == "ok"
    assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1
    prompt_length = labels.index(next(label for label in labels if label != common.IGNORE_INDEX))
    prompt_text = llama3_tokenizer.decode(ids[:prompt_length])
    assert "Context:\nA note by Ada, 1843." in prompt_text
    assert prompt_text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert all(label == common.IGNORE_INDEX for label in labels[:prompt_length])
    scored = labels[prompt_length:]
    assert scored == ids[prompt_length:]  # every token after the prompt is scored
    assert scored[-1] == EOT_ID
    assert llama3_tokenizer.decode(scored) == "Ada Lovelace wrote it.<|eot_id|>"


def test_test_tokenizer_adds_a_bos_like_the_real_one(llama3_tokenizer):
    # Meta-Llama-3-8B-Instruct's tokenizer.json prepends <|begin_of_text|> to plain text; without that the
    # single-BOS test above could not catch a template's BOS doubled by a second tokenizer call.
    assert llama3_tokenizer("Hello")["input_ids"] == [BOS_ID, *llama3_tokenizer("Hello", add_special_tokens=False)
                                                      ["input_ids"]]
    rendered = llama3_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert llama3_tokenizer(rendered)["input_ids"][:2] == [BOS_ID, BOS_ID]


def test_long_response_is_cut_at_the_end_and_long_prompt_dropped(llama3_tokenizer):
    full, _ = common.tokenize_example(llama3_tokenizer, {**RECORD, "response": "word " * 200}, 1024)
    prompt_length = full["labels"].count(common.IGNORE_INDEX)
    cut, status = common.tokenize_example(llama3_tokenizer, {**RECORD, "response": "word " * 200},
                                          prompt_length + 5)
    assert status == "truncated"
    assert cut["input_ids"] == full["input_ids"][: prompt_length + 5]
    assert cut["labels"].count(common.IGNORE_INDEX) == prompt_length
    dropped, status = common.tokenize_example(llama3_tokenizer, RECORD, prompt_length)
    assert dropped is None and status == "dropped"
    examples, counts = common.tokenize_records(
        llama3_tokenizer, [RECORD, {**RECORD, "response": "word " * 200, "id": "r2"}], prompt_length + 8)
    assert counts == {"examples": 2, "truncated": 1, "dropped": 0} and len(examples) == 2


def test_missing_chat_template_points_to_llama3_flag(llama3_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    tokenizer.chat_template = None
    with pytest.raises(errors.UsageError, match="--chat-template llama3"):
        common.setup_tokenizer(tokenizer)
    common.setup_tokenizer(tokenizer, "llama3")
    assert tokenizer.chat_template == common.LLAMA3_CHAT_TEMPLATE


def test_pad_token_is_set_and_never_used_for_masking(llama3_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    assert tokenizer.pad_token_id is None  # Llama 3 has none
    common.setup_tokenizer(tokenizer)
    assert tokenizer.pad_token_id == EOT_ID
    # The response's own <|eot_id|> equals the pad id, and must still be scored.
    example, _ = common.tokenize_example(tokenizer, RECORD, 1024)
    batch = common.pad_batch([example, {**example, "input_ids": example["input_ids"][:-3],
                                        "attention_mask": [1] * (len(example["input_ids"]) - 3),
                                        "labels": example["labels"][:-3]}], tokenizer.pad_token_id)
    assert int(batch["labels"][0, -1]) == EOT_ID
    assert batch["labels"][1, -3:].tolist() == [common.IGNORE_INDEX] * 3
    assert batch["attention_mask"][1, -3:].tolist() == [0, 0, 0]


def test_template_whose_prompt_is_not_a_prefix_is_rejected(llama3_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    bad = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}X:{% endif %}"
    tokenizer.chat_template = bad
    common.setup_tokenizer(tokenizer)
    with pytest.raises(errors.UsageError, match="prefix"):
        common.tokenize_example(tokenizer, RECORD, 1024)
