"""GPU check: LoRA and full fine-tuning of the Llama-3-8B architecture, random bf16 weights, sequence 2048.

    bash bench/gpu_check.sh                              # one GPU, offline, under 8 minutes
    python bench/gpu_check.py --tiny --output check.json # the same code on the CPU with a tiny config (tests)

Measures tokens/s and torch.cuda.max_memory_allocated with the training path's GPU levers: bf16 weights, SDPA
attention, gradient checkpointing with use_reentrant=False, the kit's LoRA config (r=16 on q/k/v/o) and, for
full fine-tuning, paged 8-bit AdamW when bitsandbytes imports (else torch AdamW, whose states are then bf16
like the weights). Each row is 2,048 random token ids with no padding, the shape packing produces. Weights are
random, so the losses say only that training runs and changes the model, nothing about quality.

Imports torch, transformers and peft only (no datasets, no bitsandbytes required) and never the network.
"""

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROJECT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_DIR))

from lvf import models, results, settings  # noqa: E402

GIB = 1024**3
# Published single-GPU figures to compare with: torchtune, Llama 3.1 8B, batch 2, packed sequences of 2,048.
REFERENCES = [
    {"source": "torchtune", "model": "Llama 3.1 8B", "method": "lora", "gpu": "RTX 4090",
     "tokens_per_second": 3083, "peak_memory_gib": 16.2},
    {"source": "torchtune", "model": "Llama 3.1 8B", "method": "lora", "gpu": "RTX A6000",
     "tokens_per_second": 4699, "peak_memory_gib": 30.3},
    {"source": "torchtune", "model": "Llama 3.1 8B", "method": "full", "gpu": "RTX 4090",
     "tokens_per_second": 1650, "peak_memory_gib": 18.9},
    {"source": "torchtune", "model": "Llama 3.1 8B", "method": "full", "gpu": "RTX A6000",
     "tokens_per_second": 2579, "peak_memory_gib": 37.4},
]
TINY_CONFIG = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                   bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--tiny", action="store_true", help="a tiny Llama on the CPU, for tests: sequence 64, 3 steps")
    add("--methods", default="lora,full", help="comma-separated: lora, full")
    add("--sequence-length", type=settings.positive_int, default=None, help="tokens per row (default 2048)")
    add("--batch-size", type=settings.positive_int, default=2, help="rows per step")
    add("--warmup-steps", type=int, default=None, help="untimed steps first (default 2; tiny 1)")
    add("--steps", type=settings.positive_int, default=None, help="timed steps (default 6; tiny 2)")
    add("--budget-seconds", type=settings.positive_float, default=420,
        help="stop timing more steps once the whole run has taken this long")
    add("--output", default=None, help="JSON path (default: $OUT/gpu_check.json, else bench/results/gpu_check.json)")
    add("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    if set(args.methods) - {"lora", "full"}:
        parser.error("--methods takes lora and/or full")
    defaults = dict(sequence_length=64, warmup_steps=1, steps=2) if args.tiny else dict(
        sequence_length=2048, warmup_steps=2, steps=6)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else PROJECT_DIR / "bench" / "results"
    args.output = Path(args.output or out_dir / "gpu_check.json")
    return args


def log(message):
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def build_model(args, method, device, dtype):
    """Random weights, built directly on the device; LoRA from the kit's own config."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**TINY_CONFIG) if args.tiny else models.model_config(models.DEFAULT_MODEL)
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    if method == "lora":
        from peft import get_peft_model

        import finetune

        model = get_peft_model(model, finetune.lora_config(finetune.parse_args([])))
    # What the Trainer does on CUDA with training.training_arguments' {"use_reentrant": False}.
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def make_optimizer(method, model, device):
    """The optimizer our scripts pick: full on CUDA = paged 8-bit AdamW if bitsandbytes imports, else AdamW."""
    import torch

    import finetune
    import full_finetune

    learning_rate = (finetune if method == "lora" else full_finetune).parse_args([]).learning_rate
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "full" and device == "cuda" and importlib.util.find_spec("bitsandbytes") is not None:
        import bitsandbytes

        return bitsandbytes.optim.PagedAdamW8bit(params, lr=learning_rate), "paged_adamw_8bit", learning_rate
    return torch.optim.AdamW(params, lr=learning_rate, fused=device == "cuda"), "adamw_torch", learning_rate


def probe_parameter(model, method):
    """A trainable tensor to watch: LoRA's B of the first q_proj (starts at zero), or full's first q_proj."""
    for name, param in model.named_parameters():
        if param.requires_grad and "q_proj" in name and (method == "full" or "lora_B" in name):
            return name, param
    raise RuntimeError("no q_proj parameter to probe")


def batch_loss(model, input_ids, autocast):
    import torch

    # bf16 autocast as the Trainer applies it on CUDA (bf16=True): LoRA's fp32 adapters then run in bf16 too.
    with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss


def run_method(args, method, device, dtype, started):
    import torch

    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    log(f"{method}: building the model ({'tiny' if args.tiny else 'Llama-3-8B'} architecture, {dtype})")
    model = build_model(args, method, device, dtype)
    trainable, total = models.count_parameters(model)
    optimizer, optimizer_name, learning_rate = make_optimizer(method, model, device)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(args.seed)
    # One batch, repeated: the timing does not depend on the ids, and a repeated batch shows learning.
    input_ids = torch.randint(0, vocab, (args.batch_size, args.sequence_length), generator=generator).to(device)
    probe_name, probe = probe_parameter(model, method)
    probe_before = probe.detach().float().clone()
    autocast = settings.use_bf16_autocast("auto", device)

    with torch.no_grad():
        loss_before = float(batch_loss(model, input_ids, autocast))
    losses, step_seconds = [], []
    total_steps = args.warmup_steps + args.steps
    for step in range(total_steps):
        if step >= args.warmup_steps and step_seconds and time.perf_counter() - started > args.budget_seconds:
            log(f"{method}: time budget reached after {len(step_seconds)} timed steps")
            break
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = batch_loss(model, input_ids, autocast)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        losses.append(loss.item())
        if step >= args.warmup_steps:
            step_seconds.append(elapsed)
        log(f"{method}: step {step + 1}/{total_steps} loss {losses[-1]:.4f} in {elapsed:.2f} s"
            + ("" if step >= args.warmup_steps else " (warm-up, not timed)"))
    with torch.no_grad():
        loss_after = float(batch_loss(model, input_ids, autocast))
    delta = probe.detach().float() - probe_before
    tokens_per_step = args.batch_size * args.sequence_length
    result = {
        "trainable_params": trainable,
        "total_params": total,
        "optimizer": optimizer_name,
        "learning_rate": learning_rate,
        "gradient_checkpointing": "use_reentrant=False",
        "attention": model.config._attn_implementation,
        "dtype": str(dtype).removeprefix("torch."),
        "bf16_autocast": autocast,
        "tokens_per_step": tokens_per_step,
        "warmup_steps": args.warmup_steps,
        "timed_steps": len(step_seconds),
        "step_seconds": step_seconds,
        "tokens_per_second": tokens_per_step * len(step_seconds) / sum(step_seconds) if step_seconds else None,
        "losses": losses,
        "loss_before": loss_before,
        "loss_after": loss_after,
        "probe_parameter": probe_name,
        "probe_change_norm": float(delta.norm()),
        "probe_changed_fraction": float((delta != 0).float().mean()),
    }
    if cuda:
        result["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
        result["max_memory_allocated_gib"] = result["max_memory_allocated_bytes"] / GIB
        result["max_memory_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
    else:
        result["max_memory_allocated_bytes"] = None  # CPU: no allocator statistics; peak RSS is the process's
        result["peak_rss_bytes"] = results.peak_memory("cpu")[0]
    del model, optimizer, probe, loss
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def write_report(path, report):
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    temporary.write_text(json.dumps(report, indent=2) + "\n")
    temporary.replace(path)


def print_comparison(report):
    print("\n| method | run | tokens/s | peak memory GiB |")
    print("| --- | --- | ---: | ---: |")
    for method, result in report["results"].items():
        this_run = f"this run ({report['device_name']})"
        if "error" in result:
            print(f"| {method} | {this_run} | failed: {result['error'][:80]} | |")
            continue
        tokens, memory = result["tokens_per_second"], result.get("max_memory_allocated_gib")
        print(f"| {method} | {this_run} | {tokens or 0:,.0f} | {'-' if memory is None else f'{memory:.1f}'} |")
        for reference in report["references"]:
            if reference["method"] == method:
                print(f"| {method} | {reference['source']}, {reference['model']}, {reference['gpu']} | "
                      f"{reference['tokens_per_second']:,} | {reference['peak_memory_gib']} |")


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    import torch

    device = "cpu" if args.tiny else settings.resolve_device()
    if device != "cuda" and not args.tiny:
        log("no CUDA device: the 8B check needs a GPU (use --tiny on a CPU)")
        sys.exit(2)
    dtype = settings.resolve_dtype("auto", device)
    report = {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tiny": args.tiny,
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else "CPU",
        "architecture": "tiny Llama" if args.tiny else "Llama-3-8B (models.LLAMA3_8B_CONFIG), random weights",
        "sequence_length": args.sequence_length,
        "batch_size": args.batch_size,
        "versions": {name: version(name) for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes")},
        "cuda": torch.version.cuda,
        "tokens_definition": "tokens per second = batch x sequence length x timed steps / their seconds (every "
                             "token is a target; forward, backward and optimizer step, synchronised)",
        "results": {},
        "references": REFERENCES,
        "references_note": "torchtune's published single-GPU figures (Llama 3.1 8B, batch 2, packed 2,048); "
                           "other GPUs and a different optimizer setup, so a sanity check, not a race",
    }
    log(f"device {report['device_name']}; torch {torch.__version__}; writing {args.output}")
    for method in args.methods:
        try:
            report["results"][method] = run_method(args, method, device, dtype, started)
        except torch.OutOfMemoryError as error:  # report and go on to the next method
            report["results"][method] = {"error": f"out of memory: {str(error).splitlines()[0]}"}
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        write_report(args.output, report)  # after each method, so a later failure keeps earlier figures
    report["total_seconds"] = time.perf_counter() - started
    write_report(args.output, report)
    print_comparison(report)
    print(f"\nwrote {args.output} in {report['total_seconds']:.0f} s")
    failed = [m for m, r in report["results"].items() if "error" in r or not all(map(math.isfinite, r["losses"]))]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
