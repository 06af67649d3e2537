"""What a saved adapter or model was: each training run writes origin.json (its method and the base model
by the name the user gave) into its output folder, and the final artifact carries a copy, so evaluating
the artifact later is recorded under its own method and base, never as the base model's result."""

import json
import re
from dataclasses import dataclass
from pathlib import Path

from lvf.errors import UsageError
from lvf.files import write_atomic
from lvf.results import is_main_process

ORIGIN_FILE = "origin.json"
ADAPTER_CONFIG = "adapter_config.json"


def write_origin(output_dir, method, base_model, experiment):
    """Called by a training script before it trains, so that checkpoints (in output_dir) and the final
    artifact (which gets a copy) both say what they are, and which experiment's results folder they belong to.
    The main process writes it; the other ranks of a launch do nothing."""
    if not is_main_process():
        return None
    origin = {"method": method, "base_model": base_model, "experiment": experiment}
    return write_atomic(Path(output_dir) / ORIGIN_FILE, json.dumps(origin, indent=2) + "\n")


def read_origin(folder):
    """origin.json in the folder itself (a final artifact) or in its parent (a checkpoint-N folder)."""
    for candidate in (Path(folder) / ORIGIN_FILE, Path(folder).parent / ORIGIN_FILE):
        if candidate.is_file():
            return json.loads(candidate.read_text(encoding="utf-8"))
    return None


@dataclass(frozen=True)
class SavedArtifact:
    folder: Path
    method: str  # the method that trained it: lora, qlora, full
    base_model: str | None  # the model it was trained from, as the user named it
    is_adapter: bool
    experiment: str | None = None  # the experiment that trained it (origin.json), whose results folder it joins


def inspect_folder(name):
    """A SavedArtifact for an adapter folder or a model folder this kit trained; None for anything else
    (a Hub id, a preset, or a plain model folder: those are evaluated as the base model)."""
    folder = Path(name)
    if not folder.is_dir():
        return None
    origin = read_origin(folder)
    is_adapter = (folder / ADAPTER_CONFIG).is_file()
    if not is_adapter:
        if origin is None:
            return None
        return SavedArtifact(folder, origin["method"], origin.get("base_model"), is_adapter=False,
                             experiment=origin.get("experiment"))
    # An adapter saved by another tool has no origin.json: peft's config still names its base.
    adapter_base = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    base_model = (origin or {}).get("base_model") or adapter_base
    if not base_model:
        raise UsageError(f"adapter {folder} does not name its base model ({ADAPTER_CONFIG} has no "
                         "base_model_name_or_path and there is no origin.json)")
    return SavedArtifact(folder, (origin or {}).get("method", "lora"), base_model, is_adapter=True,
                         experiment=(origin or {}).get("experiment"))


def results_name(folder):
    """eval-<name>: the folder's last two path parts (outputs/demo-cpu/lora/final -> eval-lora-final),
    so the LoRA and the full model's `final` folders do not overwrite each other's results."""
    parts = Path(folder).resolve().parts[-2:]
    return "eval-" + re.sub(r"[^\w.-]+", "-", "-".join(parts)).strip("-")
