"""Perplexity arithmetic: exp(sum NLL / scored tokens), batch-size independent, prompt and padding unscored."""

import math

import numpy as np
import pytest
import torch
from conftest import tiny_llama_config

import common
from lvf import errors, statistics, writeup


class ToyCausalLM(torch.nn.Module):
    """The shape evaluation relies on: hidden states from the body, then get_output_embeddings()."""

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        class Output:
            pass

        out = Output()
        out.logits = self.lm_head(self.hidden(input_ids))
        return out


class UniformModel(ToyCausalLM):
    """Equal logits everywhere: every scored token costs exactly log(vocab)."""

    def __init__(self, vocab):
        super().__init__()
        self.config = type("Config", (), {})()
        self.lm_head = torch.nn.Linear(1, vocab, bias=False)
        torch.nn.init.zeros_(self.lm_head.weight)

    def hidden(self, input_ids):
        return torch.zeros(*input_ids.shape, 1)


class LookupModel(ToyCausalLM):
    """Logits depend only on the current token: known NLL for every target, so counting is checkable."""

    def __init__(self, vocab):
        super().__init__()
        torch.manual_seed(0)
        self.config = type("Config", (), {})()
        self.vocab = vocab
        self.lm_head = torch.nn.Linear(vocab, vocab, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.randn(vocab, vocab).T)

    @property
    def table(self):  # logits of the next token given the current one
        return self.lm_head.weight.T

    def hidden(self, input_ids):
        return torch.nn.functional.one_hot(input_ids, self.vocab).float()


def example(prompt, response, example_id):
    ids = prompt + response
    return {"id": example_id, "input_ids": ids, "attention_mask": [1] * len(ids),
            "labels": [common.IGNORE_INDEX] * len(prompt) + response}


def random_examples(count, vocab, seed=0):
    rng = np.random.default_rng(seed)
    examples = []
    for index in range(count):
        prompt = rng.integers(1, vocab, size=rng.integers(2, 9)).tolist()
        response = rng.integers(1, vocab, size=rng.integers(1, 12)).tolist()
        examples.append(example(prompt, response, f"e{index}"))
    return examples


def test_uniform_logits_give_exactly_the_vocabulary_size():
    examples = random_examples(20, 50)
    result = common.evaluate_perplexity(UniformModel(50), examples, pad_token_id=0, batch_size=4)
    assert result["perplexity"] == pytest.approx(50, rel=1e-6)
    assert result["eval_tokens"] == sum(len(e["input_ids"]) - e["labels"].count(common.IGNORE_INDEX) for e in examples)
    low, high = result["perplexity_ci95"]
    assert low == pytest.approx(50, rel=1e-6) and high == pytest.approx(50, rel=1e-6)


def test_only_response_tokens_are_scored_and_padding_never():
    vocab = 30
    model = LookupModel(vocab)
    examples = random_examples(12, vocab, seed=1)
    log_probs = torch.log_softmax(model.table.detach(), dim=-1)
    expected_nll = 0.0
    expected_tokens = 0
    for e in examples:
        prompt_length = e["labels"].count(common.IGNORE_INDEX)
        for position in range(prompt_length, len(e["input_ids"])):
            expected_nll -= float(log_probs[e["input_ids"][position - 1], e["input_ids"][position]])
            expected_tokens += 1
    for pad_id in (0, 7):  # the pad id must not matter: masking is by labels and attention
        result = common.evaluate_perplexity(model, examples, pad_token_id=pad_id, batch_size=5)
        assert result["eval_tokens"] == expected_tokens
        assert result["perplexity"] == pytest.approx(math.exp(expected_nll / expected_tokens), rel=1e-5)


def test_batch_size_does_not_change_the_result_on_a_real_llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=500, hidden_size=64, intermediate_size=128))
    model.config._attn_implementation = "sdpa"
    examples = random_examples(17, 500, seed=2)
    one = common.evaluate_perplexity(model, examples, pad_token_id=0, batch_size=1)
    eight = common.evaluate_perplexity(model, examples, pad_token_id=0, batch_size=8)
    assert eight["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)
    assert eight["eval_tokens"] == one["eval_tokens"]
    by_id = {item["id"]: item for item in one["per_example"]}
    for item in eight["per_example"]:
        assert item["nll_sum"] == pytest.approx(by_id[item["id"]]["nll_sum"], rel=1e-4)
        assert item["tokens"] == by_id[item["id"]]["tokens"]


def test_empty_evaluation_set_is_a_usage_error():
    with pytest.raises(errors.UsageError):
        common.evaluate_perplexity(UniformModel(5), [], pad_token_id=0)


def test_bootstrap_interval_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(3)
    nll = rng.uniform(1, 30, size=200)
    tokens = rng.integers(1, 20, size=200)
    point = math.exp(nll.sum() / tokens.sum())
    low, high = common.perplexity_interval(nll, tokens, seed=42, resamples=1000)
    assert low < point < high
    assert [low, high] == common.perplexity_interval(nll, tokens, seed=42, resamples=1000)
    assert [low, high] != common.perplexity_interval(nll, tokens, seed=43, resamples=1000)


def test_the_examples_bootstrap_is_the_percentile_bootstrap_of_pooled_perplexity():
    """scipy.stats.bootstrap (common.bootstrap_examples) resamples examples with the seeded generator's draws:
    the interval is the percentiles of exp(Σ NLL / Σ tokens) over rows of rng.integers(0, n, (resamples, n)),
    nll and tokens drawn together; one example has nothing to resample and its interval is its perplexity."""
    rng = np.random.default_rng(5)
    nll, tokens = rng.uniform(1, 30, size=50), rng.integers(1, 20, size=50).astype(float)
    picks = np.random.default_rng(7).integers(0, 50, size=(300, 50))
    by_hand = np.exp(nll[picks].sum(1) / tokens[picks].sum(1))
    expected = [float(np.percentile(by_hand, 2.5)), float(np.percentile(by_hand, 97.5))]
    assert common.perplexity_interval(nll, tokens, seed=7, resamples=300) == expected
    assert common.perplexity_interval(nll[:1], tokens[:1]) == [pytest.approx(math.exp(nll[0] / tokens[0]))] * 2


def test_paired_difference_identical_runs_contain_zero_and_clear_gap_excludes_it():
    rng = np.random.default_rng(4)
    run = [{"id": f"x{i}", "nll_sum": float(rng.uniform(5, 50)), "tokens": int(rng.integers(5, 30))}
           for i in range(100)]
    same = statistics.paired_difference(run, run)
    assert same["difference"] == 0 and same["ci95"][0] <= 0 <= same["ci95"][1] and not same["significant"]
    better = [{**item, "nll_sum": item["nll_sum"] * 0.8} for item in run]
    gap = statistics.paired_difference(better, run)
    assert gap["difference"] < 0 and gap["ci95"][1] < 0 and gap["significant"]
    assert statistics.paired_difference(run, [{"id": "other", "nll_sum": 1.0, "tokens": 1}]) is None


def test_seed_style_metric_matches_a_hand_computation_with_two_bos_and_size_weighted_batches(llama3_tokenizer):
    from transformers import LlamaForCausalLM

    from lvf.llama3_tokenizer import BOS_ID

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    records = [{"instruction": f"Question {n}?", "context": "ignored", "response": "Answer " * n}
               for n in (1, 2, 3)]
    length, eos = 40, llama3_tokenizer.eos_token_id
    # The write-up: the template's text (already starting with <|begin_of_text|>), tokenized with the
    # tokenizer's own BOS added again, cut and padded with eos to a fixed length, every position a target.
    rows = []
    for record in records:
        text = llama3_tokenizer.apply_chat_template([{"role": "user", "content": record["instruction"]},
                                                     {"role": "assistant", "content": record["response"]}],
                                                    tokenize=False)
        ids = [BOS_ID, *llama3_tokenizer(text, add_special_tokens=False)["input_ids"]][:length]
        assert ids[:2] == [BOS_ID, BOS_ID]
        rows.append((ids + [eos] * (length - len(ids)), [1] * len(ids) + [0] * (length - len(ids))))
    batch_means = []
    for batch in (rows[:2], rows[2:]):  # batch_size=2 over 3 records: batches of 2 and 1
        input_ids = torch.tensor([ids for ids, _ in batch])
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=torch.tensor([mask for _, mask in batch])).logits
        batch_means.append(float(torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))))
    expected = math.exp((2 * batch_means[0] + 1 * batch_means[1]) / 3)  # Trainer: weighted by batch size
    got = writeup.seed_style_perplexity(model, llama3_tokenizer, records, batch_size=2, max_length=length)
    assert got == pytest.approx(expected, rel=1e-5)
