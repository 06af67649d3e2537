"""The statistics of the report and the study: perplexity over runs and seeds from the results' per-example NLL
sums, with two bootstraps, both percentile intervals (common.interval):

- over examples (one run, or two runs paired by example id): common.bootstrap_examples, scipy.stats.bootstrap. It
  lives in common.py because evaluation records each run's interval as it scores, and common.py imports nothing
  of lvf; this module hands it on (paired_difference).
- over seeds, then examples (two_level_draws): each resample draws the examples once, shared by every side
  (paired by id), then each side's runs (its seeds) with replacement. scipy.stats.bootstrap resamples one level
  (the observations of each sample, or paired rows), so this hierarchy is written here, with numpy.
"""

import math

import numpy as np

from common import bootstrap_examples, interval, pooled_perplexity

__all__ = ["compare", "example_tokens", "interval", "mean_perplexity", "paired_difference", "perplexity_summary",
           "run_matrices", "runs_summary", "shared_ids", "two_level_draws"]


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


# --------------------------------------------------------------------------- over examples: one run against another


def paired_difference(per_example_a, per_example_b, seed=42, resamples=1000, level=0.95):
    """Perplexity of run a minus run b over the examples both scored, its interval resampling those examples
    together (paired by id); None when they share none."""
    a = {item["id"]: item for item in per_example_a}
    b = {item["id"]: item for item in per_example_b}
    shared = sorted(set(a) & set(b))
    if not shared:
        return None
    columns = [np.array([side[i][key] for i in shared], dtype=np.float64) for side in (a, b)
               for key in ("nll_sum", "tokens")]

    def difference(nll_a, tokens_a, nll_b, tokens_b, axis=-1):
        return pooled_perplexity(nll_a, tokens_a, axis) - pooled_perplexity(nll_b, tokens_b, axis)

    low, high = interval(bootstrap_examples(columns, difference, seed, resamples), level)
    nll_a, tokens_a, nll_b, tokens_b = columns
    point = math.exp(nll_a.sum() / tokens_a.sum()) - math.exp(nll_b.sum() / tokens_b.sum())
    return {"difference": point, "ci95": [low, high], "examples": len(shared), "significant": not low <= 0 <= high}


# --------------------------------------------------------------------------- over seeds, then examples


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


def perplexity_summary(runs, seed, resamples, ids=None):
    """Mean perplexity over the runs (seeds) on the examples they share (or `ids`), its sd across runs, and the
    two-level 95% interval of the mean."""
    ids = shared_ids(runs) if ids is None else ids
    nll, tokens = run_matrices(runs, ids)
    per_run = np.exp(nll.sum(1) / tokens.sum(1))
    (draws,) = two_level_draws([runs], ids, seed, resamples)
    return {"mean": float(per_run.mean()), "sd": float(per_run.std(ddof=1)) if len(per_run) > 1 else None,
            "ci95": interval(draws), "examples": len(ids), "runs": len(runs)}


def runs_summary(runs, seed, resamples):
    """A group's perplexity (report.py): mean ± sd across its runs with the two-level interval of the mean; one run
    keeps its own recorded perplexity and interval (over examples)."""
    ids = shared_ids(runs)
    if not ids:  # only with --allow-intersection: runs of one group scored on different examples
        return {"mean": None, "sd": None, "ci95": None, "examples": 0}
    if len(runs) == 1 and len(runs[0]["per_example"]) == len(ids):
        return {"mean": runs[0]["perplexity"], "sd": None, "ci95": runs[0]["perplexity_ci95"], "examples": len(ids)}
    summary = perplexity_summary(runs, seed, resamples, ids)
    return {key: summary[key] for key in ("mean", "sd", "ci95", "examples")}


def compare(runs_a, runs_b, seed, resamples, field="per_example"):
    """Mean perplexity of a minus b (each a group's runs) on the examples every run of both scored, with its
    two-level interval; None when a run lacks the field; examples 0 when they share none."""
    if not all(run.get(field) for run in runs_a + runs_b):
        return None
    ids = shared_ids(runs_a + runs_b, field)
    of = max(len(run[field]) for run in runs_a + runs_b)
    if not ids:
        return {"examples": 0, "of": of}
    draw_a, draw_b = two_level_draws([runs_a, runs_b], ids, seed, resamples, field)
    low, high = interval(draw_a - draw_b)
    return {"difference": mean_perplexity(runs_a, ids, field) - mean_perplexity(runs_b, ids, field),
            "ci95": [low, high], "examples": len(ids), "of": of, "significant": not low <= 0 <= high}
