"""The kit's pieces, one module per job: settings (flags and what a run resolves), models, adapters, training
(the Trainer harness), memory (peaks per phase, training's breakdown), results (schema, provenance, atomic
writes), errors (how a script ends)."""

import logging


class _SkipOptionalKernelNotice(logging.Filter):
    """peft and the Trainer import bitsandbytes whenever it is installed, 4-bit or not. On CPUs with
    AVX512-BF16, bitsandbytes 0.50 then logs that it could not fetch an optional Hub kernel (the `kernels`
    package, which it would download from the Hub) for 4-bit matmuls on the CPU. That changes nothing for a run
    and appears on every run, so only that one notice is dropped here (bitsandbytes/backends/cpu/ops.py)."""

    def filter(self, record):
        return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


# Attached before bitsandbytes is first imported: the logger it will use is this same object.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_SkipOptionalKernelNotice())
