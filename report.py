"""Turns an experiment's results JSON files into its report: a table, comparisons between groups of runs, and plots.

    python report.py --config experiments/demo-cpu.yaml   # results/demo-cpu/: report.md, plots, the README block
    python report.py results/demo-cpu                     # the same, named by its results folder
    python report.py                                      # every experiment that has a block in the README
    python report.py --check                              # exit 1 if a committed README block is stale (make test, CI)
    python report.py results/a.json results/b.json        # an ad hoc table of these files, printed only
    python report.py --allow-intersection ...             # compare runs on the examples they share, and say so

Each experiment has a results folder (results/<name>/) and a block in the README between
<!-- experiment:<name>:start --> and <!-- experiment:<name>:end -->; the report writes report.md and the plots
into the folder and rebuilds the block, headed by the experiment's description and captioned with model, data,
machine, date and commit. An experiment with no results yet shows "not run yet". A study's folder (with
summary.json, from study.py) reports the base model and each method's runs at its picked learning rate, with the
rates tried.

Runs are grouped by method and variant: the settings named by --variant-keys, everything that tells runs of one
method apart except the training seed. A group of several seeds shows mean ± sd across seeds. A comparison's
point estimate is the difference of the groups' mean perplexities (each run's perplexity is exp(Σ NLL / Σ tokens)
on the compared examples); its interval is a two-level bootstrap: the seeds of each group are resampled, then the
examples, the same examples for both groups (paired by id), so it covers training-seed variance and example
sampling. Runs evaluated on different examples (ids or per-example token counts) are refused, one line naming
them, unless --allow-intersection compares them on the shared examples and the table says so.
"""

import argparse
import contextlib
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from lvf import benchmark_tables, errors, experiments, findings, plots
from lvf.bootstrap import (
    example_tokens,
    interval,
    mean_perplexity,
    run_matrices,
    shared_ids,
    two_level_draws,
)
from lvf.cli import HelpFormatter, description
from lvf.files import write_atomic

PROJECT_DIR = Path(__file__).resolve().parent
EXPERIMENTS_DIR = PROJECT_DIR / "experiments"
BLOCK = re.compile(r"<!-- experiment:([A-Za-z0-9._-]+):start -->")
METHOD_ORDER = ["base", "lora", "qlora", "full"]
METHOD_LABELS = {"base": "Zero-shot (base)", "lora": "LoRA", "qlora": "QLoRA", "full": "Full fine-tuning"}
METHOD_COLORS = {"base": "#888888", "lora": "#1f77b4", "qlora": "#17becf", "full": "#d62728"}
VARIANT_COLORS = ["#2ca02c", "#ff7f0e", "#8c564b", "#e377c2"]
PAIRS = [("lora", "full"), ("qlora", "full"), ("lora", "base"), ("qlora", "base"), ("full", "base")]
UNTRAINED = {"base"}  # no training seed: one run measures it fully
VARIANT_KEYS = ("model,dataset,eval_file,learning_rate,lora_targets,lora_r,quantize,"
                "use_dora,use_rslora,init_lora_weights")
SHORT_KEYS = {"learning_rate": "lr", "lora_targets": "targets", "lora_r": "r", "eval_file": "eval",
              "use_dora": "DoRA", "use_rslora": "rsLoRA", "init_lora_weights": "init"}
# finetune.py's LoRA variants, as a run made before their flags existed was trained: peft's defaults. So such a
# run groups with one made with the defaults named.
SETTING_DEFAULTS = {"use_dora": False, "use_rslora": False, "init_lora_weights": "true"}
ONE_RUN_EACH = "one run each: seed variance not measured"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=description(__doc__),
                                     formatter_class=HelpFormatter)
    parser.add_argument("sources", nargs="*", type=Path,
                        help="an experiment's results folder (results/<name>), or results JSON files for an ad hoc "
                             "table printed only; default: every experiment with a block in the README")
    parser.add_argument("--config", type=Path, default=None, metavar="FILE.yaml",
                        help="the experiment file: its results folder (results/<name>) is reported")
    parser.add_argument("--results-root", type=Path, default=PROJECT_DIR / "results",
                        help="the folder that holds each experiment's results folder (<name>/)")
    parser.add_argument("--readme", type=Path, default=PROJECT_DIR / "README.md",
                        help="Markdown file whose experiment blocks receive the tables")
    parser.add_argument("--check", action="store_true",
                        help="only check that the README's experiment blocks match the results; inside a git "
                             "checkout it checks the committed README and results, so local runs cannot fail it")
    parser.add_argument("--variant-keys", default=VARIANT_KEYS,
                        help="comma-separated settings (a results field, else a config field) that tell runs of "
                             "one method apart; runs that differ only in others (the seed) are one group")
    parser.add_argument("--allow-intersection", action="store_true",
                        help="compare runs evaluated on different examples on the examples they share")
    parser.add_argument("--seed", type=int, default=42, help="seed of the bootstrap")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- runs and groups


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


def setting(run, key):
    """A results field, else the config field of that name, as a hashable value."""
    value = run[key] if key in run else (run.get("config") or {}).get(key, SETTING_DEFAULTS.get(key))
    return json.dumps(value) if isinstance(value, (list, dict)) else value


@dataclass
class Group:
    """Runs of one method and variant: they differ only in the training seed."""
    method: str
    variant: tuple
    runs: list
    label: str = ""

    @property
    def seeds_measured(self):
        return self.method in UNTRAINED or len({run.get("seed") for run in self.runs}) >= 2

    def mean(self, key):
        values = [run[key] for run in self.runs if run.get(key) is not None]
        return float(np.mean(values)) if values else None


def method_rank(method):
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def group_runs(runs, variant_keys):
    found = {}
    for run in runs:
        variant = tuple((key, setting(run, key)) for key in variant_keys)
        found.setdefault((run["method"], variant), []).append(run)
    ordered = sorted(found.items(), key=lambda item: (method_rank(item[0][0]), item[0][0], variant_order(item[0][1])))
    groups = [Group(method, variant, sorted(members, key=run_order))
              for (method, variant), members in ordered]
    for group in groups:
        group.label = group_label(group, groups)
    return groups


def variant_order(variant):
    """Variants in the order of their settings, numbers by value (r 4 before r 16), other values as text."""
    return tuple((key, (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool)
                  else (1, 0, repr(value))) for key, value in variant)


def run_order(run):
    return run.get("seed") is None, run.get("seed") or 0, run["source"]


def group_label(group, groups):
    """The method's name, plus the variant settings that differ between this method's groups."""
    label = METHOD_LABELS.get(group.method, group.method)
    siblings = [other.variant for other in groups if other.method == group.method]
    differing = [(key, value) for index, (key, value) in enumerate(group.variant)
                 if len({variant[index][1] for variant in siblings}) > 1]
    if not differing:
        return label
    return f"{label} ({', '.join(f'{SHORT_KEYS.get(key, key)} {fmt_setting(value)}' for key, value in differing)})"


def fmt_setting(value):
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str) and value.startswith("["):
        return "+".join(json.loads(value))
    return str(value)


def compared_pairs(groups):
    """(a, b) group pairs to compare: the method pairs of PAIRS, on the same model."""
    return [(a, b) for first, second in PAIRS for a in groups for b in groups
            if a.method == first and b.method == second and setting(a.runs[0], "model") == setting(b.runs[0], "model")]


# --------------------------------------------------------------------------- same examples or refuse


def mismatch(run_a, run_b, field="per_example"):
    """None when both runs scored the same examples with the same token counts, else how they differ."""
    a, b = example_tokens(run_a, field), example_tokens(run_b, field)
    if a == b:
        return None
    shared = a.keys() & b.keys()
    if a.keys() != b.keys():
        return f"{len(a)} vs {len(b)} examples, {len(shared)} shared"
    return f"same {len(a)} examples, token counts differ on {sum(a[i] != b[i] for i in shared)}"


def mismatches(groups):
    """Every pair of runs that would be compared though they were evaluated on different examples."""
    found = []
    for group in groups:
        found += [(group.runs[0], run) for run in group.runs[1:]]
    found += [(a.runs[0], b.runs[0]) for a, b in compared_pairs(groups)]
    general = [(a, b) for a, b in found if a.get("general_per_example") and b.get("general_per_example")]
    return ([(a, b, why) for a, b in found if (why := mismatch(a, b))]
            + [(a, b, f"general text: {why}") for a, b in general if (why := mismatch(a, b, "general_per_example"))])


def refuse_different_examples(groups):
    found = mismatches(groups)
    if found:
        named = "; ".join(f"{a['source']} vs {b['source']} ({why})" for a, b, why in found)
        raise errors.UsageError(f"runs evaluated on different examples: {named}; compare runs of one evaluation "
                                "set, or pass --allow-intersection to compare them on the examples they share")


# --------------------------------------------------------------------------- two-level bootstrap


def compare(group_a, group_b, seed, resamples, field="per_example"):
    """Mean perplexity of a minus b on the examples every run of both scored, with its two-level interval;
    None when they share no example."""
    sides = [group_a.runs, group_b.runs]
    if not all(run.get(field) for run in group_a.runs + group_b.runs):
        return None
    ids = shared_ids(group_a.runs + group_b.runs, field)
    if not ids:
        return {"examples": 0, "of": max(len(run[field]) for run in group_a.runs + group_b.runs)}
    draw_a, draw_b = two_level_draws(sides, ids, seed, resamples, field)
    low, high = interval(draw_a - draw_b)
    return {"difference": mean_perplexity(group_a.runs, ids, field) - mean_perplexity(group_b.runs, ids, field),
            "ci95": [low, high], "examples": len(ids),
            "of": max(len(run[field]) for run in group_a.runs + group_b.runs),
            "significant": not low <= 0 <= high}


def comparisons(groups, seed, resamples):
    return [(a, b, compare(a, b, seed, resamples), compare(a, b, seed, resamples, "general_per_example"))
            for a, b in compared_pairs(groups)]


def group_summary(group, seed, resamples):
    """Mean ± sd across the group's runs and the two-level interval of the mean; one run keeps its own
    recorded perplexity and interval."""
    ids = shared_ids(group.runs)
    if not ids:  # only with --allow-intersection: runs of one group scored on different examples
        return {"mean": None, "sd": None, "ci95": None, "examples": 0}
    complete = all(len(run["per_example"]) == len(ids) for run in group.runs)
    if len(group.runs) == 1 and complete:
        run = group.runs[0]
        return {"mean": run["perplexity"], "sd": None, "ci95": run["perplexity_ci95"], "examples": len(ids)}
    nll, tokens = run_matrices(group.runs, ids)
    per_run = np.exp(nll.sum(1) / tokens.sum(1))
    (draws,) = two_level_draws([group.runs], ids, seed, resamples)
    return {"mean": float(per_run.mean()), "sd": float(per_run.std(ddof=1)) if len(per_run) > 1 else None,
            "ci95": interval(draws), "examples": len(ids)}


# --------------------------------------------------------------------------- formatting


def fmt_bytes(value):
    if value is None:
        return "–"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def fmt_seconds(value):
    if value is None:
        return "–"
    return f"{value / 60:.1f} min" if value >= 120 else f"{value:.0f} s"


def fmt_number(value, digits=3):
    if value is None:
        return "–"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}f}"


def fmt_params(count, percent):
    if count is None:
        return "–"
    millions = f"{count / 1e6:,.2f} M" if count < 1e9 else f"{count / 1e9:,.2f} B"
    return f"{millions} ({percent:.2f}%)" if percent is not None else millions


BREAKDOWN_PARTS = ("weights", "gradients", "optimizer_states", "other")


def breakdown_parts(run):
    """Training's peak split into BREAKDOWN_PARTS (weights summed over dtypes), or None when not measured."""
    breakdown = run.get("train_memory_breakdown")
    if not breakdown or breakdown.get("other") is None:
        return None
    return {"weights": sum(breakdown["weights_by_dtype"].values()), **{part: breakdown[part]
                                                                      for part in BREAKDOWN_PARTS[1:]}}


def group_breakdown(group):
    """Each part's mean over the group's runs that measured one (only `other` varies with the seed)."""
    measured = [parts for run in group.runs if (parts := breakdown_parts(run)) is not None]
    if not measured:
        return None
    return {part: float(np.mean([parts[part] for parts in measured])) for part in BREAKDOWN_PARTS}


def fmt_training_peak(group):
    """Training's own peak, and what it holds: weights + gradients + optimizer states + the rest."""
    parts = group_breakdown(group)
    peak = fmt_bytes(group.mean("train_peak_memory_bytes"))
    if parts is None:
        return peak
    return f"{peak} = " + " + ".join(fmt_bytes(parts[part]) for part in BREAKDOWN_PARTS)


def fmt_seeds(group):
    return ", ".join(str(run.get("seed")) for run in group.runs)


def fmt_perplexity(summary):
    if summary["mean"] is None:
        return "– (its runs share no example)"
    low, high = summary["ci95"]
    spread = f" ± {fmt_number(summary['sd'])}" if summary["sd"] is not None else ""
    return f"{fmt_number(summary['mean'])}{spread} ({fmt_number(low)}–{fmt_number(high)})"


def results_table(groups, seed, resamples):
    header = ("| method | model | data | seeds | perplexity: mean ± sd over seeds (95% CI) | write-up's metric "
              "| trainable params | peak memory (whole run) | training peak = weights + gradients + optimizer + other "
              "| training step time | train tokens/s (steps) | artifact |")
    lines = [header, "|" + " --- |" * 12]
    for group in groups:
        run = group.runs[0]
        data = run.get("eval_file") or run.get("dataset") or "–"
        lines.append(
            f"| {group.label} | `{run['model']}` | `{data}` | {fmt_seeds(group)} "
            f"| {fmt_perplexity(group_summary(group, seed, resamples))} "
            f"| {fmt_number(group.mean('seed_style_perplexity'), 2)} "
            f"| {fmt_params(group.mean('trainable_params'), group.mean('trainable_percent'))} "
            f"| {fmt_bytes(group.mean('peak_memory_bytes'))} "
            f"| {fmt_training_peak(group)} "
            f"| {fmt_seconds(group.mean('train_step_seconds'))} "
            f"| {fmt_number(group.mean('train_tokens_per_second'), 1)} "
            f"| {fmt_bytes(group.mean('artifact_bytes'))} |"
        )
    return lines


def verdict(group_a, group_b, result):
    """Significance only where both sides' seed variance is measured; one run each never says it."""
    if result.get("difference") is None:
        return "not compared: evaluated on different examples (none shared)"
    unmeasured = [group for group in (group_a, group_b) if not group.seeds_measured]
    if unmeasured:
        if all(len(group.runs) == 1 for group in (group_a, group_b)):
            return ONE_RUN_EACH
        return "; ".join(f"{'one run' if len(group.runs) == 1 else 'one seed'} of {group.label}: seed variance "
                         "not measured" for group in unmeasured)
    if result["significant"]:
        return f"{group_a.label} is {'lower' if result['difference'] < 0 else 'higher'} (significant)"
    return "not significant: the interval contains 0"


def fmt_difference(result):
    if result is None or result.get("difference") is None:
        return "–"
    low, high = result["ci95"]
    return f"{result['difference']:+.3f} ({low:+.3f} to {high:+.3f})"


def fmt_examples(result):
    if result["examples"] == result["of"]:
        return str(result["examples"])
    return f"{result['examples']} of {result['of']} (shared only)"


def comparison_lines(found):
    if not found:
        return []
    forgetting = any(general is not None for *_, general in found)
    header = "| comparison | perplexity difference (95% CI) | paired examples | verdict |"
    if forgetting:
        header += " forgetting: general-text perplexity difference (95% CI) |"
    lines = ["", header, "|" + " --- |" * (header.count("|") - 1)]
    for a, b, result, general in found:
        line = f"| {a.label} − {b.label} | {fmt_difference(result)} | {fmt_examples(result)} "
        lines.append(line + f"| {verdict(a, b, result)} |" + (f" {fmt_difference(general)} |" if forgetting else ""))
    return lines


def intersection_notes(groups, found):
    """Says which groups and comparisons stand on the shared examples only (--allow-intersection)."""
    notes = []
    for group in groups:
        ids = shared_ids(group.runs)
        if any(len(run["per_example"]) != len(ids) for run in group.runs):
            notes.append(f"{group.label} (seeds {fmt_seeds(group)}) on the {len(ids)} examples its runs share")
    notes += [f"{a.label} and {b.label} on {result['examples']} shared examples of {result['of']}"
              for a, b, result, _ in found if result["examples"] != result["of"]]
    if not notes:
        return []
    return ["", f"_Runs evaluated on different examples, compared on the shared ones only (--allow-intersection): "
                f"{'; '.join(notes)}._"]


def fmt_machine(machine, device):
    """e.g. "NVIDIA H100 80GB HBM3 (79.2 GiB)" or "AMD EPYC, 2 cores, AVX512-BF16"; older results recorded only the
    device."""
    if not machine:
        return f"{device or '?'} (machine not recorded)"
    if machine.get("gpu"):
        gpu = machine["gpu"]
        count = f"{gpu['count']} x " if gpu.get("count", 1) > 1 else ""
        return f"{count}{gpu['name']} ({fmt_bytes(gpu['memory_bytes'])})"
    bf16 = ", ".join(flag.upper().replace("_BF16", "-BF16") for flag in machine.get("cpu_bf16") or [])
    return ", ".join(part for part in (machine.get("cpu") or "CPU", f"{machine.get('cpu_count')} cores", bf16) if part)


def caption(runs, config_file=None):
    """What the block's numbers are: model, data, machine, date and commit, and where they live."""
    models = sorted({f"`{run['model']}`" for run in runs})
    data = sorted({f"`{run.get('eval_file') or run.get('dataset') or '?'}`" for run in runs})
    machines = sorted({fmt_machine(run.get("machine"), run.get("device")) for run in runs})
    dates = sorted(run["created_at"][:10] for run in runs if run.get("created_at"))
    commits = sorted({(run.get("git_commit") or "uncommitted")[:7] for run in runs})
    when = f"{dates[0] if dates else '?'}{' to ' + dates[-1] if dates and dates[-1] != dates[0] else ''}"
    source = f"; `{config_file}`" if config_file else ""
    return (f"_Model {', '.join(models)} on {', '.join(data)}; machine: {'; '.join(machines)}; run on {when}; "
            f"commit {', '.join(commits)}{source}._")


METHOD_NOTE = ("_Perplexity is exp(Σ NLL / Σ response tokens) on the held-out split; the write-up's metric scores "
               "padding and prompt and is shown only to explain its numbers. A difference is of mean perplexities "
               "across seeds; its interval resamples seeds, then examples paired by id._")


def render_block(groups, seed, resamples):
    """The tables of a group of runs, and the note on what the numbers mean."""
    found = comparisons(groups, seed, resamples)
    return (results_table(groups, seed, resamples) + comparison_lines(found) + intersection_notes(groups, found)
            + ["", METHOD_NOTE] + benchmark_tables.benchmark_lines(groups, compared_pairs(groups), seed, resamples))


def markers(name):
    return f"<!-- experiment:{name}:start -->", f"<!-- experiment:{name}:end -->"


def readme_blocks(text):
    """The experiment names that have a block in the README, in order."""
    return BLOCK.findall(text)


def replace_block(text, name, block_lines):
    start, end = markers(name)
    if start not in text or end not in text:
        raise errors.UsageError(f"the README has no {start} ... {end} markers")
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    return before + start + "\n" + "\n".join(block_lines) + "\n" + end + after


# --------------------------------------------------------------------------- a study (study.py)


def study_summary(folder):
    path = Path(folder) / "summary.json"
    if not path.is_file():
        raise errors.UsageError(f"{folder}: no summary.json (run study.py, or name the folder it wrote)")
    return json.loads(path.read_text(encoding="utf-8"))


def study_files(folder, summary):
    """The runs a study reports: the base model, and every method's runs at its picked learning rate."""
    try:
        files = [summary["base"]["file"]] + [run["file"] for method in summary["methods"].values()
                                             for run in method["runs"]]
    except KeyError as missing:
        raise errors.UsageError(f"{folder}: summary.json has no {missing} entries (an older study.py "
                                "wrote it): rerun the study command; it rewrites it from the finished runs") from None
    return [Path(folder) / name for name in files]


def study_rate_lines(summary):
    """Per method: the learning rates tried with their validation loss, and the one picked."""
    lines = ["", "| study method | learning rates tried: validation loss (picked in bold) | picked |",
             "| --- | --- | --- |"]
    for method, found in summary["methods"].items():
        picked = found["picked_learning_rate"]
        tried = ", ".join(f"{'**' if float(rate) == picked else ''}{rate}: {entry['validation_loss']:.4f}"
                          f"{'**' if float(rate) == picked else ''}" for rate, entry in found["learning_rates"].items())
        lines.append(f"| {method} | {tried} | {picked:g} |")
    return lines


def is_study(folder):
    return (Path(folder) / "summary.json").is_file()


# --------------------------------------------------------------------------- plots


def method_color(method):
    return METHOD_COLORS.get(method, "#9467bd")


def group_color(group, groups):
    """The method's colour for its first group; another for each further variant of the method (e.g. LoRA's
    target modules), so that groups of one method can be told apart."""
    siblings = [other for other in groups if other.method == group.method]
    index = next(i for i, other in enumerate(siblings) if other is group)
    return method_color(group.method) if index == 0 else VARIANT_COLORS[(index - 1) % len(VARIANT_COLORS)]


def save_figure(figure, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def draw_plot(groups, path, seed=42, resamples=1000):
    """Bar charts, one bar per group: perplexity (mean, 95% interval), memory, training time, parameters."""
    labels = [group.label for group in groups]
    colors = [group_color(group, groups) for group in groups]
    figure = Figure(figsize=(16, 4.2))
    axes = figure.subplots(1, 4)

    summaries = [group_summary(group, seed, resamples) for group in groups]
    shown = [summary if summary["mean"] is not None else {"mean": np.nan, "ci95": [np.nan, np.nan]}
             for summary in summaries]  # a group whose runs share no example gets no bar
    means = [summary["mean"] for summary in shown]
    errors_ = [[mean - summary["ci95"][0] for mean, summary in zip(means, shown, strict=True)],
               [summary["ci95"][1] - mean for mean, summary in zip(means, shown, strict=True)]]
    axes[0].bar(labels, means, yerr=errors_, capsize=6, color=colors)
    axes[0].set_title("Held-out perplexity (mean, 95% CI)\nlower is better")
    axes[0].set_ylabel("perplexity")

    kind = {run.get("memory_kind") for group in groups for run in group.runs} - {None}
    axes[1].bar(labels, [(group.mean("peak_memory_bytes") or 0) / 2**30 for group in groups], color=colors)
    axes[1].set_title("Peak memory\n" + ", ".join(sorted(kind)))
    axes[1].set_ylabel("GiB")

    trained = [group for group in groups if group.mean("train_seconds") is not None]
    trained_colors = [group_color(group, groups) for group in trained]
    axes[2].bar([group.label for group in trained], [group.mean("train_seconds") / 60 for group in trained],
                color=trained_colors)
    axes[2].set_title("Training wall time")
    axes[2].set_ylabel("minutes")

    axes[3].bar([group.label for group in trained], [group.mean("trainable_params") or 0 for group in trained],
                color=trained_colors)
    axes[3].set_yscale("log")
    axes[3].set_title("Trainable parameters (log scale)")
    axes[3].set_ylabel("parameters")

    for axis in axes:
        axis.tick_params(axis="x", labelrotation=15)
        axis.grid(axis="y", alpha=0.3)
    models = sorted({run["model"] for group in groups for run in group.runs})
    devices = sorted({run.get("device") or "?" for group in groups for run in group.runs})
    figure.suptitle(f"LoRA vs full fine-tuning: {', '.join(models)} on {', '.join(devices)}")
    figure.tight_layout()
    return save_figure(figure, path)


def run_perplexity(run, ids, field="per_example"):
    return mean_perplexity([run], ids, field)


def tradeoff_points(found):
    """Per tuned run against its group's base: improvement (base − tuned perplexity, higher = learned more)
    and forgetting (tuned − base general-text perplexity, higher = forgot more; None when not recorded)."""
    points = []
    for group, base, result, general in found:
        if base.method not in UNTRAINED or result is None or result.get("difference") is None:
            continue
        ids = shared_ids(group.runs + base.runs)
        general_ids = shared_ids(group.runs + base.runs, "general_per_example") if general else []
        base_ppl = mean_perplexity(base.runs, ids)
        base_general = mean_perplexity(base.runs, general_ids, "general_per_example") if general_ids else None
        runs = [(base_ppl - run_perplexity(run, ids),
                 run_perplexity(run, general_ids, "general_per_example") - base_general if general_ids else None)
                for run in group.runs]
        points.append((group, result, general if general_ids else None, runs))
    return points


def draw_tradeoff(found, path):
    """Learning (improvement over base) against forgetting (general-text perplexity change): one small point per
    run, each group's mean with its two-level interval; without general-text results, learning alone."""
    points = tradeoff_points(found)
    if not points:
        return None
    forgetting = all(general is not None for _, _, general, _ in points)
    figure = Figure(figsize=(7.5, 5.5 if forgetting else 2.2 + 0.7 * len(points)))
    axis = figure.subplots()
    shown = [group for group, *_ in points]
    for row, (group, result, general, runs) in enumerate(points):
        color = group_color(group, shown)
        ys = [forget for _, forget in runs] if forgetting else [row] * len(runs)
        axis.scatter([learn for learn, _ in runs], ys, color=color, alpha=0.45, s=25)
        low, high = result["ci95"]
        x = -result["difference"]
        xerr = [[x - (-high)], [(-low) - x]]
        y, yerr = row, None
        if forgetting:
            y = general["difference"]
            yerr = [[y - general["ci95"][0]], [general["ci95"][1] - y]]
        axis.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="o", markersize=10, color=color, capsize=5,
                      label=f"{group.label} (mean of {len(runs)} run{'s' if len(runs) > 1 else ''})")
    axis.axvline(0, color="black", linewidth=0.8)
    axis.set_xlabel("learning: base − tuned held-out perplexity (higher = learned more)")
    if forgetting:
        axis.axhline(0, color="black", linewidth=0.8)
        axis.set_ylabel("forgetting: tuned − base general-text perplexity (higher = forgot more)")
        axis.set_title("Learning vs forgetting (95% intervals: seeds, then examples)")
    else:
        axis.set_yticks(range(len(points)), [group.label for group, *_ in points])
        axis.set_ylim(-0.6, len(points) - 0.4)
        axis.set_title("Learning over base (95% intervals: seeds, then examples)\n"
                       "no general-text perplexity in these results: forgetting not shown", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)


def training_tokens_at(run, entry):
    """Tokens trained when a log entry was written: the Trainer's count when kept, else steps × mean tokens
    per optimizer step."""
    if entry.get("num_input_tokens_seen") is not None:
        return entry["num_input_tokens_seen"]
    if run.get("train_tokens") and run.get("optimizer_steps"):
        return entry["step"] * run["train_tokens"] / run["optimizer_steps"]
    return None


def validation_curve(run):
    points = [(training_tokens_at(run, entry), entry["eval_loss"]) for entry in run.get("log_history") or []
              if entry.get("eval_loss") is not None and entry.get("step") is not None]
    return [(tokens, loss) for tokens, loss in points if tokens is not None]


def draw_validation_curves(groups, path):
    """Validation loss against training tokens, one line per run coloured by group; None without log history."""
    curves = [(group, validation_curve(run)) for group in groups for run in group.runs]
    curves = [(group, curve) for group, curve in curves if curve]
    if not curves:
        return None
    figure = Figure(figsize=(7.5, 5))
    axis = figure.subplots()
    styles = ["-", "--", ":", "-."]
    labelled = set()
    for group, curve in curves:
        tokens, losses = zip(*curve, strict=True)
        style = styles[[g for g in groups if g.method == group.method].index(group) % len(styles)]
        axis.plot(tokens, losses, style, marker="o", markersize=3, color=group_color(group, groups), alpha=0.8,
                  label=None if group.label in labelled else group.label)
        labelled.add(group.label)
    axis.set_xlabel("training tokens")
    axis.set_ylabel("validation loss (the Trainer's eval_loss)")
    axis.set_title("Validation loss during training, one line per run")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)


def draw_memory_breakdown(groups, path):
    """Training's peak per group as stacked bars: weights, gradients, optimizer states, the rest."""
    measured = [(group, parts) for group in groups if (parts := group_breakdown(group)) is not None]
    if not measured:
        return None
    figure = Figure(figsize=(6, 4.2))
    axis = figure.subplots()
    labels = [group.label for group, _ in measured]
    bottom = [0.0] * len(measured)
    for part, color in zip(BREAKDOWN_PARTS, ("#7f7f7f", "#ff7f0e", "#9467bd", "#bcbd22"), strict=True):
        heights = [parts[part] / 2**30 for _, parts in measured]
        axis.bar(labels, heights, bottom=bottom, color=color, label=part.replace("_", " "))
        bottom = [low + height for low, height in zip(bottom, heights, strict=True)]
    kinds = sorted({run.get("phase_memory_kind") or "?" for group, _ in measured for run in group.runs})
    axis.set_title(f"Training's peak memory, by what holds it\n{', '.join(kinds)}")
    axis.set_ylabel("GiB")
    axis.legend()
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return save_figure(figure, path)


def draw_plots(groups, found, plot_path, seed, resamples):
    drawn = [draw_plot(groups, plot_path, seed, resamples),
             draw_tradeoff(found, plot_path.with_name("learning_vs_forgetting.png")),
             draw_validation_curves(groups, plot_path.with_name("validation_curves.png")),
             draw_memory_breakdown(groups, plot_path.with_name("memory-breakdown.png")),
             benchmark_tables.draw_tradeoff(found, plot_path.with_name("learning_vs_benchmarks.png"), seed, resamples,
                                            lambda group: group_color(group, groups))]
    return [path for path in drawn if path is not None]


def load_groups(sources, args):
    """The runs in sources, grouped; runs on different examples refused unless --allow-intersection."""
    groups = group_runs(load_results(sources), [key.strip() for key in args.variant_keys.split(",") if key.strip()])
    if not args.allow_intersection:
        refuse_different_examples(groups)
    return groups


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
    found = {}
    for path in sorted(EXPERIMENTS_DIR.glob("*.yaml")):
        found[experiments.experiment_name(path)] = path
    return found


def shown_path(path):
    try:
        return Path(path).resolve().relative_to(PROJECT_DIR).as_posix()
    except ValueError:
        return str(path)


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


def experiment_block(experiment, args):
    """(groups, the block's lines, the study's (summary, runs) or None) for an experiment's results folder: its
    heading, caption and tables, and for a study the rates tried and the findings generated from its JSON; "not
    run yet" when the folder holds no finished run."""
    heading = f"### {experiment.description or experiment.name}"
    folder = experiment.folder
    runs_exist = folder.is_dir() and (is_study(folder) or load_results(folder))
    if not runs_exist:
        command = (f"`python report.py --config {experiment.config_file}`" if experiment.config_file
                   else f"`python report.py {experiment.shown}`")
        return [], [heading, "", f"_Not run yet: no results in `{experiment.shown}/`. Once its runs have "
                                 f"written them, {command} puts their table here._"], None
    summary = study_summary(folder) if is_study(folder) else None
    groups = load_groups(study_files(folder, summary) if summary else [folder], args)
    runs = [run for group in groups for run in group.runs]
    config_file = experiment.config_file or next(((run.get("config_file") or {}).get("file") for run in runs
                                                  if run.get("config_file")), None)
    lines = [heading, "", caption(runs, config_file), "", *render_block(groups, args.seed, args.resamples)]
    study = None
    if summary:
        study = summary, plots.load_study_runs(folder, summary)
        lines += study_rate_lines(summary) + findings.findings_lines(*study, args.seed, args.resamples)
    return groups, lines, study


def write_report(experiment, groups, lines, study, args):
    """report.md and the plots, in the experiment's results folder (a study's own plots too)."""
    found = comparisons(groups, args.seed, args.resamples)
    drawn = draw_plots(groups, found, experiment.folder / "comparison.png", args.seed, args.resamples)
    if study is not None:
        drawn += plots.draw_study_plots(experiment.folder, *study, args.seed, args.resamples)
    report = ["# " + lines[0].removeprefix("### "), *lines[1:], "", *(f"![{path.stem}]({path.name})" for path in drawn)]
    write_atomic(experiment.folder / "report.md", "\n".join(report) + "\n")
    return [experiment.folder / "report.md", *drawn], found


# --------------------------------------------------------------------------- --check


def git(*args):
    """git's stdout, or None outside a git checkout (an unpacked archive, or no git installed)."""
    try:
        out = subprocess.run(["git", "-C", str(PROJECT_DIR), *args], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


@contextlib.contextmanager
def committed_inputs(results_root, readme):
    """(results root, README text) as committed at HEAD, so that `make test` checks what the repository ships, not
    a local run (a script's output, `make demo`) that rewrote results/ or the README. Yields the working tree's
    own files outside a git checkout, or for a README outside the repository."""
    top = git("rev-parse", "--show-toplevel")
    try:
        root = Path(top.decode().strip()).resolve()
        readme_rel = Path(readme).resolve().relative_to(root).as_posix()
        results_rel = Path(results_root).resolve().relative_to(root).as_posix()
    except (AttributeError, ValueError):
        yield Path(results_root), Path(readme).read_text(encoding="utf-8")
        return
    listing = git("ls-tree", "-r", "--name-only", "HEAD", results_rel + "/") or b""
    with tempfile.TemporaryDirectory() as folder:
        for name in listing.decode().splitlines():
            if name.endswith(".json"):
                target = Path(folder, Path(name).relative_to(results_rel))
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(git("show", f"HEAD:{name}"))
        yield Path(folder), (git("show", f"HEAD:{readme_rel}") or b"").decode("utf-8")


def rebuilt(readme_text, results_root, args):
    """The README text with every experiment block rebuilt from results_root/<name>/ (named as args.results_root's)."""
    for name in readme_blocks(readme_text):
        experiment = experiment_named(name, results_root)
        experiment.shown_as = shown_path(Path(args.results_root) / name)
        _, lines, _ = experiment_block(experiment, args)
        readme_text = replace_block(readme_text, name, lines)
    return readme_text


def check(args):
    with committed_inputs(args.results_root, args.readme) as (results_root, readme_text):
        names = readme_blocks(readme_text)
        stale = rebuilt(readme_text, results_root, args) != readme_text
    if stale:
        print(f"{args.readme}: a committed experiment block does not match the committed results/<experiment>/; "
              "run `python report.py` and commit both", file=sys.stderr)
        return 1
    print(f"{args.readme}: experiment blocks up to date ({', '.join(names) or 'none'})")
    working_text = args.readme.read_text(encoding="utf-8")
    try:
        local_stale = rebuilt(working_text, args.results_root, args) != working_text
    except errors.UsageError:
        local_stale = True
    if local_stale:
        print(f"note: in the working tree, {args.readme}'s blocks do not match results/ (a local run since the last "
              "commit); `python report.py` rebuilds them", file=sys.stderr)
    return 0


def ad_hoc(args):
    """Files named on the command line: their table, printed."""
    groups = load_groups(args.sources, args)
    print("\n".join(render_block(groups, args.seed, args.resamples)))
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.check:
        return check(args)
    if args.sources and not all(source.is_dir() for source in args.sources):
        return ad_hoc(args)
    readme_text = args.readme.read_text(encoding="utf-8") if args.readme.is_file() else ""
    if args.config is not None:
        targets = [experiment_from_file(args.config, args.results_root)]
    elif args.sources:
        targets = [experiment_named(source.resolve().name, source.resolve().parent) for source in args.sources]
    else:
        targets = [experiment_named(name, args.results_root) for name in readme_blocks(readme_text)]
    for experiment in targets:
        groups, lines, study = experiment_block(experiment, args)
        if markers(experiment.name)[0] in readme_text:
            readme_text = replace_block(readme_text, experiment.name, lines)
            print(f"updated the {experiment.name} block in {args.readme}")
        if not groups:
            print(f"{experiment.name}: not run yet (no results in {shown_path(experiment.folder)})")
            continue
        written, found = write_report(experiment, groups, lines, study, args)
        for path in written:
            print(f"wrote {shown_path(path)}")
        for line in comparison_lines(found)[3:]:
            print(line)
    if args.readme.is_file() and readme_text != args.readme.read_text(encoding="utf-8"):
        write_atomic(args.readme, readme_text)
    return 0


if __name__ == "__main__":
    errors.main_guard(lambda: sys.exit(main()))
