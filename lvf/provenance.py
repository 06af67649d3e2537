"""What a run ran with, recorded in its results: the installed packages' versions, the project's git commit, and
the machine (CPU, cores, bf16 support, GPU)."""

import importlib.metadata
import os
import re
import subprocess
from pathlib import Path

import torch

PROJECT_DIR = Path(__file__).resolve().parents[1]


PACKAGES = ("torch", "transformers", "peft", "datasets", "accelerate", "bitsandbytes")


def package_versions(names=PACKAGES):
    """Installed version of each package, None where it is absent."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_DIR, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine():
    """What the run ran on, for every figure's caption: the CPU's model name, its logical cores and bf16 support,
    and the GPU (name, memory) when CUDA is used."""
    cpu = None
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
        cpu = names[0].strip() if names else None
        bf16 = sorted({flag for flag in ("amx_bf16", "avx512_bf16") if re.search(rf"\b{flag}\b", cpuinfo)})
    except OSError:
        bf16 = []
    gpu = None
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(torch.cuda.current_device())
        gpu = {"name": properties.name, "memory_bytes": properties.total_memory, "count": torch.cuda.device_count()}
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "cpu_bf16": bf16, "gpu": gpu}
