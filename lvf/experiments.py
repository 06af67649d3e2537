"""Experiments as files: one YAML file per experiment sets the scripts' defaults, and names the folder its results
go to (results/<name>/, outputs/<name>/).

    python finetune.py --config experiments/demo-cpu.yaml --learning-rate 3e-3   # the flag wins over the file

A file has up to six sections, each a mapping of flag names (as in --help, with - or _) to values:

    name: demo-cpu            # optional: the results folder's name (default: the file's stem)
    description: ...          # optional: one line, shown in the report's heading
    shared: {...}             # flags every script has (model, data, evaluation)
    training: {...}           # flags both training scripts have
    evaluate_base_model: {...}, finetune: {...}, full_finetune: {...}   # one script's own
    study: {...}              # study.py's: seeds, methods, learning-rate grids, ranks

A script reads `shared`, then `training` (training scripts), then its own section; a later section overrides an
earlier one and the command line overrides them all. Values go through argparse's own checks, as if typed on the
command line (yaml.safe_load into the parser's defaults rather than a second flag system: each flag keeps one
definition, its type check and its help), and a key no section's script knows is refused with the file's name.
"""

import argparse
import functools
import re
from pathlib import Path

import yaml

from lvf.errors import UsageError

SCRIPT_SECTIONS = ("evaluate_base_model", "finetune", "full_finetune")
SECTIONS = ("name", "description", "shared", "training", *SCRIPT_SECTIONS, "study")


@functools.cache
def _read(path):
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise UsageError(f"--config {path}: {error.strerror or error}") from None
    try:
        contents = yaml.safe_load(text)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise UsageError(f"--config {path}: not valid YAML{line}") from None
    if contents is None:
        contents = {}
    if not isinstance(contents, dict):
        raise UsageError(f"--config {path}: expected a mapping of sections ({', '.join(SECTIONS)})")
    unknown = sorted(set(contents) - set(SECTIONS))
    if unknown:
        raise UsageError(f"--config {path}: unknown section {unknown[0]!r} (sections: {', '.join(SECTIONS)})")
    for section in ("shared", "training", *SCRIPT_SECTIONS, "study"):
        if not isinstance(contents.get(section) or {}, dict):
            raise UsageError(f"--config {path}: section {section!r} must be a mapping of flag names to values")
    return contents


def load(path):
    """The file's contents (a mapping of sections), read and checked once per process."""
    return _read(str(path))


def experiment_name(config_path=None, model=None, dataset=None):
    """The results folder's name: the file's `name`, else its stem; without a file, one made from the model and
    the data, e.g. Meta-Llama-3-8B-Instruct--databricks-dolly-15k."""
    if config_path:
        name = load(config_path).get("name") or Path(config_path).stem
        return safe_name(str(name))
    model_part = Path(str(model).rstrip("/")).name or "model"
    data_part = Path(str(dataset).rstrip("/")).name
    data_part = Path(data_part).stem if Path(data_part).suffix.lower() in (".json", ".jsonl", ".csv", ".parquet") \
        else data_part
    return safe_name(f"{model_part}--{data_part}")


def safe_name(text):
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip(".-")
    if not name:
        raise UsageError(f"experiment name {text!r} has no usable characters (letters, digits, . _ -)")
    return name


def flag_values(path, sections):
    """The flags the given sections set, later sections overriding earlier ones: {flag_name: (value, where)}."""
    contents = load(path)
    values = {}
    for section in sections:
        for key, value in (contents.get(section) or {}).items():
            values[str(key).replace("-", "_")] = (value, f"{section}.{key}")
    return values


def apply_defaults(parser, path, sections):
    """Sets the parser's defaults from the file's sections (the command line still overrides them). Each value
    passes the flag's own type check and choices, as if given on the command line; an unknown key is refused."""
    actions = {action.dest: action for action in parser._actions if action.dest not in ("help", "config")}
    defaults = {}
    for dest, (value, where) in flag_values(path, sections).items():
        action = actions.get(dest)
        if action is None:
            raise UsageError(f"--config {path}: {where} is not a flag of {parser.prog} (see {parser.prog} --help)")
        defaults[dest] = checked_value(action, value, f"--config {path}: {where}")
    parser.set_defaults(**defaults)


def checked_value(action, value, where):
    """value converted and checked as argparse would the same text on the command line."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UsageError(f"{where}: expected true or false, got {value!r}")
        return value
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        items = value if isinstance(value, list) else [value]
        return [checked_value(_single(action), item, where) for item in items]
    if value is None:
        return None
    if isinstance(value, (list, dict)):
        raise UsageError(f"{where}: expected a single value, got {value!r}")
    text = str(value) if not isinstance(value, bool) else str(value).lower()
    try:
        converted = action.type(text) if action.type is not None else text
    except (argparse.ArgumentTypeError, ValueError, TypeError) as error:
        raise UsageError(f"{where}: {error or 'invalid value'} ({value!r})") from None
    if action.choices is not None and converted not in action.choices:
        raise UsageError(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return converted


def _single(action):
    """A copy of a list-valued action that checks one item."""
    return argparse.Action(option_strings=action.option_strings, dest=action.dest, type=action.type,
                           choices=action.choices)


def script_sections(script, training):
    """The sections a script reads, in order."""
    return ("shared", *(("training",) if training else ()), script)


def record(config_path):
    """What the results record of the file: its path as given, its name and its whole contents."""
    if not config_path:
        return None
    return {"file": str(config_path), "name": experiment_name(config_path), "contents": load(config_path)}
