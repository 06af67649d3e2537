"""A study's stage planned before it starts: the disk it holds at its peak, and the GPU time its training takes.

Disk. A training run writes what the pre-flight counts for it (lvf.preflight.checkpoint_and_final_bytes): up to
CHECKPOINTS_AT_ONCE checkpoints while it trains, and its final model. As each run finishes, the study deletes its
checkpoints (unless --keep-checkpoints) and keeps its final model until the stage is over. With `workers` runs at
once, a stage therefore holds at most every run's kept part plus the checkpoints of the `workers` runs with the
largest ones: an upper bound, reached when those runs train side by side.

Time. bench/gpu_check.py times LoRA and full fine-tuning of Llama 3 8B on one GPU and writes, per method, one
epoch of dolly-15k at the scripts' defaults (estimated_epoch_hours). A run of that model and data at those defaults
then trains for its epochs times that; a run that differs has no estimate. Evaluation is not counted.
"""

import heapq
import json
from dataclasses import dataclass
from pathlib import Path

from lvf import models
from lvf.settings import DEFAULT_DATASET

# What gpu_check's epoch estimate assumes of a run: its model and data, and a whole epoch of the training split
# at gpu_check's tokens per record (measured at --max-length 1024).
TIMED_SETTINGS = {"model": models.DEFAULT_MODEL, "dataset": DEFAULT_DATASET, "max_length": 1024,
                  "max_train_samples": None, "max_steps": -1}


@dataclass(frozen=True)
class RunCost:
    """One training run of a stage: bytes on disk while it trains (checkpoints and final model) and once it is
    finished (what the study keeps), its training hours (None: no estimate), and whether it is finished already."""

    family: str  # the method (and rank) it belongs to: its folder in the study, e.g. lora-all-linear-r64
    training_bytes: int
    kept_bytes: int
    hours: float | None = None
    done: bool = False


def stage_peak_bytes(costs, workers):
    """The most a stage holds on disk at once: every run's kept part, plus the rest of what the `workers` largest
    unfinished runs hold while they train."""
    extras = sorted((cost.training_bytes - cost.kept_bytes for cost in costs if not cost.done), reverse=True)
    return sum(cost.kept_bytes for cost in costs) + sum(extras[:workers])


def most_workers_within(costs, free_bytes, workers):
    """The most runs at once (up to `workers`) whose peak fits free_bytes; 0 when not even one at a time does."""
    return max((count for count in range(1, workers + 1) if stage_peak_bytes(costs, count) <= free_bytes), default=0)


def stage_hours(costs, workers):
    """(GPU-hours, wall-clock hours) of the stage's unfinished runs, each on one GPU, `workers` at once in the
    order the scheduler submits them; None for both when a run has no estimate."""
    hours = [cost.hours for cost in costs if not cost.done]
    if any(value is None for value in hours):
        return None, None
    if not hours:
        return 0.0, 0.0
    free_at = [0.0] * min(workers, len(hours))  # when each worker is next free: a run goes to the first free one
    for value in hours:
        heapq.heapreplace(free_at, free_at[0] + value)
    return sum(hours), max(free_at)


def read_gpu_check(path):
    """({"lora": hours, "full": hours} for one epoch, the GPU's name) from bench/gpu_check.py's JSON, or
    (None, why not) when it cannot give them."""
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"no {path}: run bash bench/gpu_check.sh on the GPU first (or pass --gpu-check FILE)"
    except (OSError, json.JSONDecodeError) as error:
        return None, f"{path} is not readable JSON ({error})"
    if report.get("tiny"):
        return None, f"{path} is a --tiny check (the CPU): run bash bench/gpu_check.sh on the GPU"
    hours = {method: result["estimated_epoch_hours"] for method, result in (report.get("results") or {}).items()
             if isinstance(result, dict) and result.get("estimated_epoch_hours")}
    if not hours:
        return None, f"{path} holds no estimated epoch time (its methods failed or were skipped)"
    return hours, report.get("device_name") or "a GPU"


def training_hours(settings, method, epoch_hours):
    """A run's training hours from gpu_check's one-epoch figures: its epochs times its method's epoch, where the
    run trains what gpu_check's epoch assumes (TIMED_SETTINGS); else None."""
    if not epoch_hours or any(getattr(settings, key) != value for key, value in TIMED_SETTINGS.items()):
        return None
    timed = epoch_hours.get(method)  # "lora" or "full": gpu_check does not time QLoRA
    return None if timed is None else settings.num_epochs * timed


def hours_text(value):
    return f"{value:,.1f}" if value is not None else "?"
