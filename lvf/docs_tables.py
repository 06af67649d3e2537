"""The memory-plan tables of docs/, computed from the plan (lvf.plan) for Llama 3 8B's shapes (no GPU, no weights):
docs/performance.md's (one GPU, each method and precision scheme) and docs/multi-gpu.md's (FSDP under
configs/fsdp_full_8b.yaml), each between its block's markers (lvf.docs_blocks).

    python -m lvf.docs_tables --single-gpu-table   # print docs/performance.md's table
    python -m lvf.docs_tables --multi-gpu-table    # print docs/multi-gpu.md's table
    python -m lvf.docs_tables --full-default-table # print docs/performance.md's breakdown of full's default plan
    python -m lvf.docs_tables --write              # rewrite the tables in docs/
"""

import argparse
import dataclasses
import sys

import torch

from lvf import adapters, defaults, docs_blocks, lora, models, plan

EIGHTY_GB = 80 * plan.GB  # what "80 GB" says; such GPUs report a little more (about 79-80 GiB)
MULTI_GPU_BLOCK = "fsdp-plan"  # docs/multi-gpu.md


def llama3_8b_shape():
    return plan.ModelShape.from_model(models.meta_model(models.model_config(models.DEFAULT_MODEL)))


def fsdp_full_8b_setup(gpus, optimizer="adamw_torch"):
    """full_finetune.py's defaults under configs/fsdp_full_8b.yaml: fp32 master weights, batch 4 per GPU in one
    micro-batch, 1,024 tokens, FSDP FULL_SHARD with bf16 mixed precision and activation checkpointing, AdamW
    stepped after backward."""
    return plan.Setup(method="full", weight_dtype=torch.float32, optimizer=optimizer, bf16_autocast=True,
                      gradient_checkpointing=True, micro_batch=4, max_length=1024, grad_accum=1,
                      world_size=gpus, fsdp=True)


def multi_gpu_table(shape=None, gpu_counts=(2, 8), optimizers=("adamw_torch", "adamw_torch_fused")):
    """The markdown table of docs/multi-gpu.md: the per-GPU plan under configs/fsdp_full_8b.yaml, in GiB, each
    part at the moment of the step's peak."""
    shape = shape or llama3_8b_shape()
    keys = ("weights", "gradients", "optimizer_states", "optimizer_temporary", "gathered_weights", "activations")
    lines = ["| GPUs | `--optim` | weights | gradients | optimizer states | optimizer step's temporary "
             "| FSDP gathered weights | activations | per-GPU peak (GiB), at | within 80 GB |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for gpus in gpu_counts:
        for optimizer in optimizers:
            planned = plan.plan_memory(shape, fsdp_full_8b_setup(gpus, optimizer), EIGHTY_GB, "80 GB")
            fits = "yes" if planned["fits"] else "no"
            lines.append(f"| {gpus} | `{optimizer}` | " + " | ".join(plan.gib(planned[key]) for key in keys)
                         + f" | **{plan.gib(planned['total'])}**, {planned['peak_at']} | {fits} |")
    return lines


SINGLE_GPU_BLOCK = "memory-plan"  # docs/performance.md


def llama3_8b_lora_shape():
    """finetune.py's default adapters (lvf.defaults.LORA) on Llama 3 8B, on the meta device."""
    meta = models.meta_model(models.model_config(models.DEFAULT_MODEL))
    adapted = adapters.add_adapters(meta, lora.default_lora_config(), defaults.LORA.lora_targets)
    return plan.ModelShape.from_model(adapted)


def single_gpu_rows():
    """(label, setup) of docs/performance.md's table: the scripts' defaults on CUDA, and the other precision
    schemes full fine-tuning can use."""
    lora = plan.Setup("lora", torch.bfloat16, "adamw_torch", micro_batch=4, grad_accum=1)
    full = plan.Setup("full", torch.float32, "paged_adamw_8bit", micro_batch=4, grad_accum=1, step_in_backward=True)
    after = dataclasses.replace(full, step_in_backward=False)
    return [
        ("LoRA (`finetune.py`): bf16 base, fp32 adapters, AdamW; batch 4", lora),
        ("QLoRA (`--quantize 4bit`): NF4 base; batch 4", dataclasses.replace(lora, method="qlora")),
        ("full (`full_finetune.py`) on one GPU: fp32 master weights, paged 8-bit AdamW stepped in backward; "
         "batch 4", full),
        ("full, `--optim-in-backward off`: stepped after backward, gradients clipped", after),
        ("full, `--optim-in-backward off --batch-size 2 --grad-accum 2`: gradients held across micro-batches",
         dataclasses.replace(after, micro_batch=2, grad_accum=2)),
        ("full, `--dtype bfloat16 --optim-in-backward off`: bf16 weights and gradients",
         dataclasses.replace(after, weight_dtype=torch.bfloat16)),
        ("full, `--optim adamw_torch --optim-in-backward off`: fp32 weights, AdamW",
         dataclasses.replace(after, optimizer="adamw_torch")),
        ("full, `--dtype bfloat16 --optim adamw_torch --optim-in-backward off`",
         dataclasses.replace(after, weight_dtype=torch.bfloat16, optimizer="adamw_torch")),
    ]


def single_gpu_table(full_shape=None, lora_shape=None):
    """The markdown table of docs/performance.md: Llama 3 8B on one GPU, 1,024 tokens, checkpointing and bf16
    autocast on (the CUDA defaults), in GiB, each part at the moment of the step's peak."""
    full_shape = full_shape or llama3_8b_shape()
    lora_shape = lora_shape or llama3_8b_lora_shape()
    keys = ("weights", "gradients", "optimizer_states", "optimizer_temporary", "autocast_copies", "activations")
    lines = ["| run | weights | gradients | optimizer states (paged) | optimizer step's temporary | autocast copies "
             "| activations | peak (GiB), at |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for label, setup in single_gpu_rows():
        planned = plan.plan_memory(full_shape if setup.method == "full" else lora_shape, setup)
        cells = [plan.gib(planned[key]) for key in keys]
        if planned["paged_optimizer_states"]:
            cells[2] += f" ({plan.gib(planned['paged_optimizer_states'])})"
        lines.append(f"| {label} | " + " | ".join(cells)
                     + f" | **{plan.gib(planned['total'])}**, {planned['peak_at']} |")
    return lines


FULL_PLAN_BLOCK = "full-plan"  # docs/performance.md: the breakdown of full fine-tuning's default plan


def full_default_setup():
    """full_finetune.py's default on one CUDA GPU: single_gpu_rows()'s row that steps in backward."""
    return next(setup for _, setup in single_gpu_rows() if setup.method == "full" and setup.step_in_backward)


def full_default_table(full_shape=None):
    """docs/performance.md's breakdown of full fine-tuning's default plan: each part at the peak, with how it is
    counted, then every moment's total."""
    shape = full_shape or llama3_8b_shape()
    planned = plan.plan_memory(shape, full_default_setup())
    gib = plan.gib
    lines = ["| part | how | GiB |", "| --- | --- | ---: |",
             f"| fp32 weights | 4N | {gib(planned['weights'])} |",
             f"| paged 8-bit AdamW states | two 8-bit moments (2 bytes a weight) and two fp32 block constants per 256 "
             f"weights; the embedding's {shape.embedding:,} weights get 32-bit states (8 bytes each), as the Trainer "
             f"gives `nn.Embedding` | {gib(planned['optimizer_states'])} |",
             f"| autocast's bf16 copies of the linear and `lm_head` weights | 2 bytes x {shape.linear:,}, all held at "
             f"the end of the forward pass (the cache is cleared when the forward returns) | "
             f"{gib(planned['autocast_copies'])} |",
             f"| activations | the checkpointed residual stream and the logits (the formula above) | "
             f"{gib(planned['activations'])} |",
             f"| **peak ({planned['peak_at']})** | | **{gib(planned['total'])}** |"]
    lines += [f"| total at another moment ({name}) | | {gib(moment['total'])} |"
              for name, moment in planned["moments"].items() if name != planned["peak_at"]]
    return lines


README_GPU_SIZES_GB = (16, 24, 32, 40, 48, 80, 141)  # the GPU memory sizes cards are sold with, in GB


def smallest_gpu_words(total_bytes):
    """The README's "fits" words for a plan: the smallest of README_GPU_SIZES_GB at least as large (in bytes, as
    the pre-flight compares a plan with the GPU's total memory)."""
    size = next((size for size in README_GPU_SIZES_GB if size * plan.GB >= total_bytes), None)
    if size is None:
        return f"more than one {README_GPU_SIZES_GB[-1]} GB GPU (docs/multi-gpu.md)"
    return f"a{'n' if str(size).startswith('8') else ''} {size} GB GPU or larger"


def readme_needs(full_shape=None, lora_shape=None):
    """{run: (memory plan, fits)} of the README's "What each run needs" table, for Llama 3 8B at the defaults:
    zero-shot scoring holds the bf16 weights and one batch (the batch not planned)."""
    full_shape = full_shape or llama3_8b_shape()
    lora_shape = lora_shape or llama3_8b_lora_shape()
    weights = plan.dtype_bytes(torch.bfloat16) * full_shape.parameters
    needs = {"zero-shot": (f"{plan.gib(weights)} GiB of bf16 weights + one batch", smallest_gpu_words(weights))}
    labels = {"lora": "LoRA", "qlora": "QLoRA (`--quantize 4bit`)"}
    for _, setup in single_gpu_rows():
        if setup.method in labels and labels[setup.method] not in needs:
            planned = plan.plan_memory(lora_shape, setup)
            needs[labels[setup.method]] = (f"{plan.gib(planned['total'])} GiB", smallest_gpu_words(planned["total"]))
    planned = plan.plan_memory(full_shape, full_default_setup())
    needs["full fine-tuning"] = (f"{plan.gib(planned['total'])} GiB", smallest_gpu_words(planned["total"]))
    return needs


DOCS_TABLES = {SINGLE_GPU_BLOCK: ("docs/performance.md", single_gpu_table),
               FULL_PLAN_BLOCK: ("docs/performance.md", full_default_table),
               MULTI_GPU_BLOCK: ("docs/multi-gpu.md", multi_gpu_table)}


def write_tables():
    """Rebuild the memory-plan tables in docs/; the files changed."""
    changed = []
    for name, (file, table) in DOCS_TABLES.items():
        path = docs_blocks.PROJECT_DIR / file
        text = path.read_text(encoding="utf-8")
        updated = docs_blocks.replace_block(text, name, table())
        if updated != text:
            path.write_text(updated, encoding="utf-8")
            changed.append(file)
    return changed


def main(argv=None):
    parser = argparse.ArgumentParser(description="The memory-plan tables of docs/, computed (no GPU, no weights).")
    parser.add_argument("--multi-gpu-table", action="store_true",
                        help="print docs/multi-gpu.md's table: Llama 3 8B under configs/fsdp_full_8b.yaml")
    parser.add_argument("--single-gpu-table", action="store_true",
                        help="print docs/performance.md's table: Llama 3 8B on one GPU, each method and scheme")
    parser.add_argument("--full-default-table", action="store_true",
                        help="print docs/performance.md's breakdown of full fine-tuning's default plan")
    parser.add_argument("--write", action="store_true", help="rewrite the tables in docs/")
    args = parser.parse_args(argv)
    if args.multi_gpu_table:
        print("\n".join(multi_gpu_table()))
    elif args.single_gpu_table:
        print("\n".join(single_gpu_table()))
    elif args.full_default_table:
        print("\n".join(full_default_table()))
    elif args.write:
        print(f"rewrote {', '.join(changed)}" if (changed := write_tables()) else "docs/ tables up to date")
    else:
        parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
