"""The demo task's items (demo-mc.jsonl, beside this file), for lm-eval-harness's custom_dataset: read from this
folder, not the working directory, so the task loads wherever lm_eval or a script runs."""

from pathlib import Path

import datasets

ITEMS = Path(__file__).with_name("demo-mc.jsonl")


def load(**_metadata):
    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(ITEMS))})
