"""What a training run leaves in its --output-dir: checkpoint-N folders while it trains, `final` when done.

Kept apart from lvf.training (which imports torch and transformers) so that the study's scheduler can look for
a checkpoint to resume from, and prune a finished run, without loading either."""

import re
import shutil
from pathlib import Path

CHECKPOINT_PATTERN = re.compile(r"checkpoint-\d+")


def latest_checkpoint(output_dir):
    """The newest complete checkpoint-N folder, or None. The Trainer writes trainer_state.json last,
    so a folder without it was cut short (a kill during saving) and is skipped."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    complete = [item for item in folder.iterdir()
                if CHECKPOINT_PATTERN.fullmatch(item.name) and (item / "trainer_state.json").is_file()]
    if not complete:
        return None
    return str(max(complete, key=lambda item: int(item.name.split("-")[1])))


def folder_bytes(path):
    return sum(item.stat().st_size for item in Path(path).rglob("*") if item.is_file())


def prune_outputs(output_dir, keep_final):
    """After a run's results JSON is complete: deletes its checkpoint-N folders (the JSON holds what they were
    kept for) and a leftover final.partial, and, unless keep_final, the final model too (`final` and earlier
    `final-<timestamp>` copies). origin.json stays. Returns the bytes freed."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return 0
    doomed = [item for item in folder.iterdir() if item.is_dir() and (
        CHECKPOINT_PATTERN.fullmatch(item.name) or item.name == "final.partial"
        or (not keep_final and (item.name == "final" or item.name.startswith("final-"))))]
    freed = 0
    for item in doomed:
        freed += folder_bytes(item)
        shutil.rmtree(item, ignore_errors=True)
    return freed
