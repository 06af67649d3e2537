"""Perplexity over runs and seeds from the results' per-example NLL sums, and the two-level bootstrap (seeds, then
examples paired by id) that report.py and the study's findings share; the same for a score per item (benchmark
accuracy). numpy only: no torch."""

import numpy as np


def example_tokens(run, field="per_example"):
    return {item["id"]: item["tokens"] for item in run.get(field) or []}


def shared_ids(runs, field="per_example"):
    """Ids every run scored, with the same token count in each."""
    first, *others = [example_tokens(run, field) for run in runs]
    return sorted(i for i, tokens in first.items() if all(other.get(i) == tokens for other in others))


def run_matrices(runs, ids, field="per_example"):
    """NLL sums and token counts, one row per run, one column per example id."""
    rows = [{item["id"]: item for item in run[field]} for run in runs]
    nll = np.array([[row[i]["nll_sum"] for i in ids] for row in rows], dtype=np.float64)
    tokens = np.array([[row[i]["tokens"] for i in ids] for row in rows], dtype=np.float64)
    return nll, tokens


def mean_perplexity(runs, ids, field="per_example"):
    nll, tokens = run_matrices(runs, ids, field)
    return float(np.mean(np.exp(nll.sum(1) / tokens.sum(1))))


def two_level_draws(sides, ids, seed, resamples, field="per_example"):
    """Resampled mean perplexity of each side (a list of runs): per resample, one draw of examples shared by
    every side (paired by id), then each side's seeds drawn with replacement."""
    rng = np.random.default_rng(seed)
    weights = item_weights(rng, len(ids), resamples)
    draws = []
    for runs in sides:
        nll, tokens = run_matrices(runs, ids, field)
        per_seed = np.exp((weights @ nll.T) / np.maximum(weights @ tokens.T, 1))  # resamples x runs
        draws.append(resampled_seed_means(rng, per_seed))
    return draws


def item_weights(rng, items, resamples):
    """How often each item is drawn in each resample (resamples x items): one draw serves every side, so the sides
    stay paired item by item."""
    picks = rng.integers(0, items, size=(resamples, items))
    weights = np.zeros((resamples, items))
    np.add.at(weights, (np.arange(resamples)[:, None], picks), 1.0)
    return weights


def resampled_seed_means(rng, per_seed):
    """per_seed: a statistic per resample and run (resamples x runs); per resample, the mean over runs (seeds) drawn
    with replacement."""
    seeds = rng.integers(0, per_seed.shape[1], size=per_seed.shape)
    return np.take_along_axis(per_seed, seeds, axis=1).mean(1)


def two_level_mean_draws(sides, strata, seed, resamples):
    """The same two-level bootstrap for a score per item, such as a benchmark's correctness (0 or 1). sides: one
    matrix per side, runs x items, columns paired across sides; strata: lists of column indices (one per task),
    each resampled within itself. Per resample and run, the mean over strata of each stratum's mean item score
    (each task weighs the same however many items it has); then each side's seeds are drawn with replacement."""
    rng = np.random.default_rng(seed)
    weights = [item_weights(rng, len(columns), resamples) for columns in strata]
    draws = []
    for scores in sides:
        per_seed = np.mean([drawn @ scores[:, columns].T / len(columns)
                            for drawn, columns in zip(weights, strata, strict=True)], axis=0)  # resamples x runs
        draws.append(resampled_seed_means(rng, per_seed))
    return draws


def interval(draws, level=0.95):
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(draws, tail)), float(np.percentile(draws, 100 - tail))]


def perplexity_summary(runs, seed, resamples, ids=None):
    """Mean perplexity over the runs (seeds) on the examples they share (or `ids`), its sd across runs, and the
    two-level 95% interval of the mean."""
    ids = shared_ids(runs) if ids is None else ids
    nll, tokens = run_matrices(runs, ids)
    per_run = np.exp(nll.sum(1) / tokens.sum(1))
    (draws,) = two_level_draws([runs], ids, seed, resamples)
    return {"mean": float(per_run.mean()), "sd": float(per_run.std(ddof=1)) if len(per_run) > 1 else None,
            "ci95": interval(draws), "examples": len(ids), "runs": len(runs)}
