"""The demo's ingredients: the original sample data, and SmolLM2-135M-Instruct loaded offline from its wheel."""

import json
from collections import Counter

import pytest

import common
from lvf import models

DEMO_DATA = common.PROJECT_DIR / "data" / "demo.jsonl"
CATEGORIES = {"open_qa", "closed_qa", "general_qa", "classification", "information_extraction", "summarization",
              "brainstorming", "creative_writing"}
NEEDS_CONTEXT = {"closed_qa", "information_extraction", "summarization"}


def test_demo_data_is_valid():
    lines = DEMO_DATA.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) >= 400
    for record in records:
        assert set(record) == {"instruction", "context", "response", "category"}
        assert all(isinstance(record[key], str) for key in record)
        assert record["instruction"].strip() and record["response"].strip()
        assert record["category"] in CATEGORIES
        if record["category"] in NEEDS_CONTEXT:
            assert len(record["context"].split()) >= 40, record["instruction"]
    counts = Counter(record["category"] for record in records)
    assert set(counts) == CATEGORIES and min(counts.values()) >= 40
    keys = [(r["instruction"].strip().lower(), r["context"].strip().lower()) for r in records]
    assert len(set(keys)) == len(keys)
    assert len({r["response"].strip().lower() for r in records}) == len(records)
    # The pipeline's own loader accepts it and splits it with every category in the test split.
    train, val, test = common.split_records(common.load_records(str(DEMO_DATA)))
    assert {r["category"] for r in test} == CATEGORIES


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = models.resolve_model("smollm2-135m")
    assert (models.cache_dir() / "smollm2-135m" / "config.json").is_file(), source  # local, not the Hub id
    tokenizer = common.setup_tokenizer(AutoTokenizer.from_pretrained(source))
    model = AutoModelForCausalLM.from_pretrained(source, dtype="float32")
    return tokenizer, model


@pytest.mark.slow  # loads SmolLM2-135M
def test_smollm2_preset_uses_its_own_chat_template(smollm2):
    tokenizer, model = smollm2
    assert model.config.model_type == "llama" and model.num_parameters() == 134_515_008
    record = {"id": "x", "instruction": "Name a primary colour.", "context": "", "response": "Red."}
    example, status = common.tokenize_example(tokenizer, record, 256)
    prompt_length = example["labels"].count(common.IGNORE_INDEX)
    assert tokenizer.decode(example["input_ids"][:prompt_length]).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(example["labels"][prompt_length:]) == "Red.<|im_end|>\n"


@pytest.mark.slow  # loads and runs SmolLM2-135M
def test_smollm2_scores_two_demo_examples(smollm2):
    tokenizer, model = smollm2
    records = common.load_records(str(DEMO_DATA))[:2]
    examples, _ = common.tokenize_records(tokenizer, records, 512)
    result = common.evaluate_perplexity(model, examples, tokenizer.pad_token_id, batch_size=2)
    assert result["eval_examples"] == 2
    # A real pretrained model on real text is far from uniform over its 49,152-token vocabulary.
    assert 1.0 < result["perplexity"] < 200
