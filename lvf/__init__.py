"""The library under the recipes (evaluate_base_model.py, finetune.py, full_finetune.py, study.py, report.py);
common.py, the floor below, holds records, splits, tokenization and perplexity scoring. One module per job:

- a method as its script runs it: base, lora, full (flags, runtime, optimizer policy), defaults (each training
  script's defaults, in one place), dry_run (--dry-run, the same in each script);
- a run: settings (flags, experiment files' values, what a run resolves), experiments (experiment files), cli,
  models, adapters, training (the Trainer harness), precision (how every method is scored: one evaluation dtype),
  scoring (held-out and general-text perplexity), benchmarks (lm-eval-harness tasks on the evaluated model),
  checkpoints, preflight (checks before loading), plan (the memory plan, computed), memory (peaks per phase),
  results (schema, writing), provenance (packages, commit, machine), artifacts, files, errors, writeup (the
  write-up's metric), llama3_tokenizer (Meta's tokenizer from llama-models);
- a study: scheduling (runs in order or on Ray), study_plan (a stage's disk at its peak and its GPU-hours);
- the report: discovery (experiments and their results), groups, statistics (the bootstraps), tables,
  benchmark_tables (benchmark accuracy, paired), plots, findings, docs_blocks (generated README and docs blocks),
  docs_tables (the memory plan's docs tables)."""

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
