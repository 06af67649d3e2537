"""The memory-plan tables of docs/, computed from the plan (lvf.plan) for Llama 3 8B's shapes (no GPU, no weights):
docs/performance.md's (one GPU, each method and precision scheme) and docs/multi-gpu.md's (FSDP under
configs/fsdp_full_8b.yaml), each between its block's markers (lvf.docs_blocks).

    python -m lvf.docs_tables --single-gpu-table   # print docs/performance.md's table
    python -m lvf.docs_tables --multi-gpu-table    # print docs/multi-gpu.md's table
    python -m lvf.docs_tables --write              # rewrite both tables in docs/
"""

import argparse
import dataclasses
import sys

import torch

from lvf import adapters, docs_blocks, models, plan

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
    meta = models.meta_model(models.model_config(models.DEFAULT_MODEL))
    # finetune.py's defaults: r=16, alpha 32, dropout 0.05 on q/k/v/o
    config = adapters.lora_config(16, 32, 0.05, "q_proj,k_proj,v_proj,o_proj")
    return plan.ModelShape.from_model(adapters.add_adapters(meta, config, "q_proj,k_proj,v_proj,o_proj"))


def single_gpu_rows():
    """(label, setup) of docs/performance.md's table: the scripts' defaults on CUDA, and the other precision
    schemes full fine-tuning can use."""
    lora = plan.Setup("lora", torch.bfloat16, "adamw_torch", micro_batch=4, grad_accum=1)
    full = plan.Setup("full", torch.float32, "paged_adamw_8bit", micro_batch=4, grad_accum=1, step_in_backward=True)
    after = dataclasses.replace(full, step_in_backward=False)
    return [
        ("LoRA (`finetune.py`): bf16 base, fp32 adapters, AdamW; batch 4", lora),
        ("QLoRA (`--quantize 4bit`): NF4 base; batch 4", dataclasses.replace(lora, method="qlora")),
        ("full (`full_finetune.py`) on a GPU below 100 GiB: fp32 master weights, paged 8-bit AdamW stepped in "
         "backward; batch 4", full),
        ("full, `--optim-in-backward off` (the default from 100 GiB): stepped after backward", after),
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


DOCS_TABLES = {SINGLE_GPU_BLOCK: ("docs/performance.md", single_gpu_table),
               MULTI_GPU_BLOCK: ("docs/multi-gpu.md", multi_gpu_table)}


def write_tables():
    """Rebuild both memory-plan tables in docs/; the files changed."""
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
    parser.add_argument("--write", action="store_true", help="rewrite both tables in docs/")
    args = parser.parse_args(argv)
    if args.multi_gpu_table:
        print("\n".join(multi_gpu_table()))
    elif args.single_gpu_table:
        print("\n".join(single_gpu_table()))
    elif args.write:
        print(f"rewrote {', '.join(changed)}" if (changed := write_tables()) else "docs/ tables up to date")
    else:
        parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
