"""Bad input: one line on stderr, exit status 2, no traceback, no results file, and no model loaded.

Each case runs all three scripts in-process under errors.main_guard (exactly what `python script.py`
runs); one runs as a real subprocess to show the same from the command line.
"""

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest

import common
import evaluate_base_model
import finetune
import full_finetune
from lvf import errors, models

SCRIPTS = {"evaluate_base_model.py": evaluate_base_model, "finetune.py": finetune, "full_finetune.py": full_finetune}
TRAINING_SCRIPTS = {name: module for name, module in SCRIPTS.items() if name != "evaluate_base_model.py"}
GOOD = {"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "open_qa"}


@pytest.fixture(autouse=True)
def refuse_model_loads(monkeypatch):
    """Every error below must come before a model is loaded."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.delenv("LVF_DEBUG", raising=False)


def jsonl(tmp_path, *lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n",
                    encoding="utf-8")
    return path


@pytest.fixture
def fails_cleanly(tmp_path, capsys, tiny_llama_dir):
    """check(args, problem): each script exits with status 2, no traceback, no results file, and a
    message that names the problem. A real local model and writable outputs are given unless args name others."""
    def check(args, problem, scripts=SCRIPTS, usage_line=False):
        for name, module in scripts.items():
            output = tmp_path / "results" / f"{name}.json"
            argv = ["--model", str(tiny_llama_dir), "--output", str(output)]
            if name in TRAINING_SCRIPTS:
                argv += ["--output-dir", str(tmp_path / "outputs" / name)]
            argv += map(str, args)  # last: args may name other outputs
            with pytest.raises(SystemExit) as exit_info:
                errors.main_guard(lambda module=module, argv=argv: module.main(argv))
            err = capsys.readouterr().err
            assert exit_info.value.code == 2, (name, err)
            assert "Traceback" not in err, (name, err)
            assert problem in err, (name, err)
            if not usage_line:  # argparse's own errors come with a usage line first
                assert err.count("\n") == 1 and err.startswith("error: "), (name, err)
            assert not output.exists() and not output.parent.exists(), name

    return check


def test_missing_data_file(tmp_path, fails_cleanly):
    fails_cleanly(["--dataset", tmp_path / "nope.jsonl"], "data file not found")


def test_empty_data_file(tmp_path, fails_cleanly):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    fails_cleanly(["--dataset", tmp_path / "empty.jsonl"], "data file is empty")


def test_non_utf8_data_file_names_the_line(tmp_path, fails_cleanly):
    path = tmp_path / "latin1.jsonl"
    latin1 = json.dumps({**GOOD, "response": "Caf\u00e9"}, ensure_ascii=False).encode("latin-1")
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + latin1 + b"\n")
    fails_cleanly(["--dataset", path], "latin1.jsonl: line 2 is not valid UTF-8")


def test_malformed_json_names_the_line_counting_blank_lines(tmp_path, fails_cleanly):
    path = jsonl(tmp_path, GOOD, "", '{"instruction": "unterminated')
    fails_cleanly(["--dataset", path], "data.jsonl: line 3 is not valid JSON")


def test_line_that_is_not_an_object(tmp_path, fails_cleanly):
    path = jsonl(tmp_path, GOOD, '["instruction", "context", "response"]', GOOD)
    fails_cleanly(["--dataset", path], "data.jsonl: line 2 is not a JSON object")


def test_record_without_a_required_field_names_field_and_line(tmp_path, fails_cleanly):
    # The blank line makes record 3 sit on line 4: the message must give the line.
    incomplete = {key: value for key, value in GOOD.items() if key != "context"}
    path = jsonl(tmp_path, GOOD, "", GOOD, incomplete, GOOD)
    fails_cleanly(["--dataset", path], "data.jsonl: line 4 has no 'context' field")


def test_every_response_empty(tmp_path, fails_cleanly):
    path = jsonl(tmp_path, *[{**GOOD, "response": " "}] * 5)
    fails_cleanly(["--dataset", path], "every response is empty")


def test_eval_file_with_a_problem_is_named(tmp_path, fails_cleanly, records_path):
    path = jsonl(tmp_path, GOOD, {**GOOD, "instruction": None}, name="eval.jsonl")
    fails_cleanly(["--dataset", records_path, "--eval-file", path],
                  "eval.jsonl: line 2: 'instruction' must not be null")


def test_model_path_that_does_not_exist(tmp_path, fails_cleanly, records_path):
    fails_cleanly(["--dataset", records_path, "--model", tmp_path / "no-such-model"], "model not found")


def test_model_folder_without_safetensors_weights(tmp_path, fails_cleanly, records_path, tiny_llama_dir):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    fails_cleanly(["--dataset", records_path, "--model", folder], "has no .safetensors weights")


# --------------------------------------------------------------------------- outputs, checked before the work
# The data file does not exist: an output error that comes first was found before any data was read.


def test_results_path_under_a_file(tmp_path, fails_cleanly):
    (tmp_path / "a-file").write_text("not a folder")
    fails_cleanly(["--dataset", tmp_path / "nope.jsonl", "--output", tmp_path / "a-file" / "results.json"],
                  f"--output {tmp_path / 'a-file' / 'results.json'}: {tmp_path / 'a-file'} is a file, not a folder")


def test_output_dir_under_a_file(tmp_path, fails_cleanly):
    (tmp_path / "a-file").write_text("not a folder")
    fails_cleanly(["--dataset", tmp_path / "nope.jsonl", "--output-dir", tmp_path / "a-file" / "out"],
                  "a-file is a file, not a folder", scripts=TRAINING_SCRIPTS)


def test_results_path_that_is_a_folder(tmp_path, fails_cleanly):
    (tmp_path / "taken.json").mkdir()
    fails_cleanly(["--dataset", tmp_path / "nope.jsonl", "--output", tmp_path / "taken.json"],
                  "taken.json: is a folder; expected a file")


def test_history_folder_that_is_a_file(tmp_path, fails_cleanly):
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "history").write_text("where earlier results would be kept")
    fails_cleanly(["--dataset", tmp_path / "nope.jsonl", "--output", tmp_path / "kept" / "r.json"],
                  "--output (its history/ folder)")


@pytest.fixture
def unwritable_folder(tmp_path):
    """A real folder nobody may create files in. A folder with mode 0o500 is that for a user, but root writes
    there regardless (and the tests may run as root, as in a container): then /sys, where even root cannot
    create a file."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir(mode=0o500)
        yield folder
        folder.chmod(0o700)
    else:
        yield Path("/sys")


@pytest.mark.parametrize("flag", ["--output", "--output-dir"])
def test_output_in_a_folder_that_cannot_be_written(tmp_path, unwritable_folder, fails_cleanly, flag):
    scripts = TRAINING_SCRIPTS if flag == "--output-dir" else SCRIPTS
    fails_cleanly(["--dataset", tmp_path / "nope.jsonl", flag, unwritable_folder / "lvf-out" / "run.json"],
                  f"cannot write in {unwritable_folder}", scripts=scripts)


# --------------------------------------------------------------------------- broken model folders


@pytest.fixture
def model_copy(tmp_path, tiny_llama_dir):
    """A copy of the tiny model's folder, to break."""
    return Path(shutil.copytree(tiny_llama_dir, tmp_path / "model"))


def test_truncated_safetensors_is_named(records_path, fails_cleanly, model_copy):
    weights = model_copy / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)  # a download cut short
    fails_cleanly(["--dataset", records_path, "--model", model_copy], f"{weights}: truncated (the tensors end at byte")


def test_safetensors_with_an_impossible_header_length(records_path, fails_cleanly, model_copy):
    weights = model_copy / "model.safetensors"
    weights.write_bytes(b"<!DOCTYPE html><html>an error page saved in place of the weights</html>")
    fails_cleanly(["--dataset", records_path, "--model", model_copy], f"{weights}: truncated or not safetensors")


def test_safetensors_whose_header_is_not_json(records_path, fails_cleanly, model_copy):
    weights = model_copy / "model.safetensors"
    weights.write_bytes(struct.pack("<Q", 16) + b"{not json at all" + bytes(64))
    fails_cleanly(["--dataset", records_path, "--model", model_copy], f"{weights}: invalid safetensors header")


def test_a_model_file_changed_after_a_check_is_checked_again(model_copy):
    """The folder check keeps that a file parsed only while the file is unchanged (size, times, inode). Of the files
    it checks, config.json and the index are read again for their contents; the tokenizer's are only checked."""
    models.check_model_folder(model_copy)
    tokenizer_config = model_copy / "tokenizer_config.json"
    tokenizer_config.write_text(tokenizer_config.read_text()[:-20])
    with pytest.raises(errors.UsageError, match=re.escape(f"{tokenizer_config}: not valid JSON")):
        models.check_model_folder(model_copy)


def test_missing_shard_named_by_the_index(records_path, fails_cleanly, model_copy):
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    fails_cleanly(["--dataset", records_path, "--model", model_copy],
                  "names the shard model-00002-of-00002.safetensors, which is missing")


def test_model_folder_without_tokenizer_files(records_path, fails_cleanly, model_copy):
    (model_copy / "tokenizer.json").unlink()
    fails_cleanly(["--dataset", records_path, "--model", model_copy], "has no tokenizer files")


def test_config_that_does_not_parse_is_named(records_path, fails_cleanly, model_copy):
    config = model_copy / "config.json"
    config.write_text(config.read_text()[:-20])
    fails_cleanly(["--dataset", records_path, "--model", model_copy], f"{config}: not valid JSON (line")


def test_model_type_transformers_does_not_know(records_path, fails_cleanly, model_copy):
    config = model_copy / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_type": "llama-from-the-future"}))
    fails_cleanly(["--dataset", records_path, "--model", model_copy],
                  f"{config}: model_type 'llama-from-the-future' is not known to this transformers")


def test_max_length_zero(fails_cleanly):
    fails_cleanly(["--max-length", "0"], "argument --max-length: must be a positive integer", usage_line=True)


def test_negative_learning_rate(fails_cleanly):
    fails_cleanly(["--learning-rate=-1e-4"], "argument --learning-rate: must be a positive number", usage_line=True,
                  scripts=TRAINING_SCRIPTS)


def test_base_script_refuses_a_training_flag(fails_cleanly):
    fails_cleanly(["--learning-rate", "1e-4"], "unrecognized arguments: --learning-rate",
                  scripts={"evaluate_base_model.py": evaluate_base_model}, usage_line=True)


def test_max_eval_samples_zero(fails_cleanly):
    fails_cleanly(["--max-eval-samples", "0"], "argument --max-eval-samples: must be a positive integer",
                  usage_line=True)


def test_eval_file_that_leaves_nothing_to_evaluate(tmp_path, fails_cleanly):
    # Training examples fit in 96 tokens; every evaluation prompt is far longer, so nothing is left.
    long_prompt = {**GOOD, "context": "word " * 400}
    path = jsonl(tmp_path, *[long_prompt] * 3, name="eval.jsonl")
    short = [{**GOOD, "instruction": f"Name colour number {i}."} for i in range(12)]
    data = jsonl(tmp_path, *short, name="train.jsonl")
    fails_cleanly(["--dataset", data, "--eval-file", path, "--max-eval-samples", "2", "--max-length", "96"],
                  "nothing to evaluate")


def test_lora_targets_that_match_nothing(fails_cleanly):
    fails_cleanly(["--dry-run", "--lora-targets", "nope"], "--lora-targets nope", scripts={"finetune.py": finetune})


def test_training_refuses_to_mix_into_earlier_checkpoints(tmp_path, fails_cleanly, records_path):
    for name in TRAINING_SCRIPTS:
        (tmp_path / "outputs" / name / "checkpoint-3").mkdir(parents=True)
        (tmp_path / "outputs" / name / "checkpoint-3" / "trainer_state.json").write_text("{}")
    fails_cleanly(["--dataset", records_path], "pass --resume", scripts=TRAINING_SCRIPTS)


def test_debug_environment_variable_shows_the_exception(tmp_path, monkeypatch, tiny_llama_dir):
    monkeypatch.setenv("LVF_DEBUG", "1")
    with pytest.raises(errors.UsageError, match="data file not found"):
        errors.main_guard(lambda: finetune.main(["--model", str(tiny_llama_dir),
                                                 "--dataset", str(tmp_path / "nope.jsonl")]))


def test_debug_flag_lets_the_exception_through(tmp_path, monkeypatch, tiny_llama_dir):
    """`python full_finetune.py ... --debug`: main_guard reads --debug from the command line and lets the exception
    through, so Python prints its traceback and exits 1."""
    argv = ["--model", str(tiny_llama_dir), "--dataset", str(tmp_path / "nope.jsonl"), "--debug"]
    monkeypatch.setattr(sys, "argv", ["full_finetune.py", *argv])
    with pytest.raises(errors.UsageError, match="data file not found"):
        errors.main_guard(lambda: full_finetune.main(argv))


def test_offline_hub_id_not_in_cache(tmp_path, monkeypatch, fails_cleanly):
    # HF_HUB_OFFLINE=1, as huggingface_hub reads it when imported; the cache is an empty folder.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(common, "HF_HUB_CACHE", str(tmp_path / "hub"))
    fails_cleanly(["--model", "someone/some-model"], "model 'someone/some-model' is not a local path and "
                  "HF_HUB_OFFLINE=1 (not in the cache)")


def closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_hub_fails_fast(tmp_path, monkeypatch, fails_cleanly):
    """A Hub id with no Hub: online (what HF_HUB_OFFLINE unset gives huggingface_hub when it is imported), the
    endpoint (HF_ENDPOINT's) a closed local port, an empty cache. The request is made, and refused."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setattr(common, "HF_HUB_CACHE", str(tmp_path / "hub"))
    fails_cleanly(["--model", "someone/some-model"], "model 'someone/some-model' is not a local path and the Hub "
                  "cannot be reached (ConnectError)")


# --------------------------------------------------------------------------- from the command line


def run_script(script, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(common.PROJECT_DIR / script), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=120)


@pytest.mark.subprocess  # a fresh Python process: the command line as a user runs it
def test_command_line_bad_record_is_one_line_and_status_2(tmp_path, tiny_llama_dir):
    path = jsonl(tmp_path, GOOD, {"instruction": "x", "context": ""})
    result = run_script("finetune.py", "--model", tiny_llama_dir, "--dataset", path, "--output", tmp_path / "lora.json")
    assert result.returncode == 2
    assert result.stderr == f"error: {path}: line 2 has no 'response' field\n"
    assert not (tmp_path / "lora.json").exists()
