"""--attn-implementation: sdpa by default, passed to the model, recorded; FlashAttention-2 asked for without
the flash-attn package stops with one clear line before anything loads."""

import importlib.util
import json

import pytest

import evaluate_base_model
import finetune
import full_finetune
from lvf import errors, models


@pytest.mark.parametrize("module", [evaluate_base_model, finetune, full_finetune])
def test_flash_attention_without_the_package_is_a_usage_error(module, tiny_llama_dir, tmp_path, capsys,
                                                              monkeypatch):
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    monkeypatch.setattr(models, "load_model", lambda *a, **kw: pytest.fail("a model was loaded"))
    argv = ["--model", str(tiny_llama_dir), "--general-file", "", "--attn-implementation", "flash_attention_2",
            "--output", str(tmp_path / "r.json")]
    if module is not evaluate_base_model:
        argv += ["--output-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        errors.main_guard(lambda: module.main(argv))
    assert exit_info.value.code == 2
    assert "needs the flash-attn package" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_the_chosen_attention_reaches_the_model_and_the_results(tiny_llama_dir, records_path, tmp_path, monkeypatch):
    loaded = []
    load_model = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **kw: loaded.append(load_model(*a, **kw)) or loaded[-1])
    output = tmp_path / "base.json"
    evaluate_base_model.main(["--model", str(tiny_llama_dir), "--dataset", str(records_path), "--max-eval-samples",
                              "2", "--general-file", "", "--attn-implementation", "eager", "--output", str(output)])
    assert loaded[0].config._attn_implementation == "eager"
    assert json.loads(output.read_text())["config"]["attn_implementation"] == "eager"
    assert evaluate_base_model.parse_args([]).attn_implementation == "sdpa"
