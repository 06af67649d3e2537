"""The report's Markdown: each table a function of lvf.groups' groups (or a study's summary) that returns its
lines, and the caption that says what the numbers are. The statistics come from lvf.statistics."""

from lvf import groups as grouping
from lvf import statistics

ONE_RUN_EACH = "one run each: seed variance not measured"


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


def fmt_training_peak(group):
    """Training's own peak, and what it holds: weights + gradients + optimizer states + the rest."""
    parts = grouping.group_breakdown(group)
    peak = fmt_bytes(group.mean("train_peak_memory_bytes"))
    if parts is None:
        return peak
    return f"{peak} = " + " + ".join(fmt_bytes(parts[part]) for part in grouping.BREAKDOWN_PARTS)


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
              "| training steps' time | train tokens/s (steps) | artifact |")
    lines = [header, "|" + " --- |" * 12]
    for group in groups:
        run = group.runs[0]
        data = run.get("eval_file") or run.get("dataset") or "–"
        lines.append(
            f"| {group.label} | `{run['model']}` | `{data}` | {fmt_seeds(group)} "
            f"| {fmt_perplexity(statistics.runs_summary(group.runs, seed, resamples))} "
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


def comparison_table(found):
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
        ids = statistics.shared_ids(group.runs)
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
    how = "".join(f"; {part}" for part in (fmt_scoring(runs), fmt_full_recipe(runs)) if part)
    return (f"_Model {', '.join(models)} on {', '.join(data)}; machine: {'; '.join(machines)}{how}; run on {when}; "
            f"commit {', '.join(commits)}{source}._")


def fmt_scoring(runs):
    """The precision the runs were scored in (lvf.precision), e.g. "scored in bfloat16"; older results recorded it
    in runtime only, or not at all (then their weights' dtype)."""
    dtypes = sorted({run.get("eval_dtype") or (run.get("runtime") or {}).get("eval_dtype") or run.get("dtype") or "?"
                     for run in runs})
    return f"scored in {', '.join(dtypes)}"


def fmt_full_recipe(runs):
    """Full fine-tuning's update as it ran, e.g. "full fine-tuning stepped in backward, no clipping"; results
    before runtime.max_grad_norm was recorded clipped at 1.0 exactly when stepped after backward."""
    recipes = set()
    for run in runs:
        if run.get("method") == "full" and run.get("runtime"):
            in_backward = bool(run["runtime"].get("optimizer_in_backward"))
            norm = run["runtime"].get("max_grad_norm", 0.0 if in_backward else 1.0)
            clipping = f"gradients clipped at norm {float(norm)}" if norm else "no clipping"
            recipes.add(f"{'in' if in_backward else 'after'} backward, {clipping}")
    return f"full fine-tuning stepped {'; '.join(sorted(recipes))}" if recipes else ""


METHOD_NOTE = ("_Perplexity is exp(Σ NLL / Σ response tokens) on the held-out split; the write-up's metric scores "
               "padding and prompt and is shown only to explain its numbers. A difference is of mean perplexities "
               "across seeds; its interval resamples seeds, then examples paired by id._")


def study_rate_table(summary):
    """Per method: the learning rates tried with their validation loss, and the one picked."""
    lines = ["", "| study method | learning rates tried: validation loss (picked in bold) | picked |",
             "| --- | --- | --- |"]
    for method, found in summary["methods"].items():
        picked = found["picked_learning_rate"]
        tried = ", ".join(f"{'**' if float(rate) == picked else ''}{rate}: {entry['validation_loss']:.4f}"
                          f"{'**' if float(rate) == picked else ''}" for rate, entry in found["learning_rates"].items())
        lines.append(f"| {method} | {tried} | {picked:g} |")
    return lines
