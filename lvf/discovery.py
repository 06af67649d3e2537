"""Which experiments there are and where their results lie: the experiment files in experiments/, each
experiment's results folder (results/<name>/), the finished runs in a folder or in files named, and a study's
summary.json with the runs it names. Reads JSON and YAML only."""

import json
from dataclasses import dataclass
from pathlib import Path

from lvf import errors, experiments

PROJECT_DIR = Path(__file__).resolve().parent.parent
EXPERIMENTS_DIR = PROJECT_DIR / "experiments"


def shown_path(path):
    """A path as the README and the messages show it: relative to the project where it lies inside it."""
    try:
        return Path(path).resolve().relative_to(PROJECT_DIR).as_posix()
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------- experiments


@dataclass
class Experiment:
    """An experiment to report: its name (the README block's and the results folder's), folder and file."""
    name: str
    folder: Path
    config_file: str | None = None
    description: str | None = None
    shown_as: str | None = None  # how the README names the folder (--check reads a copy of it elsewhere)

    @property
    def shown(self):
        return self.shown_as or shown_path(self.folder)


def experiment_files():
    """{name: file} of the experiment files that ship in experiments/."""
    return {experiments.experiment_name(path): path for path in sorted(EXPERIMENTS_DIR.glob("*.yaml"))}


def experiment_from_file(path, results_root):
    contents = experiments.load(path)
    name = experiments.experiment_name(path)
    return Experiment(name, Path(results_root) / name, shown_path(path), contents.get("description"))


def experiment_named(name, results_root):
    """The experiment of a README block: from its file in experiments/ when one has that name."""
    path = experiment_files().get(name)
    if path is not None:
        return experiment_from_file(path, results_root)
    return Experiment(name, Path(results_root) / name)


# --------------------------------------------------------------------------- runs


def result_files(sources, skipped_folders=("history",)):
    """The given files, and every *.json under the given folders except those under skipped_folders (kept
    earlier versions: history/)."""
    seen = set()
    for source in map(Path, sources):
        paths = [source]
        if source.is_dir():
            paths = sorted(path for path in source.rglob("*.json")
                           if not set(skipped_folders) & set(path.relative_to(source).parts[:-1]))
        for path in paths:
            if path.resolve() not in seen:
                seen.add(path.resolve())
                yield path


def display_name(path):
    try:
        return str(path.resolve().relative_to(PROJECT_DIR))
    except ValueError:
        return str(path)


def load_results(sources, skipped_folders=("history",)):
    """Every finished run in the sources (a folder, or a list of files and folders), each with `source`, the
    file it came from. Dry runs and other JSON (a study's summary) are left out."""
    runs = []
    for path in result_files([sources] if isinstance(sources, (str, Path)) else sources, skipped_folders):
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and data.get("method") and data.get("per_example") and not data.get("dry_run"):
            runs.append({**data, "source": display_name(path)})
    return runs


# --------------------------------------------------------------------------- a study (study.py)


def is_study(folder):
    return (Path(folder) / "summary.json").is_file()


def study_summary(folder):
    path = Path(folder) / "summary.json"
    if not path.is_file():
        raise errors.UsageError(f"{folder}: no summary.json (run study.py, or name the folder it wrote)")
    return json.loads(path.read_text(encoding="utf-8"))


def study_files(folder, summary, rates_tried=True):
    """The results files the study's summary names, relative to its folder: the base model's and every method's
    runs at its picked learning rate (what the report's tables show), and with rates_tried the run at each rate
    tried (what the study's plots and findings read)."""
    try:
        files = [summary["base"]["file"]] if summary.get("base") else []
        for entry in summary["methods"].values():
            if rates_tried:
                files += [tried["file"] for tried in entry.get("learning_rates", {}).values() if tried.get("file")]
            files += [run["file"] for run in entry["runs"]]
    except KeyError as missing:
        raise errors.UsageError(f"{folder}: summary.json has no {missing} entries (an older study.py "
                                "wrote it): rerun the study command; it rewrites it from the finished runs") from None
    return list(dict.fromkeys(files))


def load_study_runs(folder, summary):
    """The runs' results JSON by file name (relative to the study folder, as the summary names them); files not
    written yet are left out."""
    found = {}
    for name in study_files(folder, summary):
        path = Path(folder) / name
        if path.is_file():
            found[name] = json.loads(path.read_text(encoding="utf-8"))
    return found
