"""Speed levers in the training path change the cost of a step, never its loss, gradients or token count."""

import json
import signal
import sys

import pytest
import torch
from conftest import tiny_llama_config

import common
from lvf import training

PROMPT = common.IGNORE_INDEX


def tiny_model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(tiny_llama_config(), attn_implementation="sdpa")


def features():
    """Three examples of different lengths: a prompt (label -100), then scored response tokens."""
    generator = torch.Generator().manual_seed(1)
    examples = []
    for prompt_length, response_length in [(7, 5), (4, 9), (11, 3)]:
        ids = torch.randint(3, 1000, (prompt_length + response_length,), generator=generator).tolist()
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                         "labels": [PROMPT] * prompt_length + ids[prompt_length:]})
    return examples


def loss_and_grads(model, batch):
    model.zero_grad()
    scored = int((batch["labels"][..., 1:] != PROMPT).sum())
    loss = model(**batch, num_items_in_batch=torch.tensor(scored)).loss
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


def skip_unless_supported(model, boolean):
    if boolean and not training.accepts_boolean_logits_to_keep(model):
        pytest.skip("this transformers' logits_to_keep takes no boolean mask (5.17)")


# "mask": transformers 5.2x's 2-D boolean logits_to_keep; "positions": the 1-D fallback 5.17 needs.
@pytest.mark.parametrize("boolean", [True, False], ids=["mask", "positions"])
@pytest.mark.parametrize("packing", [False, True])
def test_scored_logits_and_packing_keep_loss_and_gradients(packing, boolean, llama3_tokenizer):
    from transformers import DataCollatorForSeq2Seq

    model = tiny_model()
    skip_unless_supported(model, boolean)
    reference = DataCollatorForSeq2Seq(llama3_tokenizer, padding=True, label_pad_token_id=PROMPT)(features())
    reference_loss, reference_grads = loss_and_grads(model, dict(reference))

    batch = training.training_collator(llama3_tokenizer, "cpu", packing, boolean_logits_to_keep=boolean)(features())
    assert batch["use_cache"] is False
    assert int((batch["shift_labels"] != PROMPT).sum()) == 5 + 9 + 3
    if boolean:
        assert int(batch["logits_to_keep"].sum()) == len(batch["shift_labels"]) == 5 + 9 + 3
    if packing:
        assert batch["input_ids"].shape == (1, 12 + 13 + 14) and "attention_mask" not in batch
        # each example restarts its positions, and its first token is never a target of the previous one
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
        assert starts == [0, 12, 25]
        assert all(int(batch["labels"][0, start]) == PROMPT for start in starts)
    loss, grads = loss_and_grads(model, batch)

    assert loss == pytest.approx(reference_loss, rel=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("boolean", [True, False], ids=["mask", "positions"])
def test_scored_logits_are_computed_only_where_a_target_is_scored(boolean, llama3_tokenizer):
    model = tiny_model()
    skip_unless_supported(model, boolean)
    batch = training.training_collator(llama3_tokenizer, "cpu", boolean_logits_to_keep=boolean)(features())
    outputs = model(**batch)
    if boolean:
        assert outputs.logits.shape == (5 + 9 + 3, model.config.vocab_size)  # not 3 rows x 14 positions
    else:  # positions 3-12 (targets 4-13) are scored in some row: 3 rows x 10 positions, not x 14
        assert outputs.logits.shape == (3, 10, model.config.vocab_size)


def test_collator_follows_what_the_models_transformers_accepts(llama3_tokenizer):
    """5.2x's Llama takes a boolean mask; a modeling module without slice_logits_to_keep (5.17's) gets positions."""
    from transformers import TrainingArguments

    model = tiny_model()
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    with_mask = training.model_collator(args, model, llama3_tokenizer, "cpu")(features())["logits_to_keep"]
    assert with_mask.dtype == (torch.bool if training.accepts_boolean_logits_to_keep(model) else torch.long)
    modeling = sys.modules[type(model).__module__]
    slicer = getattr(modeling, "slice_logits_to_keep", None)
    if slicer is not None:
        del modeling.slice_logits_to_keep  # as in transformers 5.17's modeling_llama
    try:
        positions = training.model_collator(args, model, llama3_tokenizer, "cpu")(features())["logits_to_keep"]
    finally:
        if slicer is not None:
            modeling.slice_logits_to_keep = slicer
    assert positions.dim() == 1 and positions.tolist() == list(range(3, 13))


def test_measured_trainer_counts_scored_non_padding_targets(tmp_path):
    from transformers import TrainingArguments

    model = tiny_model()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=2)
    trainer = training.make_trainer_class()(model=model, args=args)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this test skips
    # The write-up's batch: labels = input ids everywhere, padding (attention 0) included.
    input_ids = torch.tensor([[5, 6, 7, 8, 2, 2], [5, 6, 7, 8, 9, 10]])
    attention = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    trainer.training_step(model, {"input_ids": input_ids, "attention_mask": attention, "labels": input_ids.clone()})
    assert int(trainer.scored_tokens) == 3 + 5  # targets after the first token, padding never


@pytest.mark.slow
def test_packed_run_trains_on_exactly_the_scored_tokens(tmp_path, tiny_llama_dir, records_path, llama3_tokenizer):
    """One epoch with --packing: the results JSON counts the tokens the examples hold, no more, no less."""
    import finetune

    output = tmp_path / "lora.json"
    argv = ["--model", tiny_llama_dir, "--dataset", records_path, "--max-train-samples", "8", "--max-val-samples", "2",
            "--max-eval-samples", "2", "--max-length", "4096", "--batch-size", "4", "--max-steps", "2",
            "--eval-steps", "2", "--packing", "--bootstrap-resamples", "10", "--general-file", "", "--output", output,
            "--output-dir", tmp_path / "lora"]
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        finetune.main(list(map(str, argv)))
    finally:
        for sig, handler in handlers.items():  # training installs its own; give pytest its own back
            signal.signal(sig, handler)
    results = json.loads(output.read_text())

    train, _, _ = common.split_records(common.load_records(str(records_path)))
    examples, _ = common.tokenize_records(llama3_tokenizer, common.take_subset(train, 8, 42), 4096)
    assert len(examples) == 8  # 2 steps x 4 = one epoch
    expected = sum(sum(label != PROMPT for label in example["labels"][1:]) for example in examples)
    assert results["config"]["packing"] is True and results["optimizer_steps"] == 2
    assert results["train_tokens"] == expected
    assert results["train_tokens_per_second"] == pytest.approx(expected / results["train_step_seconds"])
