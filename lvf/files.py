"""The kit's one way to write a file (atomically, earlier versions kept in history/ when asked). No torch here:
report.py writes with it too."""

import datetime as dt
import os
import shutil
from pathlib import Path


def write_atomic(path, text, keep_history=False):
    """The kit's one way to write a file: to a temporary file, then a rename, so a reader never sees half
    a file. With keep_history, an existing file is first kept in history/ beside it, with a timestamp."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if keep_history and path.exists():
            keep_in_history(path)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def keep_in_history(path):
    """Copies path to history/<stem>-<UTC time><suffix> beside it; the original stays until replaced."""
    history = path.parent / "history"
    history.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    kept = history / f"{path.stem}-{stamp}{path.suffix}"
    try:
        os.link(path, kept)  # a second name for the same file: instant, and the path is never missing
    except OSError:
        shutil.copy2(path, kept)
    return kept
