"""What the user asked, and what the run resolved from it.

Each script composes the flag groups it uses (model, data, evaluation, output, training) and parses them
once into frozen `Settings`: recorded exactly as given. What the run derives (device, dtypes, autocast,
optimizer, paths) is a separate frozen `Runtime`, recorded beside them.
"""

import argparse
import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from lvf import experiments, models
from lvf.cli import HelpFormatter, description  # noqa: F401 (the scripts' help, from here as before)
from lvf.errors import UsageError

PROJECT_DIR = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = "databricks/databricks-dolly-15k"


# --------------------------------------------------------------------------- value checks


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def step_limit(text):
    value = int(text)
    if value <= 0 and value != -1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, or -1 for no limit, got {text}")
    return value


def dropout_rate(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {text}")
    return value


def fraction(text):
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


# --------------------------------------------------------------------------- flag groups


DTYPE_HELP = ("weight dtype: auto is bfloat16 on CUDA, float32 on CPU (where LoRA under bf16 autocast trains on a "
              "bfloat16 copy of the frozen base); every method is scored in --eval-dtype")




def evaluation_parser(about, method, dtype_help=DTYPE_HELP):
    """The flags every script shares: what to evaluate, on which data, and where the results go; about: the
    script's --help description."""
    parser = argparse.ArgumentParser(description=about, formatter_class=HelpFormatter)
    add_model_flags(parser, dtype_help)
    add_data_flags(parser)
    add_evaluation_flags(parser)
    add_benchmark_flags(parser)
    add_output_flags(parser, method)
    return parser


def add_model_flags(parser, dtype_help=DTYPE_HELP):
    """The model group; a script whose --dtype means something else passes its own dtype_help."""
    group = parser.add_argument_group("model")
    add = group.add_argument
    add("--model", default=models.DEFAULT_MODEL,
        help="Hub id, local model folder, or preset name (" + ", ".join(models.MODEL_PRESETS) + ")")
    add("--chat-template", default=None,
        help="'llama3' installs the official Llama 3 Instruct template; or a path to a Jinja template file")
    add("--device", choices=["auto", "cuda", "cpu"], default="auto",
        help="where to run: auto is CUDA when a GPU is visible, else the CPU; cpu runs there knowingly (the "
             "--dry-run pre-flight then accepts a CPU plan); cuda stops at once when no GPU is visible")
    add("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help=dtype_help)
    add("--attn-implementation", choices=models.ATTENTION_IMPLEMENTATIONS, default="sdpa",
        help="attention kernels: sdpa (PyTorch's fused attention), flash_attention_2 (needs the flash-attn "
             "package), or eager")
    add("--trust-remote-code", action="store_true", help="allow model code from the Hub (off by default)")


def add_data_flags(parser):
    group = parser.add_argument_group("data")
    add = group.add_argument
    add("--dataset", default=DEFAULT_DATASET,
        help="Hub dataset id or local .json/.jsonl/.csv/.parquet file with instruction, context, response "
             "(category optional)")
    add("--eval-file", default=None,
        help="evaluate on every record of this file instead of the held-out test split")
    add("--test-fraction", type=fraction, default=0.1, help="held-out test share of the data")
    add("--max-eval-samples", type=positive_int, default=None, help="deterministic subset of the evaluation set")
    add("--max-length", type=positive_int, default=1024,
        help="tokens per example; longer responses are cut at the end, prompts that leave no room are dropped")
    add("--split-seed", type=int, default=42,
        help="seed of the train/validation/test split and of every subset: fixes the evaluated examples")
    add("--seed", type=int, default=42,
        help="seed of training (initialisation, data order, dropout) and of the bootstrap")


def add_evaluation_flags(parser):
    group = parser.add_argument_group("evaluation")
    add = group.add_argument
    add("--eval-batch-size", type=positive_int, default=8, help="batch size for perplexity evaluation")
    add("--eval-dtype", choices=["auto", *EVAL_DTYPES], default="auto",
        help="the dtype every method's weights are scored in, whatever they trained in (the base model, LoRA's and "
             "QLoRA's adapters on the unquantised base, the fully fine-tuned weights cast to it once saved); auto is "
             "bfloat16 on CUDA, float32 on CPU")
    add("--bootstrap-resamples", type=positive_int, default=1000, help="resamples for the 95%% interval")
    add("--general-file", default="wikitext-2",
        help="plain text scored without a chat template, to measure forgetting (tuned minus base): "
             "'wikitext-2' (raw test split through datasets; needs the Hub), 'python-docs' (Python's own "
             "documentation, offline), a .txt file, or .jsonl rows with a 'text' field; '' skips it")
    add("--max-general-blocks", type=positive_int, default=64,
        help="score at most this many blocks of --max-length tokens of the general text")
    add("--seed-style-metric", action="store_true",
        help="also compute the write-up's flawed perplexity (labels = input ids, padded to 512 with eos, "
             "context dropped) on the same examples, as seed_style_perplexity")


def add_benchmark_flags(parser):
    """lm-evaluation-harness tasks scored on the evaluated model (lvf.benchmarks)."""
    group = parser.add_argument_group("benchmarks (lm-evaluation-harness)")
    add = group.add_argument
    add("--benchmarks", default=None, metavar="TASK[,TASK...]",
        help="lm-eval-harness tasks to score the evaluated model on, in memory (e.g. hellaswag,arc_challenge,"
             "winogrande): accuracy, its 95%% interval over items and each item's correctness; needs lm-eval "
             "(requirements.txt)")
    add("--benchmark-limit", type=positive_int, default=None, metavar="N",
        help="score only each task's first N items (lm-eval's --limit: the same items in every run)")
    add("--benchmark-tasks-dir", default=None, metavar="DIR",
        help="a folder of one's own task YAML files (lm-eval's --include_path), e.g. data/benchmarks")
    add("--benchmark-batch-size", type=positive_int, default=8,
        help="log-likelihood requests per forward pass while scoring the benchmarks")
    add("--benchmark-chat-template", action="store_true",
        help="wrap each prompt in the tokenizer's chat template (lm-eval's --apply_chat_template); by default "
             "lm-eval's plain prompts, so that a figure equals what the lm_eval command gives")


def add_output_flags(parser, method):
    group = parser.add_argument_group("output")
    add = group.add_argument
    add("--config", default=None, metavar="FILE.yaml",
        help="experiment file (experiments/*.yaml): sets the defaults of these flags, names the results folder; "
             "flags given here override it")
    add("--output", default=None,
        help=f"results JSON path (default: results/<experiment>/{method}.json, <experiment> being the --config "
             "file's name or else made from --model and --dataset; with --dry-run, none: the counts are printed)")
    add("--dry-run", action="store_true",
        help="pre-flight: checks the GPU, the packages, the Hub login, disk and memory, prints the dtype, "
             "optimizer and precision the run would use and the parameter counts (model on the meta device); "
             "loads no weights or data; exit status 0 only when nothing blocks the run")
    add("--debug", action="store_true", help="show full tracebacks (or set LVF_DEBUG=1)")


def add_training_flags(parser, method, learning_rate, batch_size, grad_accum):
    """Training flags; the defaults that differ between methods are the script's to give."""
    group = parser.add_argument_group("training")
    add = group.add_argument
    add("--output-dir", default=None,
        help=f"where checkpoints and the saved model go (default: outputs/<experiment>/{method})")
    add("--val-fraction", type=fraction, default=0.05,
        help="validation share of the training part; it alone selects the checkpoint")
    add("--max-train-samples", type=positive_int, default=None, help="deterministic subset of the training split")
    add("--max-val-samples", type=positive_int, default=None,
        help="deterministic subset of the validation slice (checkpoint selection)")
    add("--max-steps", type=step_limit, default=-1, help="stop after this many optimizer steps (-1: run the epochs)")
    add("--num-epochs", type=positive_float, default=1.0, help="training epochs")
    add("--learning-rate", type=positive_float, default=learning_rate, help="peak learning rate")
    add("--batch-size", type=positive_int, default=batch_size, help="per-device training batch size")
    add("--grad-accum", type=positive_int, default=grad_accum, help="gradient accumulation steps")
    add("--eval-steps", type=positive_int, default=None,
        help="validate (and checkpoint) every N optimizer steps (default: about 5 times per run)")
    add("--bf16-autocast", choices=["auto", "on", "off"], default="auto",
        help="bf16 autocast for training: auto turns it on on CUDA, and on CPUs with AMX/AVX512-BF16")
    add("--gradient-checkpointing", choices=["auto", "on", "off"], default="auto",
        help="auto: on with CUDA, off on CPU")
    add("--packing", action="store_true",
        help="padding-free training: each batch is flattened into one row with position ids restarting per "
             "example (on CPU length-grouped batches are faster)")
    add("--report-to", default="none",
        help="the Trainer's live logging (e.g. tensorboard, wandb, when installed; comma-separated); the "
             "results JSON keeps the log history either way")
    add("--resume", action="store_true",
        help="continue from the last checkpoint in --output-dir (after a crash or a signal)")
    return group


# --------------------------------------------------------------------------- frozen settings


def parse(parser, argv=None, sections=()):
    """Parses once into a frozen object: what was asked stays as it was asked. With --config, the file's sections
    (lvf.experiments) set the defaults first, so the command line overrides the file."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config = config_argument(argv)
    if config is not None:
        experiments.apply_defaults(parser, config, sections)
    return freeze(parser.parse_args(argv))


def config_argument(argv):
    """The value of --config in argv, read before the real parse (it decides the other flags' defaults)."""
    finder = argparse.ArgumentParser(add_help=False)
    finder.add_argument("--config", default=None)
    return finder.parse_known_args(argv)[0].config


def freeze(namespace):
    fields = list(vars(namespace))
    settings_class = dataclasses.make_dataclass("Settings", fields, frozen=True)
    return settings_class(**vars(namespace))


def as_dict(settings):
    return dataclasses.asdict(settings)


# --------------------------------------------------------------------------- what the run resolved


@dataclass(frozen=True)
class Runtime:
    """Derived once from the settings and the machine; never written back into the settings."""

    device: str
    dtype: torch.dtype  # the weights' dtype (while training, for a training script)
    experiment: str  # the results folder's name: results/<experiment>/ (lvf.experiments.experiment_name)
    output: Path | None  # results JSON (None: a dry run that only prints)
    output_dir: Path | None = None  # checkpoints and the saved model (training only)
    bf16_autocast: bool = False
    gradient_checkpointing: bool = False
    optimizer: str | None = None
    optimizer_reason: str | None = None  # why this optimizer: the flag that chose it, or what auto found
    # Each weight's optimizer step applied in backward, its gradient freed at once (full_finetune.py; no gradient
    # accumulation, no clipping): lvf.training.OptimizerInBackward.
    optimizer_in_backward: bool = False
    # Global-norm gradient clipping (the Trainer's max_grad_norm; 0: none, as when stepped in backward); None when
    # nothing is trained. With optimizer_in_backward, the update rule the run trains with: its recipe.
    max_grad_norm: float | None = 1.0
    world_size: int = 1
    # The weights' dtype when scoring (--eval-dtype), the same for every method (lvf.precision); None: dtype.
    eval_dtype: torch.dtype | None = None

    def record(self):
        """JSON-ready, with paths relative to the working directory when they are inside it."""
        values = dataclasses.asdict(self)
        values["dtype"] = dtype_name(self.dtype)
        values["eval_dtype"] = dtype_name(self.eval_dtype or self.dtype)
        for key in ("output", "output_dir"):
            values[key] = display_path(values[key])
        return values


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def display_path(path):
    if path is None:
        return None
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def resolve_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def requested_device(settings):
    """--device: auto is resolve_device()'s choice; cuda without a visible GPU is a one-line error."""
    requested = getattr(settings, "device", "auto")
    if requested == "auto":
        return resolve_device()
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible (torch.cuda.is_available() is False; "
                         f"torch {torch.__version__} was built for {cuda_build()}); use --device cpu to run on the CPU")
    return requested


def cuda_build():
    return f"CUDA {torch.version.cuda}" if torch.version.cuda else "the CPU only"


def resolve_dtype(name, device):
    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


EVAL_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def resolve_eval_dtype(name, device):
    """--eval-dtype, one for every method (lvf.precision): auto is bfloat16 on CUDA, as a tuned model is deployed
    and as the base model's bf16 weights are published; float32 on the CPU, where the demo has always scored."""
    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return EVAL_DTYPES[name]


def cpu_has_bf16():
    """AMX or AVX512-BF16: where bf16 matmuls beat fp32 on a CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def use_bf16_autocast(setting, device):
    if setting == "auto":
        return device == "cuda" or cpu_has_bf16()
    return setting == "on"


def use_gradient_checkpointing(setting, device):
    """auto: on with CUDA, unless FSDP checkpoints activations itself (the two cannot be combined)."""
    if setting == "auto":
        return device == "cuda" and os.environ.get("FSDP_ACTIVATION_CHECKPOINTING") != "true"
    return setting == "on"


def experiment_of(settings):
    """The results folder's name for these settings (the --config file's name, else model and data)."""
    return experiments.experiment_name(settings.config, settings.model, settings.dataset)


def results_dir(experiment):
    return PROJECT_DIR / "results" / experiment


def default_output(experiment, method):
    return results_dir(experiment) / f"{method}.json"


def results_path(settings, experiment, method):
    """--output, else results/<experiment>/<method>.json; a dry run writes only where --output says."""
    if settings.output:
        return Path(settings.output)
    return None if settings.dry_run else default_output(experiment, method)


def evaluation_runtime(settings, method, experiment=None):
    """experiment: the results folder's name when not the settings' own (a saved artifact's, from origin.json)."""
    device = requested_device(settings)
    experiment = experiment or experiment_of(settings)
    # Loaded in the dtype every method is scored in; an explicit --dtype that says otherwise is refused.
    eval_dtype = resolve_eval_dtype(settings.eval_dtype, device)
    if settings.dtype != "auto" and resolve_dtype(settings.dtype, device) != eval_dtype:
        raise UsageError(f"--dtype {settings.dtype} and --eval-dtype {settings.eval_dtype} "
                         f"({dtype_name(eval_dtype)} here) disagree: the weights are loaded in the dtype every method "
                         f"is scored in: pass --eval-dtype {settings.dtype}, or leave out --dtype")
    return Runtime(device=device, dtype=eval_dtype, experiment=experiment,
                   output=results_path(settings, experiment, method), max_grad_norm=None, eval_dtype=eval_dtype)


def training_runtime(settings, method, optimizer, optimizer_reason=None, device=None):
    """device: where the run trains when not where these settings resolve it (a plan made for a GPU elsewhere)."""
    device = device or requested_device(settings)
    experiment = experiment_of(settings)
    return Runtime(
        device=device,
        dtype=resolve_dtype(settings.dtype, device),
        experiment=experiment,
        output=results_path(settings, experiment, method),
        output_dir=Path(settings.output_dir or PROJECT_DIR / "outputs" / experiment / method),
        bf16_autocast=use_bf16_autocast(settings.bf16_autocast, device),
        gradient_checkpointing=use_gradient_checkpointing(settings.gradient_checkpointing, device),
        optimizer=optimizer(device) if callable(optimizer) else optimizer,
        optimizer_reason=optimizer_reason,
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        eval_dtype=resolve_eval_dtype(settings.eval_dtype, device),
    )
