"""The plots drawn for "LoRA against full fine-tuning" from a study (study.py's summary.json and the runs' results
JSON): validation loss against step per rank and full fine-tuning; held-out loss against learning rate per method
(the U-curve); held-out perplexity against training's peak memory (the Pareto view). Learning against forgetting
is report.py's draw_tradeoff.

Each plot is a pair: a function that returns what is plotted (plain numbers, for tests and the findings) and
draw_* that draws it into a PNG at `path` and returns the path, or None when the runs hold nothing to draw.
Every function takes the summary (a dict) and `runs`, the runs' JSON by the summary's file names
(load_study_runs). matplotlib's Figure API (no pyplot state) and numpy only: no torch.
"""

import json
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from lvf.bootstrap import perplexity_summary, shared_ids

FULL_COLOR = "#d62728"
FAMILY_COLORS = ["#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
RANK_COLORMAPS = ["Blues", "Greens", "Oranges", "Purples"]


# --------------------------------------------------------------------------- the study's runs


def study_files(summary):
    """Every results file the summary names: the base model's, each learning rate tried, each seed's run."""
    files = [summary["base"]["file"]] if summary.get("base") else []
    for entry in summary["methods"].values():
        files += [tried["file"] for tried in entry.get("learning_rates", {}).values() if tried.get("file")]
        files += [run["file"] for run in entry.get("runs", [])]
    return list(dict.fromkeys(files))


def load_study_runs(folder, summary):
    """The runs' results JSON by file name (relative to the study folder, as the summary names them); files not
    written yet are left out."""
    found = {}
    for name in study_files(summary):
        path = Path(folder) / name
        if path.is_file():
            found[name] = json.loads(path.read_text(encoding="utf-8"))
    return found


def is_full(name, entry):
    """Full fine-tuning: summary's script, or (in a summary written before methods named their script) the name."""
    return entry.get("script") == "full_finetune" if "script" in entry else name.startswith("full")


def family(name, entry):
    return entry.get("family") or name


def method_label(name, entry):
    """The method's name, with its rank where the name does not already end in it."""
    rank = entry.get("rank")
    return f"{name} (r={rank})" if rank is not None and not name.endswith(f"-r{rank}") else name


def seed_runs(entry, runs):
    """The method's runs at its picked rate (one per seed) that have been loaded."""
    return [runs[run["file"]] for run in entry.get("runs", []) if run["file"] in runs]


def method_colors(summary):
    """Full fine-tuning red; one colour per other family; within a family of several ranks, a shade per rank
    (darker = higher rank)."""
    families = list(dict.fromkeys(family(name, entry) for name, entry in summary["methods"].items()
                                  if not is_full(name, entry)))
    colors = {}
    for name, entry in summary["methods"].items():
        if is_full(name, entry):
            colors[name] = FULL_COLOR
            continue
        index = families.index(family(name, entry))
        ranks = sorted({other.get("rank") for other_name, other in summary["methods"].items()
                        if family(other_name, other) == family(name, entry) and other.get("rank") is not None})
        if len(ranks) > 1 and entry.get("rank") is not None:
            shade = 0.35 + 0.6 * ranks.index(entry["rank"]) / (len(ranks) - 1)
            colors[name] = colormaps[RANK_COLORMAPS[index % len(RANK_COLORMAPS)]](shade)
        else:
            colors[name] = FAMILY_COLORS[index % len(FAMILY_COLORS)]
    return colors


def method_order(summary):
    """Methods by family, each family's ranks ascending, full fine-tuning last."""
    methods = summary["methods"]
    families = list(dict.fromkeys(family(name, entry) for name, entry in methods.items()))
    return sorted(methods, key=lambda name: (is_full(name, methods[name]), families.index(family(name, methods[name])),
                                             methods[name].get("rank") or 0, name))


def study_figure(summary):
    """(each method's colour, a new figure, its one axis)."""
    figure = Figure(figsize=(7.5, 5))
    return method_colors(summary), figure, figure.subplots()


def save(figure, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


# --------------------------------------------------------------------------- validation loss against step


def validation_points(run):
    """{optimizer step: validation loss} from the Trainer's log (its eval_loss entries)."""
    return {entry["step"]: entry["eval_loss"] for entry in run.get("log_history") or []
            if entry.get("eval_loss") is not None and entry.get("step") is not None}


def validation_curves(summary, runs):
    """Per method, at its picked rate: the steps every seed's run validated at, and the mean, min and max of the
    validation loss across the seeds there."""
    curves = {}
    for name in method_order(summary):
        entry = summary["methods"][name]
        per_seed = [points for run in seed_runs(entry, runs) if (points := validation_points(run))]
        steps = sorted(set.intersection(*(set(points) for points in per_seed))) if per_seed else []
        if not steps:
            continue
        losses = np.array([[points[step] for step in steps] for points in per_seed])
        curves[name] = {"steps": steps, "mean": losses.mean(0).tolist(), "low": losses.min(0).tolist(),
                        "high": losses.max(0).tolist(), "seeds": len(per_seed), "rank": entry.get("rank"),
                        "learning_rate": entry["picked_learning_rate"]}
    return curves


def validation_figure(summary, curves):
    colors, figure, axis = study_figure(summary)
    for name, curve in curves.items():
        seeds = f"{curve['seeds']} seed{'s' if curve['seeds'] > 1 else ''}"
        axis.plot(curve["steps"], curve["mean"], marker="o", markersize=3, color=colors[name],
                  label=f"{method_label(name, summary['methods'][name])}, lr {curve['learning_rate']:g}, {seeds}")
        if curve["seeds"] > 1:
            axis.fill_between(curve["steps"], curve["low"], curve["high"], color=colors[name], alpha=0.2)
    axis.set_xscale("log")
    axis.set_xlabel("optimizer step (log scale)")
    axis.set_ylabel("validation loss (the Trainer's eval_loss)")
    axis.set_title("Validation loss during training at each method's picked rate\n"
                   "line: mean over seeds; band: lowest to highest seed", fontsize=10)
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def draw_validation_curves(summary, runs, path):
    curves = validation_curves(summary, runs)
    return save(validation_figure(summary, curves), path) if curves else None


# --------------------------------------------------------------------------- loss against learning rate


def loss_by_learning_rate(summary, runs, loss="validation"):
    """Per method: the learning rates tried (ascending) with the held-out loss of the run at each, and the
    picked rate. loss="validation": the summary's validation loss, what picked the rate; loss="test": each run's
    test-split loss (eval_loss, nats per scored token), never used to pick."""
    found = {}
    for name in method_order(summary):
        entry = summary["methods"][name]
        points = []
        for rate, tried in entry.get("learning_rates", {}).items():
            if loss == "validation":
                value = tried.get("validation_loss")
            else:
                value = (runs.get(tried.get("file")) or {}).get("eval_loss")
            if value is not None:
                points.append((float(rate), value))
        if points:
            rates, losses = zip(*sorted(points), strict=True)
            found[name] = {"rates": list(rates), "losses": list(losses),
                           "picked": float(entry["picked_learning_rate"]), "picked_from": entry.get("picked_from")}
    return found


LOSS_LABELS = {"validation": "validation loss (token-weighted, the kept checkpoint; picks the rate)",
               "test": "test loss (eval_loss: nats per scored token)"}


def learning_rate_figure(summary, curves, loss):
    colors, figure, axis = study_figure(summary)
    for name, curve in curves.items():
        axis.plot(curve["rates"], curve["losses"], marker="o", color=colors[name],
                  label=method_label(name, summary["methods"][name]))
        if curve["picked"] in curve["rates"]:
            picked = curve["losses"][curve["rates"].index(curve["picked"])]
            axis.plot([curve["picked"]], [picked], marker="*", markersize=15, color=colors[name],
                      markeredgecolor="black", linestyle="none")
    # A diverged rate (loss many times the best) would flatten every U: the axis stops at 1.5x the lowest loss,
    # and a point above it is shown at the top edge with its value.
    every_loss = [value for curve in curves.values() for value in curve["losses"]]
    top = min(every_loss) * 1.5
    if max(every_loss) > top:
        axis.set_ylim(min(every_loss) - 0.05 * (top - min(every_loss)), top)
        for index, (name, curve) in enumerate(curves.items()):
            for rate, value in zip(curve["rates"], curve["losses"], strict=True):
                if value > top:
                    axis.plot([rate], [top], marker="^", color=colors[name], linestyle="none", clip_on=False)
                    axis.annotate(f"{value:.3g}", (rate, top), textcoords="offset points",
                                  xytext=(4, -12 - 9 * index), fontsize=7, color=colors[name])
    axis.set_xscale("log")
    axis.set_xlabel("learning rate (log scale)")
    axis.set_ylabel(LOSS_LABELS[loss])
    axis.set_title("Held-out loss against learning rate, first seed\n★ the picked rate (lowest validation loss)",
                   fontsize=10)
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def draw_loss_by_learning_rate(summary, runs, path, loss="validation"):
    curves = loss_by_learning_rate(summary, runs, loss)
    return save(learning_rate_figure(summary, curves, loss), path) if curves else None


# --------------------------------------------------------------------------- perplexity against memory


def pareto_front(points):
    """Indices of the points no other point beats on both axes (lower memory and lower perplexity), by memory."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], np.inf
    for index in order:
        if points[index][1] < best:
            front.append(index)
            best = points[index][1]
    return front


def perplexity_by_memory(summary, runs, seed=42, resamples=1000):
    """One point per method at its picked rate: training's peak memory (mean over seeds, bytes) and held-out
    perplexity (mean over seeds with its two-level 95% interval); `pareto` marks the front."""
    points = {}
    for name in method_order(summary):
        seeded = [run for run in seed_runs(summary["methods"][name], runs)
                  if run.get("train_peak_memory_bytes") is not None and run.get("per_example")]
        if seeded and shared_ids(seeded):
            points[name] = {"memory_bytes": float(np.mean([run["train_peak_memory_bytes"] for run in seeded])),
                            **perplexity_summary(seeded, seed, resamples)}
    names = list(points)
    front = pareto_front([(points[name]["memory_bytes"], points[name]["mean"]) for name in names])
    for index, name in enumerate(names):
        points[name]["pareto"] = index in front
    return points


def memory_figure(summary, points):
    colors, figure, axis = study_figure(summary)
    for name, point in points.items():
        low, high = point["ci95"]
        axis.errorbar([point["memory_bytes"] / 2**30], [point["mean"]],
                      yerr=[[point["mean"] - low], [high - point["mean"]]], fmt="o", capsize=4, color=colors[name],
                      label=f"{method_label(name, summary['methods'][name])}, {point['runs']} seed"
                            f"{'s' if point['runs'] > 1 else ''}")
    front = sorted((point["memory_bytes"] / 2**30, point["mean"]) for point in points.values() if point["pareto"])
    if len(front) > 1:
        axis.plot(*zip(*front, strict=True), linestyle="--", color="black", linewidth=1, label="Pareto front")
    axis.set_xlabel("training's peak memory (GiB, mean over seeds)")
    axis.set_ylabel("held-out perplexity (mean over seeds, 95% CI)")
    axis.set_title("Held-out perplexity against training's peak memory\nlower left is better", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def draw_perplexity_by_memory(summary, runs, path, seed=42, resamples=1000):
    points = perplexity_by_memory(summary, runs, seed, resamples)
    return save(memory_figure(summary, points), path) if points else None


def draw_study_plots(folder, summary, runs, seed=42, resamples=1000):
    """The three plots into the study folder; the paths of those drawn."""
    folder = Path(folder)
    drawn = [draw_validation_curves(summary, runs, folder / "validation_loss_by_step.png"),
             draw_loss_by_learning_rate(summary, runs, folder / "loss_by_learning_rate.png"),
             draw_perplexity_by_memory(summary, runs, folder / "perplexity_by_memory.png", seed, resamples)]
    return [path for path in drawn if path is not None]
