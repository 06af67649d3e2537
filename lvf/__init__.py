"""The library under the recipes (evaluate_base_model.py, finetune.py, full_finetune.py, study.py, report.py);
common.py, the floor below, holds records, splits, tokenization and perplexity scoring. One module per job:

- a run: settings (flags, experiment files' values, what a run resolves), experiments (experiment files), cli,
  models, adapters, training (the Trainer harness), checkpoints, preflight (checks before loading), plan (the memory
  plan, computed), memory (peaks per phase), results (schema, writing), provenance (packages, commit, machine),
  artifacts, files, errors, hub, writeup (the write-up's metric), llama3_tokenizer (Meta's tokenizer from
  llama-models);
- a study: scheduling (runs in order or on Ray);
- the report: discovery (experiments and their results), groups, statistics (the bootstraps), tables, plots,
  findings, docs_blocks (generated README and docs blocks), docs_tables (the memory plan's docs tables)."""

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
