"""Turns results/*.json into the README's results table, paired comparisons, results/comparison.png and
results/memory-breakdown.png.

    python report.py            # rewrite the block between the README markers and draw the plot
    python report.py --check    # exit 1 if the README block is stale (for CI and pre-commit)
"""

import argparse
import json
import sys
from pathlib import Path

import common
from lvf import results

START, END = "<!-- results-table:start -->", "<!-- results-table:end -->"
METHOD_ORDER = ["base", "lora", "qlora", "full"]
METHOD_LABELS = {"base": "Zero-shot (base)", "lora": "LoRA", "qlora": "QLoRA", "full": "Full fine-tuning"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=common.PROJECT_DIR / "results",
                        help="folder with base.json, lora.json, full.json (qlora.json optional)")
    parser.add_argument("--readme", type=Path, default=common.PROJECT_DIR / "README.md",
                        help="Markdown file whose marked block receives the table")
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: <results-dir>/comparison.png)")
    parser.add_argument("--check", action="store_true", help="only check that the README block is up to date")
    parser.add_argument("--seed", type=int, default=42, help="seed of the paired bootstrap")
    parser.add_argument("--resamples", type=int, default=1000, help="paired bootstrap resamples")
    return parser.parse_args(argv)


def load_results(results_dir):
    runs = {}
    for path in sorted(Path(results_dir).glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("method") in METHOD_ORDER and not data.get("dry_run"):
            runs[data["method"]] = data
    return {method: runs[method] for method in METHOD_ORDER if method in runs}


# --------------------------------------------------------------------------- formatting


def fmt_bytes(value):
    if value is None:
        return "–"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value} B"


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


def fmt_training_peak(run):
    """Training's own peak, and what it holds: weights + gradients + optimizer states + the rest."""
    parts = breakdown_parts(run)
    peak = fmt_bytes(run.get("train_peak_memory_bytes"))
    if parts is None:
        return peak
    return f"{peak} = " + " + ".join(fmt_bytes(parts[part]) for part in BREAKDOWN_PARTS)


def results_table(runs):
    header = ("| method | model | data | perplexity (95% CI) | write-up's metric | trainable params "
              "| peak memory (whole run) | training peak = weights + gradients + optimizer + other "
              "| train time | train tokens/s | artifact |")
    lines = [header, "|" + " --- |" * 11]
    for method, run in runs.items():
        low, high = run["perplexity_ci95"]
        data = run.get("eval_file") or run.get("dataset") or "–"
        lines.append(
            f"| {METHOD_LABELS[method]} | `{run['model']}` | `{data}` "
            f"| {fmt_number(run['perplexity'])} ({fmt_number(low)}–{fmt_number(high)}) "
            f"| {fmt_number(run.get('seed_style_perplexity'), 2)} "
            f"| {fmt_params(run.get('trainable_params'), run.get('trainable_percent'))} "
            f"| {fmt_bytes(run.get('peak_memory_bytes'))} "
            f"| {fmt_training_peak(run)} "
            f"| {fmt_seconds(run.get('train_seconds'))} "
            f"| {fmt_number(run.get('train_tokens_per_second'), 1)} "
            f"| {fmt_bytes(run.get('artifact_bytes'))} |"
        )
    return lines


def comparisons(runs, seed, resamples):
    """Paired bootstrap of perplexity differences over the examples both runs scored."""
    pairs = [(a, b) for a, b in (("lora", "full"), ("qlora", "full"), ("lora", "base"), ("qlora", "base"),
                                 ("full", "base")) if a in runs and b in runs]
    found = []
    for a, b in pairs:
        result = common.paired_bootstrap(runs[a]["per_example"], runs[b]["per_example"], seed=seed,
                                         resamples=resamples)
        if result is not None:
            found.append((a, b, result))
    return found


def comparison_lines(found):
    if not found:
        return []
    lines = ["", "| comparison | perplexity difference (95% CI) | paired examples | verdict |",
             "| --- | --- | --- | --- |"]
    for a, b, result in found:
        low, high = result["ci95"]
        if result["significant"]:
            verdict = f"{METHOD_LABELS[a]} is {'lower' if result['difference'] < 0 else 'higher'} (significant)"
        else:
            verdict = "not significant: the interval contains 0"
        lines.append(f"| {METHOD_LABELS[a]} − {METHOD_LABELS[b]} | {result['difference']:+.3f} "
                     f"({low:+.3f} to {high:+.3f}) | {result['examples']} | {verdict} |")
    return lines


def provenance_line(runs):
    devices = sorted({run.get("device") or "?" for run in runs.values()})
    dates = sorted(run["created_at"][:10] for run in runs.values() if run.get("created_at"))
    commits = sorted({(run.get("git_commit") or "uncommitted")[:7] for run in runs.values()})
    return (f"_Device: {', '.join(devices)}; run on {dates[0] if dates else '?'}"
            f"{' to ' + dates[-1] if dates and dates[-1] != dates[0] else ''}; commit {', '.join(commits)}. "
            "Perplexity is exp(Σ NLL / Σ response tokens) on the held-out split; the write-up's metric "
            "scores padding and prompt and is shown only to explain its numbers._")


def render_block(runs, seed, resamples):
    if not runs:
        return ["_No results yet: run `make demo` (or the three scripts) and then `python report.py`._"]
    return results_table(runs) + comparison_lines(comparisons(runs, seed, resamples)) + ["", provenance_line(runs)]


def replace_block(text, block_lines):
    if START not in text or END not in text:
        raise SystemExit(f"error: README has no {START} ... {END} markers")
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    return before + START + "\n" + "\n".join(block_lines) + "\n" + END + after


# --------------------------------------------------------------------------- plot


def draw_plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(runs)
    labels = [METHOD_LABELS[m] for m in methods]
    colors = [{"base": "#888888", "lora": "#1f77b4", "qlora": "#17becf", "full": "#d62728"}[m] for m in methods]
    figure, axes = plt.subplots(1, 4, figsize=(16, 4.2))

    ppl = [runs[m]["perplexity"] for m in methods]
    errors = [[p - runs[m]["perplexity_ci95"][0] for m, p in zip(methods, ppl, strict=True)],
              [runs[m]["perplexity_ci95"][1] - p for m, p in zip(methods, ppl, strict=True)]]
    axes[0].bar(labels, ppl, yerr=errors, capsize=6, color=colors)
    axes[0].set_title("Held-out perplexity (95% CI)\nlower is better")
    axes[0].set_ylabel("perplexity")

    memory = [(runs[m].get("peak_memory_bytes") or 0) / 2**30 for m in methods]
    kind = {runs[m].get("memory_kind") for m in methods} - {None}
    axes[1].bar(labels, memory, color=colors)
    axes[1].set_title("Peak memory\n" + ", ".join(sorted(kind)))
    axes[1].set_ylabel("GiB")

    trained = [m for m in methods if runs[m].get("train_seconds") is not None]
    axes[2].bar([METHOD_LABELS[m] for m in trained], [runs[m]["train_seconds"] / 60 for m in trained],
                color=[colors[methods.index(m)] for m in trained])
    axes[2].set_title("Training wall time")
    axes[2].set_ylabel("minutes")

    axes[3].bar([METHOD_LABELS[m] for m in trained], [runs[m]["trainable_params"] for m in trained],
                color=[colors[methods.index(m)] for m in trained])
    axes[3].set_yscale("log")
    axes[3].set_title("Trainable parameters (log scale)")
    axes[3].set_ylabel("parameters")

    for axis in axes:
        axis.tick_params(axis="x", labelrotation=15)
        axis.grid(axis="y", alpha=0.3)
    models = sorted({run["model"] for run in runs.values()})
    figure.suptitle(f"LoRA vs full fine-tuning: {', '.join(models)} on {runs[methods[0]].get('device')}")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def draw_memory_breakdown(runs, path):
    """Training's peak per method as stacked bars: weights, gradients, optimizer states, the rest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = {method: parts for method, run in runs.items() if (parts := breakdown_parts(run)) is not None}
    if not measured:
        return None
    figure, axis = plt.subplots(figsize=(6, 4.2))
    labels = [METHOD_LABELS[method] for method in measured]
    bottom = [0.0] * len(measured)
    for part, color in zip(BREAKDOWN_PARTS, ("#7f7f7f", "#ff7f0e", "#9467bd", "#bcbd22"), strict=True):
        heights = [parts[part] / 2**30 for parts in measured.values()]
        axis.bar(labels, heights, bottom=bottom, color=color, label=part.replace("_", " "))
        bottom = [low + height for low, height in zip(bottom, heights, strict=True)]
    kinds = sorted({runs[method].get("phase_memory_kind") or "?" for method in measured})
    axis.set_title(f"Training's peak memory, by what holds it\n{', '.join(kinds)}")
    axis.set_ylabel("GiB")
    axis.legend()
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(argv=None):
    args = parse_args(argv)
    runs = load_results(args.results_dir)
    readme_text = args.readme.read_text(encoding="utf-8")
    updated = replace_block(readme_text, render_block(runs, args.seed, args.resamples))

    if args.check:
        if updated != readme_text:
            print(f"{args.readme}: the results table is stale; run `python report.py`", file=sys.stderr)
            return 1
        print(f"{args.readme}: results table is up to date")
        return 0

    if updated != readme_text:
        results.write_atomic(args.readme, updated)
    print(f"updated the results table in {args.readme} ({len(runs)} runs)")
    if runs:
        plot = draw_plot(runs, args.plot or args.results_dir / "comparison.png")
        print(f"wrote {plot}")
        breakdown_plot = draw_memory_breakdown(runs, plot.with_name("memory-breakdown.png"))
        if breakdown_plot is not None:
            print(f"wrote {breakdown_plot}")
        for line in comparison_lines(comparisons(runs, args.seed, args.resamples))[3:]:
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
