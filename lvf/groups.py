"""Runs grouped for the report: by method and variant (the settings named by --variant-keys, everything that tells
runs of one method apart except the training seed), in the one order every table and plot uses (base, LoRA, QLoRA,
other methods, full fine-tuning; a method's variants by their settings), and the pairs of groups compared. Runs
evaluated on different examples are refused here, before any number is computed."""

import json
from dataclasses import dataclass

import numpy as np

from lvf import errors, statistics

METHOD_ORDER = ("base", "lora", "qlora")  # then other methods by name, full fine-tuning last
METHOD_LABELS = {"base": "Zero-shot (base)", "lora": "LoRA", "qlora": "QLoRA", "full": "Full fine-tuning"}
PAIRS = [("lora", "full"), ("qlora", "full"), ("lora", "base"), ("qlora", "base"), ("full", "base")]
UNTRAINED = {"base"}  # no training seed: one run measures it fully
VARIANT_KEYS = ("model,dataset,eval_file,learning_rate,lora_targets,lora_r,quantize,"
                "use_dora,use_rslora,init_lora_weights")
SHORT_KEYS = {"learning_rate": "lr", "lora_targets": "targets", "lora_r": "r", "eval_file": "eval",
              "use_dora": "DoRA", "use_rslora": "rsLoRA", "init_lora_weights": "init"}
# finetune.py's LoRA variants, as a run made before their flags existed was trained: peft's defaults. So such a
# run groups with one made with the defaults named.
SETTING_DEFAULTS = {"use_dora": False, "use_rslora": False, "init_lora_weights": "true"}
BREAKDOWN_PARTS = ("weights", "gradients", "optimizer_states", "other")


def method_order_key(method, rank=None, name="", full=None):
    """Where a method sorts in every table and plot: base, LoRA, QLoRA, other methods by name, full fine-tuning
    (`full`, else the method named "full") last; within one, by rank, then name."""
    full = method == "full" if full is None else full
    known = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return full, known, method, rank or 0, name


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


def group_runs(runs, variant_keys):
    found = {}
    for run in runs:
        variant = tuple((key, setting(run, key)) for key in variant_keys)
        found.setdefault((run["method"], variant), []).append(run)
    ordered = sorted(found.items(), key=lambda item: (method_order_key(item[0][0]), variant_order(item[0][1])))
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


def comparisons(groups, seed, resamples):
    """(a, b, held-out difference, general-text difference) per compared pair (lvf.statistics.compare)."""
    return [(a, b, statistics.compare(a.runs, b.runs, seed, resamples),
             statistics.compare(a.runs, b.runs, seed, resamples, "general_per_example"))
            for a, b in compared_pairs(groups)]


# --------------------------------------------------------------------------- same examples or refuse


def mismatch(run_a, run_b, field="per_example"):
    """None when both runs scored the same examples with the same token counts, else how they differ."""
    a, b = statistics.example_tokens(run_a, field), statistics.example_tokens(run_b, field)
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


def load_groups(runs, variant_keys, allow_intersection=False):
    """The runs grouped (variant_keys: comma-separated); runs on different examples refused unless
    allow_intersection."""
    groups = group_runs(runs, [key.strip() for key in variant_keys.split(",") if key.strip()])
    if not allow_intersection:
        refuse_different_examples(groups)
    return groups


# --------------------------------------------------------------------------- training's peak, by what holds it


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
