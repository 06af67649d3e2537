"""One rank of tests/test_fsdp_loading.py: runs full_finetune.main up to the model load, then records what this
rank saw and holds, in <out>/rank<RANK>.json, and stops before training (FSDP needs an accelerator)."""

import json
import os
import sys
from pathlib import Path

from transformers.integrations import is_fsdp_enabled

import full_finetune
from lvf import models, training

OUT = Path(sys.argv[1])
seen = {}
load_model = models.load_model


def load_and_record(*args, **kwargs):
    seen["fsdp_enabled_at_load"] = is_fsdp_enabled()
    model = load_model(*args, **kwargs)
    parameters = list(model.parameters())
    seen["parameter_bytes"] = sum(p.untyped_storage().nbytes() for p in parameters if p.device.type != "meta")
    seen["devices"] = sorted({p.device.type for p in parameters})
    seen["numel"] = sum(p.numel() for p in parameters)
    return model


def stop_before_training(*args, **kwargs):
    OUT.joinpath(f"rank{os.environ['RANK']}.json").write_text(json.dumps(seen))
    sys.exit(0)


models.load_model = load_and_record
training.train = stop_before_training
full_finetune.main(sys.argv[2:])
