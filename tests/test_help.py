"""Every script's --help, as a user reads it: a whole-sentence description, each default said once, and each
flag described for the script it belongs to."""

import re

import pytest
from test_readme_commands import load_script

SCRIPTS = ["evaluate_base_model.py", "finetune.py", "full_finetune.py", "report.py", "study.py", "bench/gpu_check.py",
           "bench/gpu_smoke.py", "bench/throughput.py", "bench/throughput_worker.py"]


@pytest.fixture(scope="module")
def helps():
    """Each script's --help text, from its own parse_args, with lines wide enough that argparse wraps none (it
    breaks lines at hyphens, and a flag's name must stay whole to be checked)."""
    wide = pytest.MonkeyPatch()
    wide.setenv("COLUMNS", "2000")
    texts = {}
    for path in SCRIPTS:
        module = load_script(path)
        with pytest.raises(SystemExit) as exited, CapturedStdout() as captured:
            module.parse_args(["--help"])
        assert exited.value.code == 0
        texts[path] = (module, captured.text)
    wide.undo()
    return texts


class CapturedStdout:
    """argparse prints --help to sys.stdout; capsys is function-scoped, the fixture above is not."""

    def __enter__(self):
        import contextlib
        import io

        self.buffer = io.StringIO()
        self.redirect = contextlib.redirect_stdout(self.buffer)
        self.redirect.__enter__()
        return self

    def __exit__(self, *exc_info):
        self.redirect.__exit__(*exc_info)
        self.text = self.buffer.getvalue()
        return False


def description(text):
    """The paragraph between the usage lines and the first section (options:, positional arguments:)."""
    paragraphs = text.split("\n\n")
    return " ".join(paragraphs[1].split())


def option_helps(text):
    """{option string: its whole help, joined into one line}."""
    entries, current = {}, None
    for line in text.splitlines():
        match = re.match(r"^  (-[-\w]+)", line)
        if match:
            current = entries.setdefault(match.group(1), [])
            current.append(line.strip())
        elif line.startswith("   ") and current is not None:
            current.append(line.strip())
        else:
            current = None
    return {option: " ".join(parts) for option, parts in entries.items()}


def first_paragraph(docstring):
    return " ".join(docstring.strip().split("\n\n")[0].split())


@pytest.mark.parametrize("path", SCRIPTS)
def test_the_description_is_the_docstrings_whole_first_paragraph(path, helps):
    module, text = helps[path]
    shown = description(text)
    assert shown == first_paragraph(module.__doc__)  # not its first line, cut mid-sentence
    assert shown.endswith(".")


@pytest.mark.parametrize("path", SCRIPTS)
def test_each_default_is_said_once(path, helps):
    _, text = helps[path]
    options = option_helps(text)
    assert options, "no options found: the help parser above is broken"
    assert {option: help_text for option, help_text in options.items() if help_text.count("(default") > 1} == {}
    assert {option: help_text for option, help_text in options.items() if "(default: None)" in help_text} == {}


def test_full_fine_tunings_dtype_help_describes_full_fine_tuning(helps):
    full = option_helps(helps["full_finetune.py"][1])["--dtype"]
    assert "LoRA" not in full and "adapter" not in full
    assert "master weights" in full and "(default: float32)" in full
    assert "LoRA" in option_helps(helps["finetune.py"][1])["--dtype"]


def test_the_parser_of_this_test_reads_help_as_argparse_writes_it():
    text = ("usage: x [-h]\n\nA description that\n  wraps.\n\noptions:\n  -h, --help  show this help message and exit\n"
            "  --steps STEPS  optimizer steps (default 4) (default:\n                 None)\n  --tiny  a tiny one\n")
    assert description(text) == "A description that wraps."
    assert option_helps(text)["--steps"].count("(default") == 2
    assert option_helps(text)["--tiny"].endswith("a tiny one")
