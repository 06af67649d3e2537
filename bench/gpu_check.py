"""GPU check: LoRA and full fine-tuning of the Llama-3-8B architecture with random weights, sequence 2048.

    bash bench/gpu_check.sh                              # one GPU, offline, under 8 minutes
    python bench/gpu_check.py --tiny --output check.json # the same code on the CPU with a tiny config (tests)

Trains as the scripts do: finetune.py's and full_finetune.py's own settings (their defaults, with this check's
batch and step count) and runtime (dtype, bf16 autocast, gradient checkpointing, and the optimizer: for full
fine-tuning paged 8-bit AdamW when bitsandbytes imports, else the Trainer's adamw_torch), through the kit's
Trainer pieces (lvf.training: TrainingArguments, collator, MeasuredTrainer), less validation and checkpoints.
Each row is 2,048 random token ids with no padding, the shape packing produces. Weights are random, so the
losses say only that training runs and changes the model, nothing about quality. A method whose memory plan
(lvf.plan, computed on the meta device first) exceeds this GPU is skipped with that reason, not failed: full
fine-tuning's fp32 weights alone exceed a 24 GB card.

Imports torch, transformers, tokenizers, peft and accelerate only (no datasets, no bitsandbytes required), runs
under transformers 5.17 as well as the pinned version, and never uses the network.
"""

import argparse
import dataclasses
import gc
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROJECT_DIR = Path(__file__).resolve().parents[1]

import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from tokenizers.models import WordLevel  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedTokenizerFast,
    TrainerCallback,
)
from transformers.trainer_utils import IntervalStrategy, SaveStrategy  # noqa: E402

from lvf import adapters, full, lora, memory, models, plan, provenance, results, settings, training  # noqa: E402

GIB = 1024**3
METHODS = {"lora": lora, "full": full}  # each method as its script runs it
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
# One epoch of dolly-15k at the defaults, for the time estimate: 12,834 training records (the split of 15,011) of 342
# Llama 3 tokens each on average (chat template, context kept, --max-length 1024; measured on 1,172 real Dolly
# records, 2026-12-03). Input tokens, as this check counts them: every position is computed, scored or not.
DOLLY_EPOCH_RECORDS = 12_834
DOLLY_TOKENS_PER_RECORD = 342


def epoch_hours(tokens_per_second):
    """Hours for one epoch of dolly-15k at this speed: an estimate, since the check trains full 2,048-token rows
    and real batches are shorter (less attention per token, smaller matmuls)."""
    if not tokens_per_second:
        return None
    return DOLLY_EPOCH_RECORDS * DOLLY_TOKENS_PER_RECORD / tokens_per_second / 3600


TINY_CONFIG = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                   bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=settings.description(__doc__),
                                     formatter_class=settings.HelpFormatter)
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


def script_settings(args, method, output_dir):
    """The Settings the training script holds for this run: its own defaults (learning rate, LoRA config, dtype,
    autocast, checkpointing, optimizer) with the check's batch and step count. --eval-steps 1 logs every loss."""
    argv = ["--batch-size", str(args.batch_size), "--grad-accum", "1",
            "--max-steps", str(args.warmup_steps + args.steps), "--eval-steps", "1",
            "--seed", str(args.seed), "--output-dir", str(output_dir)]
    if args.tiny:
        argv += ["--gradient-checkpointing", "on"]  # the CUDA default, exercised on the CPU too
    return METHODS[method].parse_args(argv)


def check_arguments(script_args, runtime, rows):
    """The kit's TrainingArguments for this run, less validation and checkpoints: neither is part of a
    step's cost (the kit's tokens/s leaves them out too), and an 8B checkpoint takes minutes to write."""
    arguments = training.training_arguments(script_args, runtime, rows)
    arguments.eval_strategy = IntervalStrategy.NO
    arguments.save_strategy = SaveStrategy.NO
    arguments.load_best_model_at_end = False
    return arguments


def padding_tokenizer(config):
    """The kit's collator pads through a tokenizer. Every row here has the same length, so nothing is padded:
    a word-level stand-in with the model's bos and eos, pad = eos as the kit sets it, will do (no files)."""
    vocabulary = {"<bos>": config.bos_token_id, "<eos>": config.eos_token_id}
    backend = Tokenizer(WordLevel(vocabulary, unk_token="<eos>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<eos>", unk_token="<eos>")


def random_rows(vocab_size, batch_size, sequence_length, steps, seed):
    """batch_size random rows with labels = input ids, repeated for every step: the timing does not depend
    on the ids, and a repeated batch shows learning. No padding: the shape packing produces."""
    generator = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, vocab_size, (batch_size, sequence_length), generator=generator).tolist()
    return [{"input_ids": ids, "attention_mask": [1] * sequence_length, "labels": ids}
            for _ in range(steps) for ids in batch]


def build_model(args, method, script_args, runtime, device=None):
    """Random weights, built directly on the device (or on `device`: meta, for the plan), with the script's own
    adapters for LoRA."""
    config = LlamaConfig(**TINY_CONFIG) if args.tiny else models.model_config(models.DEFAULT_MODEL)
    training.seed_everything(args.seed)
    with torch.device(device or runtime.device):
        model = AutoModelForCausalLM.from_config(config, dtype=runtime.dtype,
                                                 attn_implementation=script_args.attn_implementation)
    if method == "lora":
        model = lora.add_adapters(model, script_args)
        if runtime.bf16_autocast:  # as finetune.py: adapter inputs left to autocast
            adapters.cast_adapter_inputs(model, enabled=False)
    return model


class StepClock(TrainerCallback):
    """Times each optimizer step (synchronised on CUDA), untimed warm-up first; keeps the peak memory of the
    training steps alone; stops after the time budget once a step has been timed."""

    def __init__(self, warmup_steps, deadline, cuda):
        self.warmup_steps, self.deadline, self.cuda = warmup_steps, deadline, cuda
        self.step_seconds, self.started = [], None

    def synchronize(self):
        if self.cuda:
            torch.cuda.synchronize()

    def on_train_begin(self, args, state, control, **kwargs):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()  # the model is built: from here on, the optimizer and the steps

    def on_step_begin(self, args, state, control, **kwargs):
        self.synchronize()
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.synchronize()
        elapsed = time.perf_counter() - self.started
        timed = state.global_step > self.warmup_steps
        if timed:
            self.step_seconds.append(elapsed)
        log(f"step {state.global_step}/{state.max_steps} in {elapsed:.2f} s" + ("" if timed else " (warm-up)"))
        if self.step_seconds and time.perf_counter() > self.deadline:
            log(f"time budget reached after {len(self.step_seconds)} timed steps")
            control.should_training_stop = True
        return control


def planned_memory(args, method, script_args, runtime, model):
    """The memory plan (lvf.plan, computed) for this check's run: the script's setup with the check's rows of
    sequence_length tokens, no accumulation, every position scored (labels = input ids), as the plan assumes."""
    setup = dataclasses.replace(plan.setup_for_run(script_args, runtime, method), max_length=args.sequence_length,
                                grad_accum=1)
    total_bytes, name = plan.cuda_device() if runtime.device == "cuda" else (None, None)
    return plan.plan_memory(plan.ModelShape.from_model(model), setup, total_bytes, name)


def skip_reason(planned):
    """Why a method is not run on this GPU: its plan (computed on the meta device, before anything is built on the
    GPU) exceeds the GPU's memory. None when it fits, or when there is no GPU to compare with."""
    if planned.get("fits") is not False:
        return None
    return (f"skipped: the plan needs {plan.gib(planned['total'])} GiB, more than this GPU's "
            f"{plan.gib(planned['device_total_bytes'])} GiB ({planned['device_name']})")


def probe_parameter(model, method):
    """A trainable tensor to watch: LoRA's B of the first q_proj (starts at zero), or full's first q_proj."""
    for name, param in model.named_parameters():
        if param.requires_grad and "q_proj" in name and (method == "full" or "lora_B" in name):
            return name, param
    raise RuntimeError("no q_proj parameter to probe")


def batch_loss(model, batch, autocast):
    # bf16 autocast as the Trainer applies it on CUDA (bf16=True): LoRA's fp32 adapters then run in bf16 too.
    input_ids = torch.tensor(batch, device=model.device)
    with torch.no_grad(), torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        return float(model(input_ids=input_ids, labels=input_ids, use_cache=False).loss)


def optimizer_description(trainer):
    """What the Trainer built: its class and the hyperparameters that differ between AdamW setups."""
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    group = optimizer.param_groups[0]
    return {"class": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
            **{key: group[key] for key in ("weight_decay", "betas", "eps", "fused", "foreach") if key in group}}


def run_method(args, method, deadline):
    cuda = not args.tiny
    with tempfile.TemporaryDirectory(prefix="lvf-gpu-check-") as output_dir:
        script_args = script_settings(args, method, output_dir)
        _, runtime = METHODS[method].resolve_runtime(script_args)
        planned = planned_memory(args, method, script_args, runtime,
                                 build_model(args, method, script_args, runtime, device="meta"))
        log(f"{method}: {plan.format_plan(planned)}")
        reason = skip_reason(planned)
        if reason is not None:
            log(f"{method}: {reason}")
            return {"skipped": reason, "planned_memory": planned}
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        log(f"{method}: building the model ({'tiny' if args.tiny else 'Llama-3-8B'} architecture, {runtime.dtype})")
        model = build_model(args, method, script_args, runtime)
        model_memory = torch.cuda.memory_allocated() if cuda else None
        trainable, total = models.count_parameters(model)
        total_steps = args.warmup_steps + args.steps
        rows = random_rows(model.config.vocab_size, args.batch_size, args.sequence_length, total_steps, args.seed)
        arguments = check_arguments(script_args, runtime, len(rows))
        tokenizer = padding_tokenizer(model.config)
        clock = StepClock(args.warmup_steps, deadline, cuda)
        trainer = training.make_trainer_class()(
            model=model, args=arguments, train_dataset=rows, processing_class=tokenizer, callbacks=[clock],
            data_collator=training.model_collator(arguments, model, tokenizer, runtime.device),
            optimizer_in_backward=runtime.optimizer_in_backward)
        probe_name, probe = probe_parameter(model, method)
        probe_before = probe.detach().float().clone()
        first_batch = [row["input_ids"] for row in rows[:args.batch_size]]
        loss_before = batch_loss(model, first_batch, runtime.bf16_autocast)
        trainer.train()
        train_memory = ((torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved(), memory.paged_bytes())
                        if cuda else (None, None, None))
        loss_after = batch_loss(model, first_batch, runtime.bf16_autocast)
        delta = probe.detach().float() - probe_before
        step_seconds = clock.step_seconds
        tokens_per_step = args.batch_size * args.sequence_length
        result = {
            "trainable_params": trainable,
            "total_params": total,
            "optimizer": runtime.optimizer,
            "optimizer_built": optimizer_description(trainer),
            "learning_rate": script_args.learning_rate,
            "gradient_checkpointing": "use_reentrant=False" if model.is_gradient_checkpointing else "off",
            "attention": model.config._attn_implementation,
            "dtype": settings.dtype_name(runtime.dtype),
            "bf16_autocast": runtime.bf16_autocast,
            "logits_to_keep": "mask" if training.accepts_boolean_logits_to_keep(model) else "positions",
            "tokens_per_step": tokens_per_step,
            "warmup_steps": args.warmup_steps,
            "optimizer_steps": trainer.state.global_step,
            "timed_steps": len(step_seconds),
            "step_seconds": step_seconds,
            "tokens_per_second": tokens_per_step * len(step_seconds) / sum(step_seconds) if step_seconds else None,
            "scored_tokens": int(trainer.scored_tokens),
            "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
            "loss_before": loss_before,
            "loss_after": loss_after,
            "probe_parameter": probe_name,
            "probe_change_norm": float(delta.norm()),
            "probe_changed_fraction": float((delta != 0).float().mean()),
        }
        result.update(memory_fields(cuda, model_memory, train_memory))
        result["planned_memory"] = planned
        result["estimated_epoch_hours"] = epoch_hours(result.get("tokens_per_second"))
        measured_peak = result.get("train_peak_memory_bytes")
        result["planned_over_measured"] = planned["total"] / measured_peak if measured_peak else None
        del trainer, model, probe
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        return result


def memory_fields(cuda, model_memory, train_memory):
    """CUDA: the weights (and adapters) once built, and the peaks of the training steps alone (weights,
    optimizer states, activations, gradients): the allocator's (max_memory_allocated_*) and, as lvf records its
    training phase, that plus bitsandbytes' paged optimizer states, which live in CUDA managed memory outside the
    allocator's statistics (counted from the paged tensors). CPU: the process's peak RSS (no allocator
    statistics), which the plan does not describe."""
    if not cuda:
        return {"max_memory_allocated_bytes": None, "peak_rss_bytes": memory.process_peak("cpu")[0]}
    allocated, reserved, paged = train_memory
    return {
        "model_memory_allocated_bytes": model_memory,
        "train_peak_memory_bytes": allocated + paged,  # named as lvf records its training phase
        "train_paged_memory_bytes": paged,
        "train_peak_reserved_bytes": reserved,
        "max_memory_allocated_bytes": allocated,
        "max_memory_allocated_gib": allocated / GIB,
        "max_memory_reserved_gib": reserved / GIB,
        "train_peak_memory_gib": (allocated + paged) / GIB,
    }


def write_report(path, report):
    results.write_atomic(path, json.dumps(report, indent=2) + "\n")


def print_comparison(report):
    print("\n| method | run | tokens/s | peak memory GiB (measured) | planned GiB (computed) | one dolly-15k epoch, "
          "estimated |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for method, result in report["results"].items():
        this_run = f"this run ({report['device_name']})"
        if "error" in result:
            print(f"| {method} | {this_run} | failed: {result['error'][:80]} | | | |")
            continue
        if "skipped" in result:
            print(f"| {method} | {this_run} | {result['skipped']} | | {result['planned_memory']['total'] / GIB:.1f} "
                  "| |")
            continue
        tokens, peak = result["tokens_per_second"], result.get("train_peak_memory_gib")
        planned = result["planned_memory"]["total"] / GIB
        hours = result.get("estimated_epoch_hours")
        print(f"| {method} | {this_run} | {tokens or 0:,.0f} | {'-' if peak is None else f'{peak:.1f}'} "
              f"| {planned:.1f} | {'-' if hours is None else f'{hours:.1f} h'} |")
        for reference in report["references"]:
            if reference["method"] == method:
                print(f"| {method} | {reference['source']}, {reference['model']}, {reference['gpu']} | "
                      f"{reference['tokens_per_second']:,} | {reference['peak_memory_gib']} | | |")


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    device = "cpu" if args.tiny else settings.resolve_device()
    if device != "cuda" and not args.tiny:
        log("no CUDA device: the 8B check needs a GPU (use --tiny on a CPU)")
        sys.exit(2)
    report = {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tiny": args.tiny,
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else "CPU",
        "architecture": "tiny Llama" if args.tiny else "Llama-3-8B (models.LLAMA3_8B_CONFIG), random weights",
        "sequence_length": args.sequence_length,
        "batch_size": args.batch_size,
        "versions": {**provenance.package_versions(), "transformers_imported": transformers.__version__},
        "cuda": torch.version.cuda,
        "tokens_definition": "tokens per second = batch x sequence length x timed steps / their seconds (every "
                             "token is a target; forward, backward and optimizer step, synchronised)",
        "memory_definition": "CUDA, measured: max_memory_allocated_bytes and train_peak_reserved_bytes are "
                             "torch.cuda.max_memory_allocated and max_memory_reserved over the training steps "
                             "alone (reset once the model is built); train_paged_memory_bytes are bitsandbytes' "
                             "paged optimizer states (CUDA managed memory, which the allocator does not count; "
                             "counted from the paged tensors); train_peak_memory_bytes is their sum; "
                             "model_memory_allocated_bytes is what the built model holds. planned_memory is "
                             "computed before training (lvf.plan), not measured: planned_over_measured compares "
                             "its total with train_peak_memory_bytes",
        "results": {},
        "references": REFERENCES,
        "references_note": "torchtune's published single-GPU figures (Llama 3.1 8B, batch 2, packed 2,048); "
                           "other GPUs and a different optimizer setup, so a sanity check, not a race",
    }
    log(f"device {report['device_name']}; torch {torch.__version__}; transformers {transformers.__version__}; "
        f"writing {args.output}")
    for method in args.methods:
        try:
            report["results"][method] = run_method(args, method, started + args.budget_seconds)
        except Exception as error:  # report it and go on to the next method (out of memory, most likely)
            log(f"{method}: failed: {type(error).__name__}: {error}")
            report["results"][method] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        write_report(args.output, report)  # after each method, so a later failure keeps earlier figures
    report["total_seconds"] = time.perf_counter() - started
    write_report(args.output, report)
    print_comparison(report)
    print(f"\nwrote {args.output} in {report['total_seconds']:.0f} s")
    sys.exit(1 if failed_methods(report) else 0)


def failed_methods(report):
    """The methods that failed or trained to a non-finite loss; one skipped for want of memory has not failed."""
    return [method for method, result in report["results"].items() if "skipped" not in result and (
        "error" in result or not all(map(math.isfinite, result["losses"])))]


if __name__ == "__main__":
    main()
