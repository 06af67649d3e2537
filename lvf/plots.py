"""Every plot of the report, into PNGs, in one colour and order scheme (each_color; the order is lvf.groups'):

- an experiment's groups of runs (lvf.groups): perplexity, memory, training time and parameters per group
  (draw_comparison); learning against forgetting (draw_tradeoff); validation loss against training tokens per run
  (draw_validation_by_tokens); training's peak by what holds it (draw_memory_breakdown).
- a study (study.py's summary.json and the runs' results JSON, lvf.discovery.load_study_runs): validation loss
  against step per rank and full fine-tuning; held-out loss against learning rate per method (the U-curve);
  held-out perplexity against training's peak memory (the Pareto view).

Each plot is a pair where a test or the findings need the numbers: a function that returns what is plotted (plain
numbers) and draw_* that draws it into a PNG at `path` and returns the path, or None when the runs hold nothing to
draw. matplotlib's Figure API (no pyplot state).
"""

from pathlib import Path

import numpy as np
from matplotlib.colors import to_hex, to_rgb
from matplotlib.figure import Figure

from lvf import groups as grouping
from lvf import statistics

# A family's hue: the first family of a method takes the method's colour, every further family (another LoRA
# variant, a method without a colour) the next of OTHER_COLORS. Within a family of several ranks or variants, a
# shade each: lightest first (the lowest rank), the family's own colour last.
METHOD_COLORS = {"base": "#888888", "lora": "#1f77b4", "qlora": "#17becf", "full": "#d62728"}
OTHER_COLORS = ["#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#bcbd22"]
LIGHTEST_SHADE = 0.4  # the share of the family's colour (the rest white) in its lightest shade


def shade(color, index, count):
    if count < 2:
        return color
    share = LIGHTEST_SHADE + (1 - LIGHTEST_SHADE) * index / (count - 1)
    return to_hex([1 - share * (1 - channel) for channel in to_rgb(color)])


def each_color(members):
    """{key: colour} for (key, method, family) members listed in the order they are shown."""
    families = list(dict.fromkeys((method, family) for _, method, family in members))
    hues, others = {}, iter(OTHER_COLORS * len(families))
    for method, family in families:
        taken = method in METHOD_COLORS and METHOD_COLORS[method] not in hues.values()
        hues[method, family] = METHOD_COLORS[method] if taken else next(others)
    colors = {}
    for method, family in families:
        keys = [key for key, *other in members if tuple(other) == (method, family)]
        colors.update({key: shade(hues[method, family], index, len(keys)) for index, key in enumerate(keys)})
    return colors


def save(figure, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


# --------------------------------------------------------------------------- an experiment's groups of runs


def group_colors(groups):
    """{group label: colour}: a group's family is its method and variant but for the rank (lora_r)."""
    return each_color([(group.label, group.method, tuple(item for item in group.variant if item[0] != "lora_r"))
                       for group in groups])


def draw_comparison(groups, path, seed=42, resamples=1000):
    """Bar charts, one bar per group: perplexity (mean, 95% interval), memory, training time, parameters."""
    labels = [group.label for group in groups]
    palette = group_colors(groups)
    colors = [palette[group.label] for group in groups]
    figure = Figure(figsize=(16, 4.2))
    axes = figure.subplots(1, 4)

    summaries = [statistics.runs_summary(group.runs, seed, resamples) for group in groups]
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
    trained_colors = [palette[group.label] for group in trained]
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
    return save(figure, path)


def run_perplexity(run, ids, field="per_example"):
    return statistics.mean_perplexity([run], ids, field)


def tradeoff_points(found):
    """Per tuned run against its group's base: improvement (base − tuned perplexity, higher = learned more)
    and forgetting (tuned − base general-text perplexity, higher = forgot more; None when not recorded)."""
    points = []
    for group, base, result, general in found:
        if base.method not in grouping.UNTRAINED or result is None or result.get("difference") is None:
            continue
        ids = statistics.shared_ids(group.runs + base.runs)
        general_ids = statistics.shared_ids(group.runs + base.runs, "general_per_example") if general else []
        base_ppl = statistics.mean_perplexity(base.runs, ids)
        base_general = (statistics.mean_perplexity(base.runs, general_ids, "general_per_example") if general_ids
                        else None)
        runs = [(base_ppl - run_perplexity(run, ids),
                 run_perplexity(run, general_ids, "general_per_example") - base_general if general_ids else None)
                for run in group.runs]
        points.append((group, result, general if general_ids else None, runs))
    return points


def draw_tradeoff(found, groups, path):
    """Learning (improvement over base) against forgetting (general-text perplexity change): one small point per
    run, each group's mean with its two-level interval; without general-text results, learning alone. `found`:
    lvf.groups.comparisons; `groups`: all of them (for the colours)."""
    points = tradeoff_points(found)
    if not points:
        return None
    palette = group_colors(groups)
    forgetting = all(general is not None for _, _, general, _ in points)
    figure = Figure(figsize=(7.5, 5.5 if forgetting else 2.2 + 0.7 * len(points)))
    axis = figure.subplots()
    for row, (group, result, general, runs) in enumerate(points):
        color = palette[group.label]
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
    return save(figure, path)


def training_tokens_at(run, entry):
    """Tokens trained when a log entry was written: the Trainer's count when kept, else steps × mean tokens
    per optimizer step."""
    if entry.get("num_input_tokens_seen") is not None:
        return entry["num_input_tokens_seen"]
    if run.get("train_tokens") and run.get("optimizer_steps"):
        return entry["step"] * run["train_tokens"] / run["optimizer_steps"]
    return None


def validation_by_tokens(run):
    points = [(training_tokens_at(run, entry), entry["eval_loss"]) for entry in run.get("log_history") or []
              if entry.get("eval_loss") is not None and entry.get("step") is not None]
    return [(tokens, loss) for tokens, loss in points if tokens is not None]


def draw_validation_by_tokens(groups, path):
    """Validation loss against training tokens, one line per run coloured by group; None without log history."""
    curves = [(group, validation_by_tokens(run)) for group in groups for run in group.runs]
    curves = [(group, curve) for group, curve in curves if curve]
    if not curves:
        return None
    palette = group_colors(groups)
    figure = Figure(figsize=(7.5, 5))
    axis = figure.subplots()
    styles = ["-", "--", ":", "-."]
    labelled = set()
    for group, curve in curves:
        tokens, losses = zip(*curve, strict=True)
        style = styles[[g for g in groups if g.method == group.method].index(group) % len(styles)]
        axis.plot(tokens, losses, style, marker="o", markersize=3, color=palette[group.label], alpha=0.8,
                  label=None if group.label in labelled else group.label)
        labelled.add(group.label)
    axis.set_xlabel("training tokens")
    axis.set_ylabel("validation loss (the Trainer's eval_loss)")
    axis.set_title("Validation loss during training, one line per run")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return save(figure, path)


def draw_memory_breakdown(groups, path):
    """Training's peak per group as stacked bars: weights, gradients, optimizer states, the rest."""
    measured = [(group, parts) for group in groups if (parts := grouping.group_breakdown(group)) is not None]
    if not measured:
        return None
    figure = Figure(figsize=(6, 4.2))
    axis = figure.subplots()
    labels = [group.label for group, _ in measured]
    bottom = [0.0] * len(measured)
    for part, color in zip(grouping.BREAKDOWN_PARTS, ("#7f7f7f", "#ff7f0e", "#9467bd", "#bcbd22"), strict=True):
        heights = [parts[part] / 2**30 for _, parts in measured]
        axis.bar(labels, heights, bottom=bottom, color=color, label=part.replace("_", " "))
        bottom = [low + height for low, height in zip(bottom, heights, strict=True)]
    kinds = sorted({run.get("phase_memory_kind") or "?" for group, _ in measured for run in group.runs})
    axis.set_title(f"Training's peak memory, by what holds it\n{', '.join(kinds)}")
    axis.set_ylabel("GiB")
    axis.legend()
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return save(figure, path)


def draw_group_plots(groups, found, folder, seed=42, resamples=1000):
    """An experiment's four plots into its folder; the paths of those drawn."""
    folder = Path(folder)
    drawn = [draw_comparison(groups, folder / "comparison.png", seed, resamples),
             draw_tradeoff(found, groups, folder / "learning_vs_forgetting.png"),
             draw_validation_by_tokens(groups, folder / "validation_curves.png"),
             draw_memory_breakdown(groups, folder / "memory-breakdown.png")]
    return [path for path in drawn if path is not None]


def draw_benchmark_tradeoff(points, groups, path):
    """Learning (held-out perplexity gained) against forgetting (benchmark accuracy lost, mean of the tasks), each
    group's mean with both paired intervals; points: lvf.benchmark_tables.tradeoff_points; None when no tuned run
    recorded a benchmark. `groups`: all of them (for the colours)."""
    if not points:
        return None
    palette = group_colors(groups)
    figure = Figure(figsize=(7.5, 5.5))
    axis = figure.subplots()
    for group, learned, forgot, _ in points:
        x, y = learned["value"], forgot["value"]
        axis.errorbar([x], [y], xerr=[[x - learned["ci95"][0]], [learned["ci95"][1] - x]],
                      yerr=[[y - forgot["ci95"][0]], [forgot["ci95"][1] - y]], fmt="o", markersize=10,
                      color=palette[group.label], capsize=5,
                      label=f"{group.label} ({len(group.runs)} run{'s' if len(group.runs) > 1 else ''})")
    axis.axvline(0, color="black", linewidth=0.8)
    axis.axhline(0, color="black", linewidth=0.8)
    tasks = points[0][3]
    axis.set_xlabel("learning: base − tuned held-out perplexity (higher = learned more)")
    axis.set_ylabel(f"forgetting: base − tuned accuracy, {'mean of tasks' if len(tasks) > 1 else tasks[0]} "
                    "(higher = forgot more)")
    axis.set_title(f"Learning vs forgetting on benchmarks ({', '.join(tasks)})\n95% intervals: seeds, then items",
                   fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return save(figure, path)


# --------------------------------------------------------------------------- a study's methods


def is_full(name, entry):
    """Full fine-tuning: summary's script, or (in a summary written before methods named their script) the name."""
    return entry.get("script") == "full_finetune" if "script" in entry else name.startswith("full")


def family(name, entry):
    return entry.get("family") or name


def study_method(name, entry):
    """The method whose colour a study method's family starts from."""
    return "full" if is_full(name, entry) else "qlora" if family(name, entry).startswith("qlora") else "lora"


def method_label(name, entry):
    """The method's name, with its rank where the name does not already end in it."""
    rank = entry.get("rank")
    return f"{name} (r={rank})" if rank is not None and not name.endswith(f"-r{rank}") else name


def seed_runs(entry, runs):
    """The method's runs at its picked rate (one per seed) that have been loaded."""
    return [runs[run["file"]] for run in entry.get("runs", []) if run["file"] in runs]


def method_order(summary):
    """The study's methods in lvf.groups' order: by family, each family's ranks ascending, full fine-tuning last."""
    methods = summary["methods"]
    return sorted(methods, key=lambda name: grouping.method_order_key(
        family(name, methods[name]), methods[name].get("rank"), name, full=is_full(name, methods[name])))


def method_colors(summary):
    """{method name: colour}: the family's hue, a shade per rank (lightest the lowest)."""
    methods = summary["methods"]
    return each_color([(name, study_method(name, methods[name]), family(name, methods[name]))
                       for name in method_order(summary)])


def study_figure(summary):
    """(each method's colour, a new figure, its one axis)."""
    figure = Figure(figsize=(7.5, 5))
    return method_colors(summary), figure, figure.subplots()


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
        if seeded and statistics.shared_ids(seeded):
            points[name] = {"memory_bytes": float(np.mean([run["train_peak_memory_bytes"] for run in seeded])),
                            **statistics.perplexity_summary(seeded, seed, resamples)}
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
