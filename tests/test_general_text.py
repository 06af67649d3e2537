"""Forgetting: plain general text, cut into blocks, scored without a chat template and token-weighted."""

import json
import math

import pytest
import torch
from test_perplexity import LookupModel, UniformModel

import common
from lvf import errors, statistics
from lvf.llama3_tokenizer import BOS_ID

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def test_blocks_are_the_plain_text_in_order_with_one_unscored_bos(llama3_tokenizer):
    blocks = common.general_blocks(llama3_tokenizer, TEXT, block_length=33)
    tokens = llama3_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(blocks) == len(tokens) // 32  # whole blocks only
    assert [t for block in blocks for t in block["input_ids"][1:]] == tokens[:32 * len(blocks)]
    for block in blocks:
        assert block["input_ids"][0] == BOS_ID and block["input_ids"].count(BOS_ID) == 1
        assert block["labels"] == [common.IGNORE_INDEX, *block["input_ids"][1:]]
        assert len(block["input_ids"]) == 33
        # No chat template: none of its header or end-of-turn tokens.
        assert not {"<|start_header_id|>", "<|eot_id|>"} & set(llama3_tokenizer.convert_ids_to_tokens(
            block["input_ids"]))
    assert [b["id"] for b in blocks] == [b["id"] for b in common.general_blocks(llama3_tokenizer, TEXT, 33)]
    assert len({b["id"] for b in blocks}) == len(blocks)
    subset = common.general_blocks(llama3_tokenizer, TEXT, 33, max_blocks=3)
    assert len(subset) == 3 and {b["id"] for b in subset} <= {b["id"] for b in blocks}


class WordTokenizer:
    """One id per distinct word, and a BOS: a vocabulary small enough to compute by hand."""

    bos_token_id = 1

    def __init__(self, text):
        self.vocab = {word: index + 2 for index, word in enumerate(dict.fromkeys(text.split()))}

    def __call__(self, text, add_special_tokens=True, verbose=True):
        ids = [self.vocab[word] for word in text.split()]
        return {"input_ids": [self.bos_token_id, *ids] if add_special_tokens else ids}


def test_general_perplexity_matches_a_hand_computation():
    text = " ".join(f"w{i * i % 23}" for i in range(200))
    tokenizer = WordTokenizer(text)
    vocab = len(tokenizer.vocab) + 2
    blocks = common.general_blocks(tokenizer, text, block_length=17)
    assert len(blocks) == 200 // 16
    uniform = common.evaluate_perplexity(UniformModel(vocab), blocks, pad_token_id=0, batch_size=4)
    assert uniform["perplexity"] == pytest.approx(vocab, rel=1e-6)
    assert uniform["eval_tokens"] == 16 * len(blocks)  # every text token once; the BOS never
    model = LookupModel(vocab)
    log_probs = torch.log_softmax(model.table.detach(), dim=-1)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    nll = 0.0
    for first in range(0, 16 * len(blocks), 16):  # each block: BOS predicts its first word, then word by word
        block = [tokenizer.bos_token_id, *ids[first:first + 16]]
        nll -= sum(float(log_probs[block[i - 1], block[i]]) for i in range(1, 17))
    lookup = common.evaluate_perplexity(model, blocks, pad_token_id=0, batch_size=3)
    assert lookup["perplexity"] == pytest.approx(math.exp(nll / (16 * len(blocks))), rel=1e-5)


def test_identical_weights_score_the_general_text_identically(llama3_tokenizer):
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    blocks = common.general_blocks(llama3_tokenizer, TEXT, block_length=24, max_blocks=5)
    torch.manual_seed(0)
    first = LlamaForCausalLM(tiny_llama_config())
    second = LlamaForCausalLM(tiny_llama_config())
    second.load_state_dict(first.state_dict())
    one = common.evaluate_perplexity(first, blocks, llama3_tokenizer.pad_token_id, batch_size=2)
    two = common.evaluate_perplexity(second, blocks, llama3_tokenizer.pad_token_id, batch_size=5)
    assert [(i["id"], i["tokens"]) for i in one["per_example"]] == [(i["id"], i["tokens"]) for i in two["per_example"]]
    paired = statistics.paired_difference(one["per_example"], two["per_example"])
    assert paired["difference"] == pytest.approx(0, abs=1e-9) and not paired["significant"]


def test_general_sources_read_text_and_jsonl_and_python_docs_offline(tmp_path):
    text_file = tmp_path / "general.txt"
    text_file.write_text("one two three", encoding="utf-8")
    assert common.load_general_text(str(text_file)) == "one two three"
    rows = tmp_path / "general.jsonl"
    rows.write_text("\n".join(json.dumps({"text": t, "other": 1}) for t in ("first", "second")), encoding="utf-8")
    assert common.load_general_text(str(rows)) == "first\n\nsecond"
    docs = common.load_general_text("python-docs")
    assert len(docs) > 100_000 and "assert" in docs
    with pytest.raises(errors.UsageError, match="not found"):
        common.load_general_text(str(tmp_path / "missing.txt"))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"content": "x"}), encoding="utf-8")
    with pytest.raises(errors.UsageError, match="'text'"):
        common.load_general_text(str(tmp_path / "bad.jsonl"))


def test_wikitext_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setattr("common.is_offline_mode", lambda: True)
    monkeypatch.setattr("common.in_hub_cache", lambda *a: False)
    with pytest.raises(errors.UsageError, match="Salesforce/wikitext.*HF_HUB_OFFLINE") as caught:
        common.load_general_text("wikitext-2")
    assert "\n" not in str(caught.value)


def test_text_too_short_for_one_block_is_a_usage_error(llama3_tokenizer):
    with pytest.raises(errors.UsageError, match="too few"):
        common.general_blocks(llama3_tokenizer, "short", block_length=64)


def test_general_text_that_cannot_be_had_says_it_is_the_forgetting_text_and_how_to_replace_it(tmp_path, monkeypatch):
    """Offline and not in the cache, WikiText-2 stops the run: the message says what that text is for and names both
    ways on (another file, or none)."""
    monkeypatch.setattr(common, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setattr(common, "is_offline_mode", lambda: True)
    with pytest.raises(errors.UsageError) as raised:
        common.load_general_text("wikitext-2")
    message = str(raised.value)
    assert "forgetting" in message
    assert "--general-file FILE" in message and "--general-file ''" in message
    assert "HF_HUB_OFFLINE=1" in message  # the cause stays in the line
    assert "\n" not in message
