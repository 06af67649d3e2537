"""The --dry-run pre-flight: what would stop a run, found before any weights or data load.

`preflight(settings, runtime, method, ...)` returns `Finding`s, each "ok", "info" or "problem" with one line of
text; a problem's line names the flag or command that fixes it. `print_findings` shows them, `exit_status` is 0
only when no finding is a problem, and `report_and_exit_code` does all three for a script's dry run.

Nothing here loads weights: packages are looked up with importlib.util.find_spec, the Hub login with
huggingface_hub.get_token(), the Hub cache and free disk on the file system, host memory with psutil, the GPU
through torch.cuda and the driver's own version through libcuda (cuDriverGetVersion, no NVML needed). The
network is asked only for a Hub model that is not cached yet (common.ensure_hub_reachable: repo_info, then
auth_check for a gated one), never with HF_HUB_OFFLINE=1.

A real run checks the same GPU, driver and host memory at its start (`stop_if_blocked`).
"""

import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from huggingface_hub import get_token
from huggingface_hub.constants import is_offline_mode

import common
from lvf import benchmarks, models, precision
from lvf import settings as kit_settings
from lvf.errors import UsageError

BLOCKED_EXIT_STATUS = 4  # the pre-flight found a problem (2 is bad input, 3 results written elsewhere)
TRAINING_METHODS = ("lora", "qlora", "full")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
# Gated repositories whose gating is known offline: Meta's Llama models need an accepted licence and a login.
GATED_PREFIXES = ("meta-llama/",)
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
CHECKPOINTS_AT_ONCE = 3  # save_total_limit=2 plus the best one, which load_best_model_at_end keeps


@dataclass(frozen=True)
class Finding:
    level: str  # "ok", "info" or "problem"
    text: str


@dataclass(frozen=True)
class Write:
    """What a run writes where: `folder` is where it goes (it need not exist yet)."""

    what: str
    folder: Path
    bytes: int


def ok(text):
    return Finding("ok", text)


def info(text):
    return Finding("info", text)


def problem(text):
    return Finding("problem", text)


# --------------------------------------------------------------------------- the checks


def preflight(settings, runtime, method, planned_memory=None, planned_writes_bytes=None, params=None,
              trainable=None, model=None):
    """Every finding for this run, in the order a user fixes them.

    planned_memory: {"total": bytes, "device_total_bytes": bytes or None (the GPU's, read here when None)};
    planned_writes_bytes: a list of `Write`s (planned_writes() makes it from params and trainable when None);
    model: the weights the run loads when they are not settings.model (a saved adapter's base).
    """
    model = model or settings.model
    findings = [*device_findings(settings, runtime, method), *gpu_findings(settings, runtime, method),
                *plan_findings(settings, runtime, method)]
    findings += package_findings(settings, runtime, method, params)
    findings += hub_findings(settings, model)
    findings += data_findings(settings, method)
    results_folder = kit_settings.results_dir(runtime.experiment)  # where earlier runs recorded benchmark time
    findings += [Finding(level, text) for level, text in benchmarks.preflight_lines(settings, results_folder)]
    if planned_writes_bytes is None and params is not None:
        state_bytes = (planned_memory or {}).get("optimizer_states")
        planned_writes_bytes = planned_writes(method, params, trainable, settings, runtime, model, state_bytes)
    findings += disk_findings(planned_writes_bytes)
    findings += memory_findings(runtime, method, planned_memory)
    findings += host_memory_findings(runtime, method, params)
    return findings


def is_training(method):
    return method in TRAINING_METHODS


def device_findings(settings, runtime, method):
    if runtime.device == "cuda":
        index = torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        return [ok(f"CUDA GPU: {torch.cuda.get_device_name(index)}, {total / 2**30:.1f} GiB "
                   f"({torch.cuda.device_count()} visible, CUDA {torch.version.cuda})")]
    if getattr(settings, "device", "auto") == "cpu":
        return [info("device: the CPU (--device cpu)")]
    verb = "train" if is_training(method) else "evaluate"
    return [problem(f"no CUDA GPU: this run would {verb} on the CPU (torch {torch.__version__}, built for "
                    f"{kit_settings.cuda_build()}, sees no GPU): run it where an NVIDIA GPU and torch's CUDA build "
                    "are, or pass --device cpu to run on the CPU knowingly")]


def plan_findings(settings, runtime, method):
    """The dtype, optimizer and precision the run would use, as the runtime resolved them."""
    dtype = f"weights in {kit_settings.dtype_name(runtime.dtype)}{' while training' if is_training(method) else ''}"
    lines = [info(f"dtype: {dtype}, {precision.scored_in(runtime)} (--dtype {settings.dtype}, --eval-dtype "
                  f"{settings.eval_dtype})")]
    if is_training(method):
        lines.append(info(optimizer_line(runtime)))
        quantized = "NF4 4-bit base weights (QLoRA), " if method == "qlora" else ""
        lines.append(info(f"precision: {quantized}bf16 autocast {on_off(runtime.bf16_autocast)}, gradient "
                          f"checkpointing {on_off(runtime.gradient_checkpointing)}"))
    else:
        lines.append(info("precision: scored in the weights' own dtype without autocast, log-softmax in float32"))
    return lines


def optimizer_line(runtime):
    """Which optimizer a training run uses, and why: the pre-flight shows it, and a run prints it as training
    starts, so that a missing package never changes the optimizer silently."""
    return f"optimizer: {runtime.optimizer}. Why: {runtime.optimizer_reason or '--optim'}"


def on_off(flag):
    return "on" if flag else "off"


def installed(package):
    return importlib.util.find_spec(package) is not None


def version(distribution):
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "installed"


def needs_bitsandbytes(optimizer):
    """The Trainer's optimizers that come from bitsandbytes: the 8-bit and paged ones, and the bnb-named."""
    name = optimizer or ""
    return "8bit" in name or name.startswith("paged_") or "bnb" in name


def full_adamw_bytes(params, dtype):
    """Weights, gradients and plain AdamW's two moments, all in the weights' dtype."""
    return 4 * params * torch.empty((), dtype=dtype).element_size()


def package_findings(settings, runtime, method, params=None):
    findings = []
    has_bitsandbytes = installed("bitsandbytes")
    wanted_by = []
    if getattr(settings, "quantize", "none") == "4bit":
        wanted_by.append("--quantize 4bit")
    if is_training(method) and needs_bitsandbytes(runtime.optimizer):
        wanted_by.append(f"--optim {runtime.optimizer}")
    if has_bitsandbytes and wanted_by:
        findings.append(ok(f"bitsandbytes {version('bitsandbytes')} (for {' and '.join(wanted_by)})"))
    elif wanted_by and "--quantize 4bit" in wanted_by:
        findings.append(problem("bitsandbytes missing: --quantize 4bit (QLoRA) needs it: pip install bitsandbytes, "
                                "or leave out --quantize 4bit (LoRA on bf16 weights)"))
    elif wanted_by:
        findings.append(problem(f"bitsandbytes missing: --optim {runtime.optimizer} needs it: pip install "
                                "bitsandbytes, or pass --optim adamw_torch"))
    elif is_training(method) and not has_bitsandbytes and "bitsandbytes" in (runtime.optimizer_reason or ""):
        # --optim auto fell back to plain AdamW for want of bitsandbytes: say so, with what it costs.
        cost = "" if params is None else f" ({full_adamw_bytes(params, runtime.dtype) / 1e9:.1f} GB for this model)"
        findings.append(problem(f"bitsandbytes missing: paged 8-bit AdamW needs it: pip install bitsandbytes, or pass "
                                f"--optim adamw_torch to train with plain AdamW{cost}"))
    if settings.attn_implementation == "flash_attention_2":
        if installed("flash_attn"):
            findings.append(ok(f"flash-attn {version('flash-attn')} (for --attn-implementation flash_attention_2)"))
        else:
            findings.append(problem("flash-attn missing: --attn-implementation flash_attention_2 needs it: pip install "
                                    "flash-attn, or pass --attn-implementation sdpa"))
    scoring = precision.scoring_problem(settings, runtime, method)  # flash-attn in float32, found before training
    if scoring is not None:
        findings.append(problem(scoring))
    readers = [f"--dataset {source}" for source in read_sources(settings, method) if needs_datasets(source)]
    if getattr(settings, "general_file", "") == "wikitext-2":
        readers.append("--general-file wikitext-2")
    if readers and not installed("datasets"):
        findings.append(problem(f"datasets missing: {' and '.join(readers)} is read through it: pip install datasets, "
                                "or pass a .json or .jsonl file (--dataset FILE, --general-file FILE or "
                                "--general-file '')"))
    return findings


def read_sources(settings, method):
    """The data files or Hub ids the run reads (evaluating with --eval-file reads that file alone)."""
    eval_file = getattr(settings, "eval_file", None)
    sources = [settings.dataset] if is_training(method) or not eval_file else []
    return sources + ([eval_file] if eval_file else [])


def needs_datasets(source):
    return is_hub_dataset(source) or Path(source).suffix.lower() in (".csv", ".parquet")


def is_hub_dataset(source):
    return not Path(source).exists() and Path(source).suffix.lower() not in DATA_SUFFIXES and bool(
        HUB_ID.fullmatch(source))


def hub_model_id(name):
    """The Hub id the weights come from, or None when they are local: a folder, or a preset that ships them."""
    preset = models.MODEL_PRESETS.get(name)
    if preset is not None:
        package = preset.get("gguf_package")
        if package and (installed(package) or (models.cache_dir() / name / "config.json").is_file()):
            return None
        return preset["hub_id"]
    if Path(name).exists() or not HUB_ID.fullmatch(name):
        return None
    return name


def hub_findings(settings, model):
    findings = []
    repo_id = hub_model_id(model)
    cached = repo_id is not None and common.in_hub_cache(repo_id, "model")
    if repo_id is None:
        if model not in models.MODEL_PRESETS and not Path(model).exists():
            findings.append(problem(f"model not found: {model} is neither a local folder nor a Hub id: pass --model "
                                    "with a Hub id, a local folder or a preset (" + ", ".join(models.MODEL_PRESETS)
                                    + ")"))
    elif is_offline_mode() and not cached:
        findings.append(problem(f"model {repo_id} is not in the Hub cache and HF_HUB_OFFLINE=1: unset HF_HUB_OFFLINE "
                                "to download it, or pass --model with a local folder"))
    elif cached:
        findings.append(ok(f"model {repo_id}: in the Hub cache ({common.HF_HUB_CACHE})"))
    if repo_id is not None and not (is_offline_mode() and cached):
        token = get_token() is not None
        if repo_id.startswith(GATED_PREFIXES) and not token:
            findings.append(problem(f"no Hub token: {repo_id} is gated: accept its licence on "
                                    f"https://huggingface.co/{repo_id}, then run hf auth login (or set HF_TOKEN)"))
            return findings
        if token:
            findings.append(ok("Hub token: present (hf auth login or HF_TOKEN)"))
        else:
            findings.append(info(f"no Hub token: enough for a public model such as {repo_id}; a gated or private one "
                                 "needs hf auth login"))
    if repo_id is not None:
        findings += hub_access_findings(repo_id, cached)
    return findings


def hub_access_findings(repo_id, cached):
    """Whether the weights can be downloaded with this token, asked of the Hub (common.ensure_hub_reachable:
    repo_info with a short time-out, then auth_check for a gated repository, whose repo_info answers whether or
    not the licence was accepted). Only for weights not cached yet, which the run will download; offline, a note."""
    if is_offline_mode():
        return [info(f"Hub access to {repo_id}: not asked of the Hub (HF_HUB_OFFLINE=1)")]
    if cached:
        return []
    try:
        common.ensure_hub_reachable(repo_id, "model")
    except UsageError as error:
        return [problem(str(error))]
    return [ok(f"Hub access to {repo_id}: it can be downloaded (asked of the Hub)")]


def data_findings(settings, method):
    findings = []
    eval_file = getattr(settings, "eval_file", None)
    for source in read_sources(settings, method):
        flag = "--eval-file" if source == eval_file else "--dataset"
        if is_hub_dataset(source):
            if is_offline_mode() and not common.in_hub_cache(source, "dataset"):
                findings.append(problem(f"{flag} {source} is not in the Hub cache and HF_HUB_OFFLINE=1: unset "
                                        f"HF_HUB_OFFLINE to download it, or pass {flag} FILE.jsonl"))
        elif not Path(source).is_file():
            findings.append(problem(f"{flag} {source}: file not found: pass {flag} with a .json, .jsonl, .csv or "
                                    ".parquet file or a Hub dataset id"))
    general = getattr(settings, "general_file", "")
    if general == "wikitext-2" and is_offline_mode() and not common.in_hub_cache("Salesforce/wikitext", "dataset"):
        findings.append(problem(common.general_text_unavailable(
            general, "dataset Salesforce/wikitext is not in the Hub cache and HF_HUB_OFFLINE=1")))
    elif general and general not in ("wikitext-2", "python-docs") and not Path(general).is_file():
        findings.append(problem(f"--general-file {general}: file not found: pass --general-file FILE, "
                                "--general-file python-docs (offline) or --general-file '' to skip forgetting"))
    return findings


# --------------------------------------------------------------------------- the GPU: driver, kernels, bf16


def driver_cuda_version():
    """(major, minor) of the newest CUDA the installed NVIDIA driver supports, read from the driver itself
    (libcuda's cuDriverGetVersion, which needs neither cuInit nor NVML); None where no driver is installed.
    torch 2.13 has no Python call for it."""
    name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        library = ctypes.CDLL(name)
        version = ctypes.c_int(0)
        if library.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value <= 0:
            return None
    except (OSError, AttributeError):
        return None
    return version.value // 1000, version.value % 1000 // 10


def version_tuple(text):
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


def runs_on(device_cc, arch):
    """Whether torch's kernels built for `arch` (an entry of torch.cuda.get_arch_list(), e.g. sm_80 or
    compute_90) run on a GPU of compute capability device_cc (e.g. 86): machine code (sm_XY) runs on the same major
    version from minor Y up; PTX (compute_XY) is compiled by the driver for any GPU from XY up. Arch-specific
    builds (sm_90a, sm_100f) run on their own capability alone."""
    match = re.fullmatch(r"(sm|compute)_(\d+)([a-z]?)", arch)
    if match is None:
        return False
    kind, code_cc, suffix = match.group(1), int(match.group(2)), match.group(3)
    if suffix:
        return device_cc == code_cc
    if kind == "compute":
        return device_cc >= code_cc
    return device_cc // 10 == code_cc // 10 and device_cc >= code_cc


def torch_cuda_builds(fits):
    """The CUDA versions of this torch release's published builds (torch.cuda.PYTORCH_RELEASES_CODE_CC, torch
    2.13) for this machine's architecture whose compute capabilities satisfy fits(version, capabilities)."""
    table = getattr(torch.cuda, "PYTORCH_RELEASES_CODE_CC", {})
    host = "aarch64" if platform.machine().lower() == "aarch64" else "x86_64"
    return [cuda for cuda, by_host in sorted(table.items(), key=lambda item: version_tuple(item[0]))
            if fits(version_tuple(cuda), by_host.get(host, set()))]


def reinstall_command(cuda):
    """pip's command for this torch release built for CUDA `cuda` (e.g. 12.6)."""
    return (f"pip install torch=={torch.__version__.split('+')[0]} --index-url "
            f"https://download.pytorch.org/whl/cu{cuda.replace('.', '')}")


def needs_bf16(settings, runtime, method):
    """The bf16 the run would use, as the flags that turn it off: autocast and bf16 weights (QLoRA's bf16 compute
    has no flag: gpu_findings says to leave out --quantize 4bit)."""
    flags = []
    if runtime.bf16_autocast and is_training(method):
        flags.append("--bf16-autocast off")
    if runtime.dtype == torch.bfloat16 and is_training(method):  # an evaluation loads in its --eval-dtype
        flags.append("--dtype float32")
    if runtime.eval_dtype == torch.bfloat16:  # every method is scored in it (lvf.precision)
        flags.append("--eval-dtype float32")
    return flags


def gpu_findings(settings, runtime, method):
    """The NVIDIA driver against torch's CUDA build, the GPU's compute capability against the kernels torch was
    built with (torch.cuda.get_arch_list()), and bf16 where the run would use it: each a one-line problem naming
    the fix, before a run that would die at its first kernel. Nothing is said with --device cpu."""
    if getattr(settings, "device", "auto") == "cpu" or torch.version.cuda is None:
        return []
    findings = []
    build = version_tuple(torch.version.cuda)
    driver = driver_cuda_version()
    if driver is not None and driver[0] < build[0]:
        older = torch_cuda_builds(lambda cuda, _: cuda <= driver)
        fix = f", or {reinstall_command(older[-1])}" if older else ""
        findings.append(problem(f"NVIDIA driver: it runs CUDA up to {driver[0]}.{driver[1]}; torch "
                                f"{torch.__version__} is built for CUDA {torch.version.cuda}: install an NVIDIA "
                                f"driver for CUDA {build[0]}.0 or newer{fix}"))
    elif driver is not None and runtime.device == "cuda":
        findings.append(ok(f"NVIDIA driver: runs CUDA up to {driver[0]}.{driver[1]} (torch's build: CUDA "
                           f"{torch.version.cuda})"))
    if runtime.device != "cuda":
        return findings
    index = torch.cuda.current_device()
    name = torch.cuda.get_device_name(index)
    major, minor = torch.cuda.get_device_capability(index)
    device_cc = 10 * major + minor
    arch_list = torch.cuda.get_arch_list()
    if arch_list and not any(runs_on(device_cc, arch) for arch in arch_list):
        builds = torch_cuda_builds(lambda _, ccs: any(runs_on(device_cc, f"sm_{cc}") for cc in ccs))
        fix = reinstall_command(builds[-1]) if builds else "install a torch build for it (https://pytorch.org)"
        findings.append(problem(f"GPU kernels: the {name} is sm_{device_cc}; torch {torch.__version__} (CUDA "
                                f"{torch.version.cuda}) has kernels for {' '.join(arch_list)} only: {fix}, or run "
                                "on a newer GPU"))
    elif arch_list:
        findings.append(ok(f"GPU kernels: torch's CUDA {torch.version.cuda} build runs on the {name} (sm_{device_cc})"))
    flags = needs_bf16(settings, runtime, method)
    if (flags or method == "qlora") and not torch.cuda.is_bf16_supported(including_emulation=False):
        fix = "leave out --quantize 4bit (QLoRA computes in bf16) and " if method == "qlora" else ""
        findings.append(problem(f"bf16: the {name} (sm_{device_cc}) has no native bf16, which this run uses: {fix}"
                                f"pass {' '.join(flags)} (float32 throughout: slower, twice the memory), or run on "
                                "an sm_80 or newer GPU"))
    return findings


# --------------------------------------------------------------------------- host memory


def host_memory_findings(runtime, method, params):
    """RAM to load the weights: from_pretrained reads them onto the CPU in the run's dtype (for full fine-tuning
    fp32 master weights), and only then do they move to the GPU; the 4-bit weights of QLoRA are quantised
    straight onto the GPU. Compared with psutil's available memory."""
    if params is None or (method == "qlora" and runtime.device == "cuda"):
        return []
    needed = params * torch.empty((), dtype=runtime.dtype).element_size()
    available = psutil.virtual_memory().available
    where = "on the CPU before they move to the GPU" if runtime.device == "cuda" else "on the CPU"
    what = (f"loading the weights in {kit_settings.dtype_name(runtime.dtype)} takes about {gigabytes(needed)} of "
            f"RAM ({params:,} parameters, read {where})")
    if needed > available:
        return [problem(f"host memory: {what}; {gigabytes(available)} is available: free memory, or run on a "
                        "machine with more RAM")]
    return [ok(f"host memory: {what}; {gigabytes(available)} is available")]


# --------------------------------------------------------------------------- a real run's start


def stop_if_blocked(settings, runtime, method, model=None):
    """A real run's start, before any data or weights load: the GPU, driver and host memory checks of the dry
    run; raises UsageError with every problem's line. model: the weights loaded when not settings.model."""
    params = None
    if not (method == "qlora" and runtime.device == "cuda"):
        config = models.model_config(model or settings.model, getattr(settings, "trust_remote_code", False))
        params = models.count_parameters(models.meta_model(config))[1]
    found = [finding.text for finding in [*gpu_findings(settings, runtime, method),
                                          *host_memory_findings(runtime, method, params)]
             if finding.level == "problem"]
    if found:
        raise UsageError("; and ".join(found))


# --------------------------------------------------------------------------- disk


def planned_writes(method, params, trainable, settings, runtime, model=None, optimizer_state_bytes=None):
    """What the run writes, by folder. The rule:

    - the model download into the Hub cache when the weights come from the Hub and are not cached yet:
      2 bytes per parameter (bf16 safetensors, as Meta's and most Hub checkpoints are stored);
    - LoRA and QLoRA: per checkpoint the adapters in fp32 (4 bytes per trainable parameter) and AdamW's two fp32
      moments (8), up to CHECKPOINTS_AT_ONCE checkpoints at once, plus the final adapter (4 per trainable);
    - full fine-tuning: per checkpoint the weights in the training dtype and the optimizer's state (the memory
      plan's optimizer_states when given, which counts the 8-bit optimizers' fp32 embedding states and block
      constants; else 2 bytes per parameter for 8-bit optimizers, two moments in the weights' dtype otherwise), up
      to CHECKPOINTS_AT_ONCE at once, plus the final weights;
    - evaluation writes only its results JSON (not counted). Tokenizer, scheduler and RNG files add a few MB
      per checkpoint, not counted either.
    """
    writes = []
    repo_id = hub_model_id(model or settings.model)
    if repo_id is not None and not common.in_hub_cache(repo_id, "model"):
        writes.append(Write(f"the {repo_id} download", Path(common.HF_HUB_CACHE), 2 * params))
    if not is_training(method):
        return writes
    checkpoint, final = checkpoint_and_final_bytes(method, params, trainable, runtime, optimizer_state_bytes)
    writes.append(Write(f"{CHECKPOINTS_AT_ONCE} checkpoints and the final model", Path(runtime.output_dir),
                        CHECKPOINTS_AT_ONCE * checkpoint + final))
    return writes


def checkpoint_and_final_bytes(method, params, trainable, runtime, optimizer_state_bytes=None):
    """(one checkpoint, the final model) of a training run, in bytes, by planned_writes' rule (the study plans
    its stages' disk with it too)."""
    if method in ("lora", "qlora"):
        final = 4 * trainable
        return final + 8 * trainable, final
    weight_bytes = torch.empty((), dtype=runtime.dtype).element_size()
    final = weight_bytes * params
    state = optimizer_state_bytes or (2 * params if "8bit" in (runtime.optimizer or "")
                                      else 2 * weight_bytes * params)
    return final + state, final


def nearest_existing(folder):
    folder = Path(folder).expanduser().resolve()
    while not folder.exists():
        folder = folder.parent
    return folder


FIXES = {"download": "set HF_HOME to a folder on a larger disk", "checkpoints": "pass --output-dir on a larger disk"}


def disk_findings(writes, fixes=None, writer="the run"):
    """Free space of each file system written to, against the sum of what goes there. fixes: {word in a Write's
    `what`: the fix a problem names} (default FIXES, the scripts' flags); writer: who writes (a study's stage)."""
    if writes is None:
        return [info("disk: not estimated (no parameter count)")]
    by_device = {}
    for write in writes:
        if write.bytes <= 0:
            continue
        existing = nearest_existing(write.folder)
        by_device.setdefault(os.stat(existing).st_dev, (existing, []))[1].append(write)
    findings = []
    for existing, group in by_device.values():
        needed = sum(write.bytes for write in group)
        free = shutil.disk_usage(existing).free
        what = " and ".join(f"{write.what} {gigabytes(write.bytes)} in {write.folder}" for write in group)
        if needed > free:
            named = [fix for key, fix in (fixes or FIXES).items() if any(key in write.what for write in group)]
            findings.append(problem(f"disk: {existing} has {gigabytes(free)} free; {writer} writes about "
                                    f"{gigabytes(needed)} there ({what}): free space, or "
                                    f"{' or '.join(named) or 'write elsewhere'}"))
        else:
            findings.append(ok(f"disk: {gigabytes(free)} free at {existing} for about {gigabytes(needed)} ({what})"))
    return findings or [ok("disk: the run writes nothing large")]


def gigabytes(count):
    return f"{count / 1e9:.1f} GB"


# --------------------------------------------------------------------------- memory


MEMORY_FIXES = {"full": "pass --dtype bfloat16 knowingly, or shard it over several GPUs with FSDP (docs/multi-gpu.md)",
                "lora": "pass --quantize 4bit (QLoRA), or lower --batch-size",
                "qlora": "lower --batch-size or --max-length"}


def memory_findings(runtime, method, planned_memory):
    if planned_memory is None:
        return []
    total = planned_memory["total"]
    device_total = planned_memory.get("device_total_bytes")
    if device_total is None and runtime.device == "cuda":
        device_total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    if device_total is None:
        return [info(f"memory: the plan needs about {gigabytes(total)} (no GPU to compare it with)")]
    if total > device_total:
        fix = MEMORY_FIXES.get(method, "pass a smaller --model, or run where a larger GPU is")
        return [problem(f"memory: the plan needs about {gigabytes(total)}, the GPU has {gigabytes(device_total)}: "
                        f"{fix}")]
    return [ok(f"memory: the plan needs about {gigabytes(total)} of the GPU's {gigabytes(device_total)}")]


# --------------------------------------------------------------------------- report


LABELS = {"ok": "ok     ", "info": "info   ", "problem": "PROBLEM"}


def exit_status(findings):
    """0 only when no finding is a problem."""
    return BLOCKED_EXIT_STATUS if any(finding.level == "problem" for finding in findings) else 0


def print_findings(findings, file=None):
    file = file or sys.stdout
    print("pre-flight (no weights or data loaded):", file=file)
    for finding in findings:
        print(f"  {LABELS[finding.level]}  {finding.text}", file=file)
    problems = sum(finding.level == "problem" for finding in findings)
    if problems:
        print(f"pre-flight: {problems} problem{'s block' if problems > 1 else ' blocks'} this run "
              f"(exit status {BLOCKED_EXIT_STATUS})", file=file, flush=True)
    else:
        print("pre-flight: nothing blocks this run", file=file, flush=True)


def report_and_exit_code(settings, runtime, method, params=None, trainable=None, planned_memory=None, model=None,
                         file=None):
    """A script's dry run, after its runtime is resolved and its meta model counted: prints the findings and
    returns the exit status (0, or BLOCKED_EXIT_STATUS when something blocks the run)."""
    findings = preflight(settings, runtime, method, planned_memory=planned_memory, params=params,
                         trainable=trainable, model=model)
    print_findings(findings, file)
    return exit_status(findings)
