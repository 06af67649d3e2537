"""Nothing lost (atomic writes, earlier results kept) and safe by default (no remote code, safetensors
only, no secret in the results)."""

import argparse
import json

import pytest

import finetune
from lvf import errors, models, results, settings, training


def test_results_are_written_atomically_and_earlier_ones_kept(tmp_path):
    path = tmp_path / "results" / "lora.json"
    results.write_json_atomic(path, {"run": 1})
    results.write_json_atomic(path, {"run": 2})
    results.write_json_atomic(path, {"run": 3})
    assert json.loads(path.read_text()) == {"run": 3}
    kept = sorted((tmp_path / "results" / "history").glob("lora-*.json"))
    assert [json.loads(item.read_text()) for item in kept] == [{"run": 1}, {"run": 2}]
    assert sorted(item.name for item in path.parent.iterdir()) == ["history", "lora.json"]  # no temporary left


def test_a_failed_write_leaves_the_earlier_results_in_place(tmp_path):
    path = tmp_path / "lora.json"
    results.write_json_atomic(path, {"run": 1})
    with pytest.raises(TypeError):
        results.write_json_atomic(path, {"run": object()})  # not serialisable: fails half-way through
    assert json.loads(path.read_text()) == {"run": 1}
    assert [item.name for item in tmp_path.iterdir()] == ["lora.json"]


def test_only_the_main_process_writes_results(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    results.finish({"method": "lora"}, tmp_path / "lora.json")
    assert not (tmp_path / "lora.json").exists()


@pytest.mark.slow
def test_results_that_cannot_be_written_at_the_end_are_kept_beside_the_model(tmp_path, monkeypatch, capsys,
                                                                             tiny_llama_dir, records_path):
    asked = tmp_path / "results" / "lora.json"
    save_artifact = training.save_artifact

    def then_the_results_folder_becomes_a_file(*args, **kwargs):
        saved = save_artifact(*args, **kwargs)
        (tmp_path / "results").write_text("took the results folder's place during the run")  # a real failure
        return saved

    monkeypatch.setattr(training, "save_artifact", then_the_results_folder_becomes_a_file)
    argv = ["--model", str(tiny_llama_dir), "--dataset", str(records_path), "--general-file", "",
            "--max-train-samples", "8",
            "--max-val-samples", "2", "--max-eval-samples", "4", "--max-length", "128", "--max-steps", "1",
            "--bootstrap-resamples", "10", "--output", str(asked), "--output-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        errors.main_guard(lambda: finetune.main(argv))

    kept = tmp_path / "out" / "results.json"
    err = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == errors.RESULTS_ELSEWHERE_EXIT_STATUS == 3, err[-1]
    assert err[-1].startswith(f"error: could not write the results to {asked} (")
    assert err[-1].endswith(f"they are in {kept}")
    assert json.loads(kept.read_text())["perplexity"] > 1
    assert (tmp_path / "out" / "final").is_dir()


def test_no_token_or_secret_reaches_the_results(tmp_path, monkeypatch, capsys, tiny_llama_dir):
    secret = "hf_NotARealTokenButLongEnough123"
    monkeypatch.setenv("HF_TOKEN", secret)
    args = finetune.parse_args(["--dry-run", "--model", str(tiny_llama_dir), "--output", str(tmp_path / "r.json"),
                                "--output-dir", str(tmp_path / "out")])
    # As if a flag or a library had put secrets among the settings:
    args = settings.freeze(argparse.Namespace(**settings.as_dict(args), hub_token=secret,
                                              api_key="another-secret-value", note=f"Bearer {secret}"))
    record = results.build_results(args, settings.training_runtime(args, "lora", "adamw_torch"), "lora")
    text = json.dumps(record)
    assert secret not in text and "another-secret-value" not in text
    assert "hub_token" not in record["config"] and "api_key" not in record["config"]
    assert record["config"]["note"] == "Bearer ***"

    finetune.main(["--dry-run", "--model", str(tiny_llama_dir), "--output", str(tmp_path / "dry.json")])
    assert secret not in (tmp_path / "dry.json").read_text()
    captured = capsys.readouterr()
    assert secret not in captured.out + captured.err


@pytest.mark.parametrize("method", ["base", "lora", "qlora", "full"])
def test_no_token_reaches_a_trained_runs_files_or_output(method, trained_run):
    from conftest import SESSION_SECRET

    run = trained_run(method)  # trained with SESSION_SECRET as HF_TOKEN (tests/conftest.py)
    assert run.results["perplexity"] > 1 and run.output
    written = [path for path in run.folder.rglob("*") if path.is_file() and path.suffix in (".json", ".txt", ".md")]
    assert run.results_path in written
    assert [path for path in written if SESSION_SECRET in path.read_text(errors="replace")] == []


class Stop(Exception):
    pass


@pytest.mark.parametrize("flag", [[], ["--trust-remote-code"]])
def test_remote_code_is_off_unless_asked_and_weights_are_safetensors_only(monkeypatch, flag):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calls = []

    def record(*args, **kwargs):
        calls.append(kwargs)
        raise Stop

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", record)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", record)
    args = finetune.parse_args(flag)
    for load in (lambda: models.load_model("some/model", None, "cpu", args.trust_remote_code),
                 lambda: models.load_tokenizer("some/model", args.chat_template, args.trust_remote_code)):
        with pytest.raises(Stop):
            load()
    model_kwargs, tokenizer_kwargs = calls
    assert model_kwargs["trust_remote_code"] is tokenizer_kwargs["trust_remote_code"] is bool(flag)
    assert model_kwargs["use_safetensors"] is True
