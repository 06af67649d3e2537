"""Every command line in the README's (and docs/'s) code blocks that runs one of the kit's scripts parses:
the script's own parser accepts its flags, so a renamed flag cannot leave the documentation behind."""

import argparse
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

import common
from lvf.errors import UsageError

PROJECT_DIR = common.PROJECT_DIR
SCRIPTS = ["evaluate_base_model.py", "finetune.py", "full_finetune.py", "report.py", "study.py", "bench/throughput.py",
           "bench/gpu_check.py"]
CONTROL = {"&&", "||", ";", "|", "&"}
REDIRECT = {">", ">>", "<", "2>", "2>&1"}
FENCE = re.compile(r"^```[\w-]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def documents():
    return [PROJECT_DIR / "README.md", *sorted((PROJECT_DIR / "docs").glob("*.md"))]


def code_lines(text):
    """(line number, command) for each line of each fenced code block; backslash continuations joined."""
    for block in FENCE.finditer(text):
        first_line = text.count("\n", 0, block.start(1)) + 1
        pending, start = "", None
        for offset, line in enumerate(block.group(1).splitlines()):
            start = first_line + offset if not pending else start
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            yield start, pending + line
            pending = ""


def script_invocations(command):
    """(script, its arguments) for each kit script the shell line runs. Environment assignments, launchers
    (python, accelerate launch ...) and redirections are skipped; comments are dropped."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    segment = []
    for token in [*lexer, ";"]:
        if token not in CONTROL:
            segment.append(token)
            continue
        for index, word in enumerate(segment):
            if word.endswith(".py"):
                arguments = segment[index + 1:]
                cut = next((i for i, a in enumerate(arguments) if a in REDIRECT), len(arguments))
                yield word, arguments[:cut]
                break
        segment = []


def load_script(path):
    spec = importlib.util.spec_from_file_location(Path(path).stem + "_under_test", PROJECT_DIR / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def expanded_lines(text):
    """code_lines with NAME=value lines taken as a shell takes them: $NAME expanded in the lines after them."""
    variables = {}
    for line_number, command in code_lines(text):
        assignment = re.fullmatch(r"\s*([A-Za-z_]\w*)=(\S+)(\s+#.*)?", command)
        if assignment:
            variables[assignment.group(1)] = assignment.group(2)
            continue
        for name, value in variables.items():
            command = re.sub(rf"\${name}\b|\${{{name}}}", value, command)
        yield line_number, command


def problems_in(text, modules):
    """One line per command that names an unknown script or that its script's parser refuses."""
    found, checked = [], 0
    for line_number, command in expanded_lines(text):
        for script, arguments in script_invocations(command):
            if script not in modules:
                found.append(f"line {line_number}: {script} is not one of the kit's scripts: {command}")
                continue
            if "-h" in arguments or "--help" in arguments:
                continue
            checked += 1
            try:
                modules[script].parse_args(arguments)
            except SystemExit as error:
                found.append(f"line {line_number}: {script} refuses {arguments} (exit {error.code}): {command}")
            except UsageError as error:  # e.g. a --config file that does not exist or does not parse
                found.append(f"line {line_number}: {script} refuses {arguments} ({error}): {command}")
    return found, checked


@pytest.fixture(autouse=True)
def flags_in_full(monkeypatch):
    """argparse takes any unique prefix of a flag, so a documented flag that a rename left as a prefix of the new
    name would still parse: the documentation must spell every flag in full."""
    monkeypatch.setattr(argparse.ArgumentParser, "_get_option_tuples", lambda self, option_string: [])


@pytest.fixture(scope="module")
def modules():
    return {path: load_script(path) for path in SCRIPTS}


@pytest.mark.parametrize("document", documents(), ids=lambda path: path.name)
def test_every_documented_command_parses(document, modules):
    problems, _ = problems_in(document.read_text(encoding="utf-8"), modules)
    assert not problems, "\n".join(problems)


def test_the_readme_shows_commands_to_check(modules):
    _, checked = problems_in((PROJECT_DIR / "README.md").read_text(encoding="utf-8"), modules)
    assert checked >= 8  # the quick start and the GPU experiment: if none were found, the parser above is broken


def test_a_renamed_flag_or_script_is_caught(modules):
    text = ("```bash\nHF_HUB_OFFLINE=1 python finetune.py --lora-rank 8   # was renamed\n"
            "python report.py --check && python compare.py\n"
            "python finetune.py --lora-target q_proj   # abbreviated: argparse alone would take it\n"
            "accelerate launch --config_file configs/ddp.yaml finetune.py \\\n    --lora-r 8 --quantize 4bit\n```\n")
    problems, checked = problems_in(text, modules)
    assert checked == 4
    assert len(problems) == 3
    assert "line 2: finetune.py refuses ['--lora-rank', '8']" in problems[0]
    assert "compare.py is not one of the kit's scripts" in problems[1]
    assert "line 4: finetune.py refuses ['--lora-target', 'q_proj']" in problems[2]


def test_every_results_field_is_documented():
    """A field added to the results schema without a line in docs/results-schema.md fails here."""
    from lvf.results import RESULT_FIELDS

    documented = set(re.findall(r"`([a-z_0-9]+)`", (PROJECT_DIR / "docs" / "results-schema.md").read_text()))
    assert [field for field in RESULT_FIELDS if field not in documented] == []
