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
import sys
from pathlib import Path

from lvf import benchmark_tables, discovery, docs_blocks, errors, findings, plots, tables
from lvf import groups as grouping
from lvf.cli import HelpFormatter, description
from lvf.files import write_atomic

PROJECT_DIR = Path(__file__).resolve().parent


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
    parser.add_argument("--variant-keys", default=grouping.VARIANT_KEYS,
                        help="comma-separated settings (a results field, else a config field) that tell runs of "
                             "one method apart; runs that differ only in others (the seed) are one group")
    parser.add_argument("--allow-intersection", action="store_true",
                        help="compare runs evaluated on different examples on the examples they share")
    parser.add_argument("--seed", type=int, default=42, help="seed of the bootstrap")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- an experiment's report


def load_groups(sources, args):
    """The runs in sources, grouped; runs on different examples refused unless --allow-intersection."""
    return grouping.load_groups(discovery.load_results(sources), args.variant_keys, args.allow_intersection)


def render_block(groups, seed, resamples):
    """The tables of a group of runs, and the note on what the numbers mean: a table per function of lvf.tables."""
    found = grouping.comparisons(groups, seed, resamples)
    return (tables.results_table(groups, seed, resamples) + tables.comparison_table(found)
            + tables.intersection_notes(groups, found) + ["", tables.METHOD_NOTE]
            + benchmark_tables.benchmark_lines(groups, grouping.compared_pairs(groups), seed, resamples))


def experiment_block(experiment, args):
    """(groups, the block's lines, the study's (summary, runs) or None) for an experiment's results folder: its
    heading, caption and tables, and for a study the rates tried and the findings generated from its JSON; "not
    run yet" when the folder holds no finished run."""
    heading = f"### {experiment.description or experiment.name}"
    folder = experiment.folder
    runs_exist = folder.is_dir() and (discovery.is_study(folder) or discovery.load_results(folder))
    if not runs_exist:
        command = (f"`python report.py --config {experiment.config_file}`" if experiment.config_file
                   else f"`python report.py {experiment.shown}`")
        return [], [heading, "", f"_Not run yet: no results in `{experiment.shown}/`. Once its runs have "
                                 f"written them, {command} puts their table here._"], None
    summary = discovery.study_summary(folder) if discovery.is_study(folder) else None
    sources = ([folder / name for name in discovery.study_files(folder, summary, rates_tried=False)] if summary
               else [folder])
    groups = load_groups(sources, args)
    runs = [run for group in groups for run in group.runs]
    config_file = experiment.config_file or next(((run.get("config_file") or {}).get("file") for run in runs
                                                  if run.get("config_file")), None)
    lines = [heading, "", tables.caption(runs, config_file), "", *render_block(groups, args.seed, args.resamples)]
    study = None
    if summary:
        study = summary, discovery.load_study_runs(folder, summary)
        lines += tables.study_rate_table(summary) + findings.findings_lines(*study, args.seed, args.resamples)
    return groups, lines, study


def write_report(experiment, groups, lines, study, args):
    """report.md and the plots, in the experiment's results folder (a study's own plots too)."""
    found = grouping.comparisons(groups, args.seed, args.resamples)
    drawn = plots.draw_group_plots(groups, found, experiment.folder, args.seed, args.resamples)
    drawn += [path for path in [plots.draw_benchmark_tradeoff(
        benchmark_tables.tradeoff_points(found, args.seed, args.resamples), groups,
        experiment.folder / "learning_vs_benchmarks.png")] if path is not None]
    if study is not None:
        drawn += plots.draw_study_plots(experiment.folder, *study, args.seed, args.resamples)
    report = ["# " + lines[0].removeprefix("### "), *lines[1:], "", *(f"![{path.stem}]({path.name})" for path in drawn)]
    write_atomic(experiment.folder / "report.md", "\n".join(report) + "\n")
    return [experiment.folder / "report.md", *drawn], found


# --------------------------------------------------------------------------- --check


def rebuilt(readme_text, results_root, args):
    """The README text with every experiment block rebuilt from results_root/<name>/ (named as args.results_root's)."""
    for name in docs_blocks.readme_blocks(readme_text):
        experiment = discovery.experiment_named(name, results_root)
        experiment.shown_as = discovery.shown_path(Path(args.results_root) / name)
        _, lines, _ = experiment_block(experiment, args)
        readme_text = docs_blocks.replace_block(readme_text, f"experiment:{name}", lines)
    return readme_text


def check(args):
    with docs_blocks.committed_inputs(args.results_root, args.readme) as (results_root, readme_text):
        names = docs_blocks.readme_blocks(readme_text)
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
        targets = [discovery.experiment_from_file(args.config, args.results_root)]
    elif args.sources:
        targets = [discovery.experiment_named(source.resolve().name, source.resolve().parent)
                   for source in args.sources]
    else:
        targets = [discovery.experiment_named(name, args.results_root)
                   for name in docs_blocks.readme_blocks(readme_text)]
    for experiment in targets:
        groups, lines, study = experiment_block(experiment, args)
        if docs_blocks.experiment_markers(experiment.name)[0] in readme_text:
            readme_text = docs_blocks.replace_block(readme_text, f"experiment:{experiment.name}", lines)
            print(f"updated the {experiment.name} block in {args.readme}")
        if not groups:
            print(f"{experiment.name}: not run yet (no results in {discovery.shown_path(experiment.folder)})")
            continue
        written, found = write_report(experiment, groups, lines, study, args)
        for path in written:
            print(f"wrote {discovery.shown_path(path)}")
        for line in tables.comparison_table(found)[3:]:
            print(line)
    if args.readme.is_file() and readme_text != args.readme.read_text(encoding="utf-8"):
        write_atomic(args.readme, readme_text)
    return 0


if __name__ == "__main__":
    errors.main_guard(lambda: sys.exit(main()))
