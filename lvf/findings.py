"""The study's findings as sentences generated from its JSON (study.py's summary.json and the runs' results):
each LoRA method's picked learning rate over full fine-tuning's, bracketed by the grids; whether the best rate moved
with rank; and the smallest rank at which LoRA's held-out perplexity reaches full fine-tuning's. Pure functions of
the summary and the runs (lvf.discovery.load_study_runs)."""

from lvf import benchmark_tables
from lvf.plots import family, is_full, method_order, seed_runs
from lvf.statistics import interval, mean_perplexity, shared_ids, two_level_draws


def fmt_rate(rate):
    return f"{rate:g}"


def fmt_ratio(ratio):
    return f"{ratio:.3g}x"


def grid_steps(rates):
    """Ratios between neighbouring rates of a grid, ascending."""
    rates = sorted(rates)
    return [high / low for low, high in zip(rates, rates[1:], strict=False)]


def fmt_steps(rates):
    steps = grid_steps(rates)
    if not steps:
        return "one rate, no grid"
    low, high = min(steps), max(steps)
    return f"{low:.2g}x steps" if high / low < 1.05 else f"{low:.2g}x to {high:.2g}x steps"


def bracket(rates, picked):
    """The neighbours of the picked rate in its grid: (lower, higher), None on a side where it is the grid's edge.
    For a loss that falls then rises with the rate, the best rate lies between them."""
    rates = sorted(rates)
    index = rates.index(picked)
    return (rates[index - 1] if index > 0 else None, rates[index + 1] if index + 1 < len(rates) else None)


def tried_rates(entry):
    return sorted(float(rate) for rate in entry.get("learning_rates", {}))


def swept(entry):
    """A method whose rate was picked from its own sweep (not taken over from its family, as a rank-axis
    method's is); a summary written before picked_from existed swept every method."""
    return entry.get("picked_from", "sweep") == "sweep"


def full_method(summary):
    return next(((name, entry) for name, entry in summary["methods"].items() if is_full(name, entry)), (None, None))


def edge_note(name, rates, picked):
    lower, higher = bracket(rates, picked)
    if higher is None and lower is None:
        return f"{name}'s rate was the only one tried"
    if higher is None:
        return f"{name}'s {fmt_rate(picked)} is the top of its grid: its best rate may be higher"
    if lower is None:
        return f"{name}'s {fmt_rate(picked)} is the bottom of its grid: its best rate may be lower"
    return None


def ratio_range(lowest, highest):
    if lowest is not None and highest is not None:
        return f"between {fmt_ratio(lowest)} and {fmt_ratio(highest)}"
    if highest is not None:
        return f"at most {fmt_ratio(highest)}, with no lower bound"
    if lowest is not None:
        return f"at least {fmt_ratio(lowest)}, with no upper bound"
    return "no range at all"


def rate_ratios(summary):
    """Markdown lines: per LoRA method that swept its own rates, its picked rate over full fine-tuning's, with the
    grids' steps and the range the ratio can lie in if each best rate lies between its picked rate's neighbours."""
    full_name, full = full_method(summary)
    if full is None:
        return ["- No full fine-tuning in this study: no learning-rate ratio."]
    full_rates, full_picked = tried_rates(full), float(full["picked_learning_rate"])
    full_low, full_high = bracket(full_rates, full_picked)
    lines = []
    for name in method_order(summary):
        entry = summary["methods"][name]
        if is_full(name, entry) or not swept(entry):
            continue
        rates, picked = tried_rates(entry), float(entry["picked_learning_rate"])
        low, high = bracket(rates, picked)
        lowest = low / full_high if low is not None and full_high is not None else None
        highest = high / full_low if high is not None and full_low is not None else None
        notes = [note for note in (edge_note(name, rates, picked), edge_note(full_name, full_rates, full_picked))
                 if note]
        lines.append(
            f"- {name}: picked learning rate {fmt_rate(picked)} over {full_name}'s {fmt_rate(full_picked)} = "
            f"**{fmt_ratio(picked / full_picked)}**. The grids ({fmt_steps(rates)} for {name}, "
            f"{fmt_steps(full_rates)} for {full_name}) resolve it only to {ratio_range(lowest, highest)} (each "
            f"best rate between its picked rate's neighbours){'; ' + '; '.join(notes) if notes else ''}.")
    return lines


def rank_rate_checks(summary):
    """Markdown lines: for each rank-axis method that tried more than its family's picked rate (the neighbours at
    the smallest and largest rank), which of its rates had the lowest validation loss."""
    lines = []
    for name in method_order(summary):
        entry = summary["methods"][name]
        if swept(entry) or len(entry.get("learning_rates", {})) < 2:
            continue
        tried = {float(rate): found["validation_loss"] for rate, found in entry["learning_rates"].items()}
        best, picked = min(tried, key=tried.get), float(entry["picked_learning_rate"])
        listed = ", ".join(f"{fmt_rate(rate)}: {tried[rate]:.4f}" for rate in sorted(tried))
        verdict = (f"{family(name, entry)}'s picked rate {fmt_rate(picked)} is still the best of those tried"
                   if best == picked else
                   f"{fmt_rate(best)} does better than {family(name, entry)}'s picked {fmt_rate(picked)}: the best "
                   "rate moved with rank")
        lines.append(f"- At rank {entry.get('rank')} ({name}), {verdict} (validation loss {listed}).")
    return lines


def rank_reaching_full(summary, runs, seed=42, resamples=1000):
    """Markdown lines: per LoRA family trained at several ranks, the smallest rank whose held-out perplexity (mean
    over seeds) is not significantly above full fine-tuning's, or that none is within the ranks tried.

    "Reaches" is judged on the paired difference, LoRA at that rank minus full fine-tuning, as report.py compares
    groups: mean perplexities across seeds on the examples both scored, with the two-level 95% interval (seeds,
    then examples paired by id); a rank reaches full fine-tuning when that interval's lower end is at or below 0.
    Full fine-tuning's own interval is mostly the sampling of the held-out examples, which both sides share, so
    checking a rank's mean against it would call almost any rank "within"."""
    full_name, full = full_method(summary)
    full_runs = seed_runs(full, runs) if full is not None else []
    if not full_runs:
        return ["- No full fine-tuning runs in this study: no rank is compared with it."]
    families = {}
    for name in method_order(summary):
        entry = summary["methods"][name]
        if not is_full(name, entry) and entry.get("rank") is not None and seed_runs(entry, runs):
            families.setdefault(family(name, entry), []).append((entry["rank"], name, seed_runs(entry, runs)))
    lines = []
    for family_name, ranked in families.items():
        if len(ranked) < 2:
            continue
        ids = shared_ids(full_runs + [run for _, _, seeded in ranked for run in seeded])
        if not ids:
            lines.append(f"- {family_name}: its runs and {full_name}'s share no held-out example: not compared.")
            continue
        full_mean = mean_perplexity(full_runs, ids)
        compared = []
        for rank, name, seeded in sorted(ranked, key=lambda item: item[0]):
            draws_lora, draws_full = two_level_draws([seeded, full_runs], ids, seed, resamples)
            low, high = interval(draws_lora - draws_full)
            compared.append((rank, name, len(seeded), mean_perplexity(seeded, ids) - full_mean, low, high))
        tried = ", ".join(str(rank) for rank, *_ in compared)
        shown = "; ".join(f"r={rank}: {difference:+.3f} ({low:+.3f} to {high:+.3f}, {seeds} seed"
                          f"{'s' if seeds > 1 else ''})" for rank, _, seeds, difference, low, high in compared)
        reached = next((item for item in compared if item[4] <= 0), None)
        where = (f"{len(ids)} held-out examples; {full_name} {full_mean:.3f}, {len(full_runs)} seed"
                 f"{'s' if len(full_runs) > 1 else ''}")
        if reached is None:
            lines.append(f"- {family_name}: at no rank tried ({tried}) does LoRA reach {full_name}'s held-out "
                         f"perplexity; every rank is significantly higher. Perplexity minus {full_name}'s (95% CI): "
                         f"{shown} ({where}).")
        else:
            lines.append(f"- {family_name}: the smallest rank whose held-out perplexity is not significantly above "
                         f"{full_name}'s is **{reached[0]}** (ranks tried: {tried}). Perplexity minus {full_name}'s "
                         f"(95% CI): {shown} ({where}).")
    return lines or ["- No LoRA method was trained at several ranks: no rank is compared with full fine-tuning."]


def findings_lines(summary, runs, seed=42, resamples=1000):
    """The findings block: a heading line, then the rate ratios, the rank checks of the rate, and the ranks
    reaching full fine-tuning; every number from the summary and the runs."""
    lines = ["", "**Findings** (generated from the study's JSON):", ""]
    lines += rate_ratios(summary) + rank_rate_checks(summary) + rank_reaching_full(summary, runs, seed, resamples)
    return lines + benchmark_tables.findings_lines(summary, runs, seed, resamples)

