"""The blocks of README.md and docs/ that are generated, not typed: the lines between <!-- NAME:start --> and
<!-- NAME:end -->, each rebuilt from what it shows. README.md's experiment blocks (NAME experiment:<name>) come from
the committed results (report.py builds them; --check compares them with the committed results through
committed_inputs); docs/performance.md's and docs/multi-gpu.md's memory-plan tables from the memory plan
(lvf.docs_tables).

Why not cog (cogapp), which generates and checks such blocks from Python written into the Markdown: the README's
check must compare the committed README with the committed results (git show HEAD:...), so that a local run which
rewrote results/ cannot fail `make test`, and cog checks the files in the working tree; the blocks' code would live
in Markdown comments, untested and unlinted; and the splicing it would replace is replace_block's six lines, not
worth a dependency.
"""

import contextlib
import re
import subprocess
import tempfile
from pathlib import Path

from lvf import errors

PROJECT_DIR = Path(__file__).resolve().parent.parent
EXPERIMENT_BLOCK = re.compile(r"<!-- experiment:([A-Za-z0-9._-]+):start -->")


def markers(name):
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def experiment_markers(name):
    return markers(f"experiment:{name}")


def readme_blocks(text):
    """The experiment names that have a block in the README, in order."""
    return EXPERIMENT_BLOCK.findall(text)


def replace_block(text, name, block_lines):
    """The text with the block NAME's lines replaced (NAME as in markers: experiment:<name> for an experiment's)."""
    start, end = markers(name)
    if start not in text or end not in text:
        raise errors.UsageError(f"the file has no {start} ... {end} markers")
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    return before + start + "\n" + "\n".join(block_lines) + "\n" + end + after


def block_lines(text, name):
    """The lines between the block NAME's markers, or None when the text has no such block."""
    start, end = markers(name)
    found = re.search(re.escape(start) + r"\n(.*?)\n" + re.escape(end), text, re.S)
    return found.group(1).split("\n") if found else None


# --------------------------------------------------------------------------- the committed files (report.py --check)


def git(folder, *args):
    """git's stdout in folder, or None outside a git checkout (an unpacked archive, or no git installed)."""
    try:
        out = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


@contextlib.contextmanager
def committed_inputs(results_root, readme):
    """(results root, README text) as committed at HEAD, so that `make test` checks what the repository ships, not
    a local run (a script's output, `make demo`) that rewrote results/ or the README. Yields the working tree's
    own files outside a git checkout, or for results outside the README's repository."""
    top = git(Path(readme).resolve().parent, "rev-parse", "--show-toplevel")
    try:
        root = Path(top.decode().strip()).resolve()
        readme_rel = Path(readme).resolve().relative_to(root).as_posix()
        results_rel = Path(results_root).resolve().relative_to(root).as_posix()
    except (AttributeError, ValueError):
        yield Path(results_root), Path(readme).read_text(encoding="utf-8")
        return
    listing = git(root, "ls-tree", "-r", "--name-only", "HEAD", results_rel + "/") or b""
    with tempfile.TemporaryDirectory() as folder:
        for name in listing.decode().splitlines():
            if name.endswith(".json"):
                target = Path(folder, Path(name).relative_to(results_rel))
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(git(root, "show", f"HEAD:{name}"))
        yield Path(folder), (git(root, "show", f"HEAD:{readme_rel}") or b"").decode("utf-8")
