"""A saved adapter or model, evaluated again, is recorded under the method that trained it and the base it
was trained from: never as the base model's result, and never over its experiment's base.json."""

import json

import pytest

# The session's trained runs (tests/conftest.py, TRAINED_RUNS) are scored again on the examples they were scored on.
SMALL = ["--max-eval-samples", "12", "--max-length", "256", "--eval-batch-size", "3", "--general-file", ""]


@pytest.fixture(scope="module")
def trained(trained_run):
    """LoRA and full fine-tuning, and LoRA trained on a bf16 base; the base model is named as a user would (a
    folder here)."""
    return {name: trained_run(name) for name in ("lora", "full", "lora-bf16-autocast")}


def test_adapter_records_the_name_the_user_gave_as_its_base(trained, tiny_llama_64_dir, records_path):
    from lvf import experiments

    config = json.loads((trained["lora"].output_dir / "final" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_llama_64_dir)
    origin = json.loads((trained["lora"].output_dir / "final" / "origin.json").read_text())
    assert origin == {"method": "lora", "base_model": str(tiny_llama_64_dir),
                      "experiment": experiments.experiment_name(None, str(tiny_llama_64_dir), str(records_path))}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_saved_artifact_is_scored_under_its_own_method(trained, method, tiny_llama_64_dir, records_path, tmp_path,
                                                      monkeypatch):
    import evaluate_base_model
    from lvf import settings

    monkeypatch.setattr(settings, "PROJECT_DIR", tmp_path)  # the default results/ folder, in a scratch place
    folder = trained[method].output_dir / "final"
    evaluate_base_model.main(["--model", str(folder), "--dataset", str(records_path), *SMALL])
    # Beside the results of the experiment that trained it (origin.json), never over its base.json.
    experiment = json.loads((folder / "origin.json").read_text())["experiment"]
    assert not (tmp_path / "results" / experiment / "base.json").exists()
    evaluated = json.loads((tmp_path / "results" / experiment / f"eval-{method}-final.json").read_text())
    assert evaluated["method"] == method
    assert evaluated["model"] == str(folder) and evaluated["base_model"] == str(tiny_llama_64_dir)
    assert evaluated["trainable_params"] is None
    # The same examples, scored by the same weights, give the training run's own perplexity.
    assert evaluated["perplexity"] == pytest.approx(trained[method].results["perplexity"], rel=1e-4)


def test_lora_trained_on_a_bf16_base_is_scored_on_the_base_as_the_base_model_is(trained, records_path, tmp_path,
                                                                              monkeypatch):
    import evaluate_base_model
    from lvf import settings

    run = trained["lora-bf16-autocast"]
    result = run.results
    assert result["runtime"]["dtype"] == "bfloat16" and result["runtime"]["eval_dtype"] == "float32"
    parts = result["dtype_by_part"]
    assert parts["q_proj"] == parts["embed_tokens"] == "bfloat16" and parts["lora_A"] == "float32"
    assert result["eval_precision"]["weights"] == ["float32"]
    # Scoring the saved adapter on the fp32 base (what evaluate_base_model.py does, and how the base model
    # itself is scored) gives the training run's own figures: the adapters were not scored on the bf16 copy.
    monkeypatch.setattr(settings, "PROJECT_DIR", tmp_path)
    evaluate_base_model.main(["--model", str(run.output_dir / "final"), "--dataset", str(records_path), *SMALL])
    experiment = json.loads((run.output_dir / "final" / "origin.json").read_text())["experiment"]
    evaluated = json.loads((tmp_path / "results" / experiment / "eval-lora-bf16-autocast-final.json").read_text())
    assert evaluated["eval_precision"]["weights"] == ["float32"]
    assert ([item["nll_sum"] for item in evaluated["per_example"]]
            == pytest.approx([item["nll_sum"] for item in result["per_example"]], rel=1e-6))


def test_a_plain_model_folder_is_still_the_base_model(tiny_llama_dir):
    from lvf import artifacts

    assert artifacts.inspect_folder(str(tiny_llama_dir)) is None
    assert artifacts.inspect_folder("meta-llama/Meta-Llama-3-8B-Instruct") is None


def test_a_checkpoint_folder_finds_its_run_origin(trained, tiny_llama_64_dir):
    from lvf import artifacts

    checkpoint = next(trained["lora"].output_dir.glob("checkpoint-*"))
    found = artifacts.inspect_folder(str(checkpoint))
    assert found.is_adapter and found.method == "lora" and found.base_model == str(tiny_llama_64_dir)


def test_adapter_names_a_preset_base_by_its_preset_name_not_a_cache_path():
    import finetune
    from lvf import lora, models

    args = finetune.parse_args(["--model", "llama3-8b-instruct"])
    model = lora.add_adapters(models.meta_model(models.model_config(args.model)), args)
    assert model.peft_config["default"].base_model_name_or_path == "llama3-8b-instruct"


def test_lora_trained_and_scored_in_bf16_weights_runs_to_the_end(trained_run):
    # --dtype and --eval-dtype bfloat16 (CUDA's auto): the trained model itself is scored, without autocast, so peft
    # must cast the adapters' inputs to their fp32 again; training under autocast had turned that off.
    result = trained_run("lora-bf16-weights").results
    assert result["runtime"]["eval_dtype"] == "bfloat16" and result["perplexity"] > 0
    assert sorted(result["eval_precision"]["weights"]) == ["bfloat16", "float32"]


def test_scoring_on_another_base_leaves_the_trained_adapters_config_alone(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from lvf import adapters, lora

    trained = adapters.add_adapters(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                    lora.default_lora_config(), "q_proj")
    trained.peft_config["default"].base_model_name_or_path = "smollm2-135m"  # as lora.add_adapters names it
    scored = adapters.on_another_base(trained, AutoModelForCausalLM.from_pretrained(tiny_llama_dir))
    assert trained.peft_config["default"].base_model_name_or_path == "smollm2-135m"  # what its save records
    assert not any(parameter.requires_grad for parameter in scored.parameters())
