"""Memory per phase (load, training, evaluation) and training's memory counted from its tensors.

A phase's peak is isolated by resetting the peak counter before it: on CUDA the allocator's statistics, on
Linux the process's peak resident set (writing "5" to /proc/self/clear_refs sets VmHWM back to the current
resident set). Where the reset is refused (some sandboxes, other systems) the phase's peak is recorded as
unavailable, with the reason: a whole-process peak is never passed off as one phase's.

Both resets also erase the whole process's peak (getrusage's ru_maxrss follows VmHWM, max_memory_allocated
is the allocator's), so the peak seen before each reset is kept here and process_peak() includes it.

On CUDA, bitsandbytes' paged optimizers keep their states in managed memory (cudaMallocManaged), outside PyTorch's
allocator: max_memory_allocated never sees them. Their bytes are counted from the paged tensors themselves
(bitsandbytes marks each `is_paged` and its page manager holds every one until the process ends) and added to
the CUDA peaks, and recorded apart (phase_paged_bytes).
"""

import ctypes
import os
import re
import resource
import sys
from collections import defaultdict
from pathlib import Path

import torch
from transformers import TrainerCallback

# CUDA's caching allocator is configured by PYTORCH_ALLOC_CONF (torch 2.13's name, read first) or its deprecated
# name PYTORCH_CUDA_ALLOC_CONF (read when the first is unset, with a warning; the only one older torch reads).
ALLOCATOR_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
EXPANDABLE_SEGMENTS = "expandable_segments:True"
CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")
_peak_before_resets = {"cpu": 0, "cuda": 0}


def use_expandable_segments():
    """A script's first step: CUDA's allocator grows segments in place (expandable_segments:True) unless the user
    configured the allocator. A real run's batches vary in length, and with fixed segments the freed blocks of one
    shape fragment the memory the next needs: what the plan leaves free of the GPU is then not all usable. Set
    before anything initialises CUDA (the allocator reads its configuration once, when it starts); both names, so
    torch 2.13 finds it under the one it reads first, without a deprecation warning, and older torch too. Returns
    the configuration the run has (recorded in the results as cuda_allocator_config)."""
    if not any(os.environ.get(name) for name in ALLOCATOR_VARIABLES):
        for name in ALLOCATOR_VARIABLES:
            os.environ[name] = EXPANDABLE_SEGMENTS
    return allocator_config()


def allocator_config():
    """The configuration CUDA's caching allocator reads: the first of ALLOCATOR_VARIABLES that is set, or None."""
    return next((os.environ[name] for name in ALLOCATOR_VARIABLES if os.environ.get(name)), None)


def release_freed_memory():
    """Hands the C heap's free pages back to the system (glibc's malloc_trim). Memory a phase freed in many
    small blocks (activations) otherwise stays in the process's resident set, and the next phase's peak would
    start from it: after training, the evaluation's peak came out above training's own. Elsewhere a no-op."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_cpu_peak():
    """Resets the process's peak resident set; returns None, or why it could not be reset."""
    try:
        CLEAR_REFS.write_text("5")
        return None
    except OSError as error:
        return f"cannot reset the peak resident set ({CLEAR_REFS}: {error.strerror or error})"


def cpu_peak_since_reset():
    """VmHWM: the process's peak resident set since the last reset, in bytes."""
    match = re.search(r"^VmHWM:\s+(\d+) kB", STATUS.read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024


def tensor_bytes(tensor):
    return tensor.numel() * tensor.element_size()


def paged_bytes():
    """Bytes of bitsandbytes' paged tensors alive in this process: CUDA managed memory, which the allocator's
    statistics do not count. Read from bitsandbytes' page manager, which keeps every paged tensor it made (so they
    live until the process ends); 0 when bitsandbytes was never imported (it is not imported here)."""
    functional = sys.modules.get("bitsandbytes.functional")
    manager = getattr(functional, "GlobalPageManager", None)
    if manager is None:
        return 0
    return sum(tensor_bytes(tensor) for tensor in manager.get_instance().paged_tensors)


def process_peak(device):
    """The whole process's peak so far, across the phase resets: (bytes, kind). On CUDA the allocator's peak plus
    the paged (managed) memory alive now."""
    if device == "cuda":
        allocated = max(_peak_before_resets["cuda"], torch.cuda.max_memory_allocated())
        return allocated + paged_bytes(), "cuda_max_allocated"
    current = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return max(_peak_before_resets["cpu"], current), "cpu_peak_rss"


def process_peak_fields(device):
    """peak_memory_bytes and memory_kind: the whole run's peak so far, load, training and evaluation together (the
    phases' peaks are phase_fields')."""
    peak, kind = process_peak(device)
    return {"peak_memory_bytes": peak, "memory_kind": kind}


def remember_process_peak(device):
    if device == "cuda":
        _peak_before_resets["cuda"] = max(_peak_before_resets["cuda"], torch.cuda.max_memory_allocated())
    else:
        _peak_before_resets["cpu"] = process_peak(device)[0]


class PhasePeak:
    """One phase's peak: `with PhasePeak(device) as peak: ...`, then peak.bytes (None when it could not be
    isolated, with peak.unavailable saying why), peak.kind, and on CUDA peak.reserved_bytes and peak.paged_bytes
    (bitsandbytes' paged states alive at the phase's end, included in peak.bytes: the allocator's peak is
    peak.bytes - peak.paged_bytes)."""

    def __init__(self, device):
        self.device = device
        self.bytes = self.reserved_bytes = self.unavailable = self.paged_bytes = None
        self.kind = "cuda_max_allocated" if device == "cuda" else "cpu_peak_rss_since_reset"

    def __enter__(self):
        remember_process_peak(self.device)
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            release_freed_memory()
            self.unavailable = reset_cpu_peak()
        return self

    def __exit__(self, *exc_info):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.paged_bytes = paged_bytes()
            self.bytes = torch.cuda.max_memory_allocated() + self.paged_bytes
            self.reserved_bytes = torch.cuda.max_memory_reserved()
        elif self.unavailable is None:
            self.bytes = cpu_peak_since_reset()
        else:
            self.kind = "unavailable"
        return False


def phase_fields(**peaks):
    """Results fields for measured phases: phases=PhasePeak (or None where a phase was not run) ->
    <phase>_peak_memory_bytes, plus the kind, the reason where unavailable, CUDA's reserved peaks and the paged
    (managed) optimizer memory each CUDA peak includes."""
    measured = {name: peak for name, peak in peaks.items() if peak is not None}
    fields = {f"{name}_peak_memory_bytes": peak.bytes for name, peak in measured.items()}
    kinds = {peak.kind for peak in measured.values()}
    fields["phase_memory_kind"] = kinds.pop() if len(kinds) == 1 else ",".join(sorted(kinds)) or None
    reasons = {peak.unavailable for peak in measured.values()} - {None}
    fields["phase_memory_unavailable"] = "; ".join(sorted(reasons)) or None
    reserved = {name: peak.reserved_bytes for name, peak in measured.items() if peak.reserved_bytes is not None}
    fields["phase_reserved_bytes"] = reserved or None
    paged = {name: peak.paged_bytes for name, peak in measured.items() if peak.paged_bytes}
    fields["phase_paged_bytes"] = paged or None
    return fields


# --------------------------------------------------------------------------- training breakdown


def weights_by_dtype(model):
    """Bytes of the model's parameters (on this rank), by dtype name."""
    totals = defaultdict(int)
    for parameter in model.parameters():
        totals[str(parameter.dtype).removeprefix("torch.")] += tensor_bytes(parameter)
    return dict(totals)


def gradient_bytes(model):
    return sum(tensor_bytes(parameter.grad) for parameter in model.parameters() if parameter.grad is not None)


def optimizer_state_tensors(optimizer):
    """The optimizer's per-element state tensors, each once (bitsandbytes' 8-bit optimizers share their two
    quantisation maps between all parameters). The 0-dimensional step counters (one 4-byte scalar per parameter
    tensor, a few KB in all) are left out: they do not scale with the parameters, and fall into `other`."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    tensors = {}
    for state in inner.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[(value.data_ptr(), value.dtype, value.numel())] = value
    return list(tensors.values())


def optimizer_state_bytes(optimizer):
    """Bytes of the optimizer's per-element state (AdamW: exp_avg and exp_avg_sq; 8-bit optimizers: their
    quantised moments, block scales and maps)."""
    return sum(tensor_bytes(value) for value in optimizer_state_tensors(optimizer))


def paged_optimizer_state_bytes(optimizer):
    """The part of optimizer_state_bytes in bitsandbytes' paged (CUDA managed) memory: the tensors it marks
    `is_paged` (functional.get_paged)."""
    return sum(tensor_bytes(value) for value in optimizer_state_tensors(optimizer) if getattr(value, "is_paged", False))


class TrainingBreakdown(TrainerCallback):
    """Counts, at the first optimizer step, the gradients (just before the step, while they exist) and the
    optimizer's state (just after it, once AdamW has created its moments). Weights are counted then too."""

    def __init__(self):
        self.weights = self.gradients = self.optimizer_states = self.paged_optimizer_states = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.gradients is None and model is not None:
            self.gradients = gradient_bytes(model)
            self.weights = weights_by_dtype(model)
        return control

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self.optimizer_states is None and optimizer is not None:
            self.optimizer_states = optimizer_state_bytes(optimizer)
            self.paged_optimizer_states = paged_optimizer_state_bytes(optimizer)
        return control

    def breakdown(self, train_peak_bytes):
        """{weights_by_dtype, gradients, optimizer_states, paged_optimizer_states, other, other_unavailable};
        other = training peak minus the rest. The peak must include the paged states (PhasePeak's does on CUDA).
        other is None, never negative, where it cannot be measured: no peak (unavailable), or counted parts above
        the peak (the peak missed memory the parts count), with other_unavailable saying why. None altogether
        when no optimizer step was taken."""
        parts = (self.weights, self.gradients, self.optimizer_states)
        if any(part is None for part in parts):
            return None
        counted = sum(self.weights.values()) + self.gradients + self.optimizer_states
        other, why = None, None
        if train_peak_bytes is None:
            why = "the training peak was not measured"
        elif train_peak_bytes < counted:
            why = (f"the counted parts ({counted:,} bytes) exceed the measured training peak ({train_peak_bytes:,}): "
                   "the peak does not see all of the memory they hold")
        else:
            other = train_peak_bytes - counted
        return {
            "weights_by_dtype": self.weights,
            "gradients": self.gradients,
            "optimizer_states": self.optimizer_states,
            "paged_optimizer_states": self.paged_optimizer_states,
            "other": other,
            "other_unavailable": why,
        }
