"""The floors of the kit, read from the source (no import runs): the scripts on top, lvf/ below them, common.py (and
usage_error.py, the one exception class both raise) at the bottom. An import goes down, never up: nothing imports a
script, and common.py imports nothing of lvf."""

import ast
from pathlib import Path

import pytest

PROJECT_DIR = Path(__file__).resolve().parents[1]
SCRIPTS = {path.stem for path in PROJECT_DIR.glob("*.py")} - {"common", "usage_error"}  # finetune, study, report...
BENCH = {path.stem for path in (PROJECT_DIR / "bench").glob("*.py")}  # scripts too: each one is run, never imported
GROUND = {"common", "usage_error"}


def imported_modules(path):
    """The top-level name of every module the file imports, at its top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def modules(pattern):
    return sorted(PROJECT_DIR.glob(pattern))


def floor_of(path):
    return path.relative_to(PROJECT_DIR).as_posix()


@pytest.mark.parametrize("path", modules("*.py") + modules("lvf/*.py") + modules("bench/*.py"), ids=floor_of)
def test_nothing_imports_a_script(path):
    assert imported_modules(path) & (SCRIPTS | BENCH) == set()


@pytest.mark.parametrize("path", modules("lvf/*.py"), ids=floor_of)
def test_lvf_imports_only_itself_and_the_ground_floor_of_the_project(path):
    assert imported_modules(path) & (SCRIPTS | BENCH | GROUND | {"lvf"}) <= GROUND | {"lvf"}


def test_the_ground_floor_imports_nothing_of_the_kit_above_it():
    assert imported_modules(PROJECT_DIR / "common.py") & (SCRIPTS | BENCH | {"lvf"}) == set()
    assert imported_modules(PROJECT_DIR / "usage_error.py") == set()  # stdlib only: below common.py too


def test_the_reader_sees_imports_inside_functions_and_from_lists():
    """The check itself: lvf/plan.py imports lvf only inside functions (`from lvf import models`), and
    `from pathlib import Path` counts as pathlib."""
    assert "lvf" in imported_modules(PROJECT_DIR / "lvf" / "plan.py")
    assert {"ast", "pathlib", "pytest"} <= imported_modules(Path(__file__))
