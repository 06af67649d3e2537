"""peft's LoRA variants by flag (--use-dora, --use-rslora, --init-lora-weights): exact counts on Llama-3-8B's
shapes, the options carried into peft's config and the saved adapter, and adapters whose init changes the base
weights (PiSSA, OLoRA) scored again on a fresh base."""

import json
import math

import pytest
import torch

import finetune
from lvf import adapters, defaults, lora, models

LLAMA_8B = "meta-llama/Meta-Llama-3-8B-Instruct"
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


def module_shapes(config):
    """(in_features, out_features) of Llama's q/k/v/o projections, from the model's config."""
    head_dim = config.hidden_size // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    hidden = config.hidden_size
    return {"q_proj": (hidden, config.num_attention_heads * head_dim), "k_proj": (hidden, kv),
            "v_proj": (hidden, kv), "o_proj": (config.num_attention_heads * head_dim, hidden)}


def dry_run(tmp_path, *flags):
    output = tmp_path / "out.json"
    finetune.main(["--dry-run", "--output", str(output), *flags])
    return json.loads(output.read_text())


@pytest.fixture(scope="module")
def llama_8b_shapes():
    config = models.model_config(LLAMA_8B)
    return config.num_hidden_layers, module_shapes(config)


def test_lora_and_dora_counts_follow_from_the_shapes(tmp_path, llama_8b_shapes):
    layers, shapes = llama_8b_shapes
    rank = defaults.LORA.lora_r
    # LoRA: A (r x in) and B (out x r) per adapted module; DoRA adds one magnitude per output feature.
    lora_params = layers * sum(rank * (fan_in + fan_out) for fan_in, fan_out in (shapes[name] for name in QKVO))
    magnitudes = layers * sum(shapes[name][1] for name in QKVO)
    assert (lora_params, magnitudes) == (13_631_488, 32 * (4096 + 1024 + 1024 + 4096))  # 327,680
    plain = dry_run(tmp_path)
    dora = dry_run(tmp_path, "--use-dora")
    assert plain["trainable_params"] == lora_params
    assert dora["trainable_params"] == lora_params + magnitudes
    assert dora["total_params"] == plain["total_params"] + magnitudes
    assert dora["config"]["use_dora"] is True and plain["config"]["use_dora"] is False


@pytest.mark.parametrize("flags", [["--use-rslora"], ["--init-lora-weights", "pissa"],
                                   ["--init-lora-weights", "olora"], ["--init-lora-weights", "gaussian"]])
def test_scaling_and_init_leave_the_counts_as_lora(tmp_path, flags):
    # PiSSA's SVD and OLoRA's QR cannot run on the meta device: the dry run builds them with the default init,
    # which has the same shapes.
    result = dry_run(tmp_path, *flags)
    assert result["trainable_params"] == 13_631_488 and result["total_params"] == 8_043_892_736
    assert result["config"]["init_lora_weights"] == (flags[1] if len(flags) > 1 else "true")


def test_the_flags_reach_peft(tiny_model):
    args = finetune.parse_args(["--use-dora", "--use-rslora", "--init-lora-weights", "gaussian",
                                "--lora-r", "4", "--lora-alpha", "8", "--lora-targets", "q_proj"])
    config = lora.lora_config(args)
    assert (config.use_dora, config.use_rslora, config.init_lora_weights) == (True, True, "gaussian")
    model = adapters.add_adapters(tiny_model, config, "q_proj")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(4))  # rsLoRA: alpha/sqrt(r), not alpha/r = 2
    assert layer.lora_magnitude_vector["default"].weight.shape == (layer.out_features,)
    default_config = lora.lora_config(finetune.parse_args([]))
    assert (default_config.use_dora, default_config.use_rslora, default_config.init_lora_weights) == (
        False, False, True)
    assert default_config == lora.default_lora_config()


def test_inits_that_change_the_base_are_refused_with_4bit(capsys):
    with pytest.raises(SystemExit) as stopped:
        finetune.parse_args(["--quantize", "4bit", "--init-lora-weights", "pissa"])
    assert stopped.value.code == 2 and "cannot be combined with --quantize 4bit" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        finetune.parse_args(["--init-lora-weights", "loftq"])  # needs a config of its own: not offered


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with a small vocabulary: only its forward pass is used."""
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama-512")
    LlamaForCausalLM(tiny_llama_config(vocab_size=512, bos_token_id=1, eos_token_id=2)).save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_model(tiny_model_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_init_from_the_weights_is_reproduced_on_a_fresh_base(tiny_model_dir, tiny_model, tmp_path, init):
    """PiSSA and OLoRA subtract their first adapter from the base weights; peft saves the adapter alone and redoes
    the init when loading it. Loading it (and on_another_base, used for scoring) on an unchanged base must give the
    trained model's outputs."""
    from transformers import LlamaForCausalLM

    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    untouched = tiny_model(ids).logits
    model = adapters.add_adapters(tiny_model, adapters.lora_config(4, 8, 0.0, "q_proj,v_proj",
                                                                   init_lora_weights=init), "q_proj,v_proj").eval()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_B["default"].weight.abs().sum() > 0  # not LoRA's zero B: the init did run
    assert torch.allclose(model(ids).logits, untouched, atol=1e-4)  # the residual base + adapter = the base
    with torch.no_grad():  # stands for training
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    trained = model(ids).logits
    assert not torch.allclose(trained, untouched, atol=1e-3)
    model.save_pretrained(tmp_path / "adapter")
    loaded = adapters.load_adapter(LlamaForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    assert torch.allclose(loaded(ids).logits, trained, atol=1e-5)
    moved = adapters.on_another_base(model, LlamaForCausalLM.from_pretrained(tiny_model_dir))
    assert torch.allclose(moved(ids).logits, trained, atol=1e-5)


SMALL = ["--max-eval-samples", "6", "--max-length", "256", "--eval-batch-size", "3", "--general-file", ""]
TRAIN = ["--max-train-samples", "8", "--max-val-samples", "3", "--max-steps", "2", "--eval-steps", "1"]


@pytest.mark.slow
@pytest.mark.parametrize("flag,key", [("--use-dora", "use_dora"), ("--use-rslora", "use_rslora")])
def test_a_variant_trains_saves_its_option_and_is_scored_again(flag, key, tiny_llama_dir, records_path, tmp_path,
                                                             monkeypatch):
    import evaluate_base_model
    import finetune
    from lvf import settings

    data = ["--model", str(tiny_llama_dir), "--dataset", str(records_path), *SMALL]
    finetune.main([*data, *TRAIN, flag, "--output", str(tmp_path / "run.json"), "--output-dir", str(tmp_path / "run")])
    result = json.loads((tmp_path / "run.json").read_text())
    saved = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert result["config"][key] is True and saved[key] is True
    other = "use_rslora" if key == "use_dora" else "use_dora"
    assert saved[other] is False
    monkeypatch.setattr(settings, "PROJECT_DIR", tmp_path)  # the default results/ folder, in a scratch place
    evaluate_base_model.main(["--model", str(tmp_path / "run" / "final"), "--dataset", str(records_path), *SMALL])
    experiment = json.loads((tmp_path / "run" / "final" / "origin.json").read_text())["experiment"]
    evaluated = json.loads((tmp_path / "results" / experiment / "eval-run-final.json").read_text())
    assert evaluated["method"] == "lora"
    assert evaluated["perplexity"] == pytest.approx(result["perplexity"], rel=1e-4)


def test_report_groups_variants_apart_and_old_runs_with_the_defaults(tmp_path):
    from test_report import LORA, at, fake_run, render, write_runs

    from lvf import groups

    runs = {"base": fake_run("base", 1.0),
            "lora-old": fake_run("lora", 0.70, seed=42, **LORA),  # recorded before the variant flags existed
            "lora-new": fake_run("lora", 0.72, seed=43, config={"use_dora": False, "use_rslora": False,
                                                                "init_lora_weights": "true"}, **LORA),
            "dora": fake_run("lora", 0.65, config={"use_dora": True}, **LORA),
            "pissa": fake_run("lora", 0.66, config={"init_lora_weights": "pissa", "use_rslora": True}, **LORA)}
    rows, _ = render(tmp_path, *at(write_runs(tmp_path / "results", runs)))
    labels = {line.split(" | ")[0][2:] for line in rows if " − " not in line.split(" | ")[0]} - {"method", "---"}
    assert labels >= {"LoRA (DoRA False, rsLoRA False, init true)", "LoRA (DoRA True, rsLoRA False, init true)",
                      "LoRA (DoRA False, rsLoRA True, init pissa)"}
    plain = next(line for line in rows if line.startswith("| LoRA (DoRA False, rsLoRA False, init true) |"))
    assert "| 42, 43 |" in plain  # the old run and the one with the defaults named are one group
    assert set(groups.SETTING_DEFAULTS) <= set(groups.VARIANT_KEYS.split(","))
    assert groups.SETTING_DEFAULTS == {key: getattr(defaults.LORA, key) for key in groups.SETTING_DEFAULTS}
