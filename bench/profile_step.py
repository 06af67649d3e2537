"""Where a training step's time goes, LoRA against full fine-tuning, on the same batches (CPU only).

    python bench/profile_step.py --output bench/results/profile_step.json   # about 8 min on 2 cores
    python bench/profile_step.py --profile baseline,bf16_base_nocast,bf16_base_nocast_dropout0 --output ...
                                        # all three profiled: the committed file (9.4 min, docs/performance.md)
    python bench/profile_step.py --quick --output /tmp/profile-quick.json   # smoke run, tiny random model (< 1 min)
    python bench/profile_step.py --threads 1 ...       # on a busy machine: one thread, and read the CPU-second ratios

Measures, per variant of the LoRA setup (VARIANTS: the kit before commit 61a69c0, finetune.py as it is now, and
that with --lora-dropout 0): the self CPU time of a step per category (forward matmuls, backward matmuls split
into input and weight gradients, attention, lm_head, casts, LoRA's own ops, optimizer, ...) and the top ops, from
torch.profiler; the theoretical matmul FLOPs per step from the shapes (and what they give for Llama-3-8B); the
timed full/LoRA tokens/s ratio; and the peak RSS of each method's training steps alone (in a child process per
method: /proc/self/clear_refs resets VmHWM once the model is loaded, lvf.memory).

Both methods (SmolLM2-135M-Instruct, the `smollm2-135m` preset, by default) are built as finetune.py and
full_finetune.py build them: their own flag parsers and resolve_runtime (dtype, bf16 autocast, optimizer),
models.load_model, finetune.add_adapters, adapters.cast_adapter_inputs, training.training_arguments,
training.model_collator and the kit's Trainer subclass (training.make_trainer_class), with the Trainer's own
optimizer, scheduler and autocast (create_optimizer, accelerate's prepare, create_scheduler). They live in one
process and are stepped alternately, so a busy machine slows both alike: compare the ratios, not the absolute
times. Each step is what Trainer._run_epoch does per optimizer step here (batch x 1, no accumulation): the
batch's item count (get_batch_samples), the kit's Trainer.training_step (forward and backward under the Trainer's
autocast, the scored-token count), the loss and FLOP bookkeeping, gradient clipping, AdamW, the scheduler and
zero_grad. Left out: callbacks, logging, validation and checkpoints (the kit's callbacks do nothing per step
after the first). Both methods train on --batch-size (4) rows per step, so they compare on the same work.

--quick swaps the model for a tiny random one with --model's architecture family and tokenizer (2 layers,
hidden 64), and takes 2 batches of 2 rows of at most 128 tokens, one warm-up step, one profiled cycle, two
timed rounds, and the memory of the first variant only: it checks that everything runs; its figures mean nothing.
"""

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_DIR))

import torch  # noqa: E402

import common  # noqa: E402
import finetune  # noqa: E402
import full_finetune  # noqa: E402
from lvf import adapters, memory, models, results, settings, training  # noqa: E402

METHODS = ("lora", "full")
SCHEDULE_STEPS = 1000  # --max-steps given to both scripts' settings: the cosine schedule (and its warm-up) it sets

# The LoRA setups compared; full fine-tuning is full_finetune.py's own in all of them. lora_flags are finetune.py
# flags; kit_precision False is finetune.resolve_runtime as it was before commit 61a69c0 (the frozen base in the
# auto dtype, fp32 on a CPU, and peft's casts of each adapter's input to fp32), True is finetune.py now (under bf16
# autocast with --dtype auto: the frozen base in bf16, adapter inputs left to autocast).
VARIANTS = {
    "baseline": {"lora_flags": [], "kit_precision": False},
    "bf16_base_nocast": {"lora_flags": [], "kit_precision": True},
    "bf16_base_nocast_dropout0": {"lora_flags": ["--lora-dropout", "0"], "kit_precision": True},
}
QUICK = {"batch_size": 2, "max_length": 128, "batches": 2, "warmup": 1, "profile_cycles": 1, "rounds": 2, "top": 8}
FULL = {"batch_size": 4, "max_length": 512, "batches": 3, "warmup": 2, "profile_cycles": 2, "rounds": 4, "top": 20}
TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=settings.description(__doc__),
                                     formatter_class=settings.HelpFormatter)
    add = parser.add_argument
    add("--quick", action="store_true",
        help="smoke run on a tiny random model: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items())
        + " unless given, memory of the first variant only")
    add("--model", default="smollm2-135m", help="model preset, Hub id or folder (with --quick: its architecture)")
    add("--dataset", default=str(PROJECT_DIR / "data" / "demo.jsonl"))
    add("--batch-size", type=settings.positive_int, default=None, help=f"rows per step (default {FULL['batch_size']})")
    add("--max-length", type=settings.positive_int, default=None,
        help=f"tokens per example (default {FULL['max_length']})")
    add("--batches", type=settings.positive_int, default=None,
        help=f"distinct batches (length quantiles of the training split), cycled (default {FULL['batches']})")
    add("--warmup", type=int, default=None,
        help=f"untimed steps per method before measuring (default {FULL['warmup']})")
    add("--profile-cycles", type=settings.positive_int, default=None,
        help=f"profiled steps per method and batch (default {FULL['profile_cycles']})")
    add("--rounds", type=settings.positive_int, default=None,
        help=f"timed rounds: LoRA and full alternate, a step each per batch (default {FULL['rounds']})")
    add("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    add("--bf16", choices=["auto", "on", "off"], default="auto", help="both scripts' --bf16-autocast")
    add("--profile", default="baseline,bf16_base_nocast", help="comma-separated variants to profile")
    add("--no-profile", action="store_true")
    add("--no-memory", action="store_true")
    add("--top", type=int, default=None, help=f"rows of the top-ops tables (default {FULL['top']})")
    add("--output", default=None, help="JSON with everything printed (default: none)")
    add("--seed", type=int, default=42)
    add("--threads", type=settings.positive_int, default=None, help="torch threads (default: torch's, one per core)")
    add("--memory-worker", choices=METHODS, help=argparse.SUPPRESS)
    add("--variant", default="baseline", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.variants = [v for v in args.variants.split(",") if v]
    args.profile = [v for v in args.profile.split(",") if v]
    unknown = (set(args.variants) | set(args.profile) | {args.variant}) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}")
    return args


# --------------------------------------------------------------------------- the scripts' settings and data


def script_settings(args, variant, method, workdir):
    """(settings, runtime) as finetune.py / full_finetune.py resolve them from their flags."""
    flags = ["--model", args.model, "--dataset", args.dataset, "--max-length", str(args.max_length),
             "--batch-size", str(args.batch_size), "--grad-accum", "1", "--max-steps", str(SCHEDULE_STEPS),
             "--bf16-autocast", args.bf16, "--seed", str(args.seed), "--general-file", "",
             "--output-dir", str(Path(workdir) / f"{variant}-{method}")]
    if method == "full":
        parsed = full_finetune.parse_args(flags)
        _, runtime = full_finetune.resolve_runtime(parsed)
    else:
        parsed = finetune.parse_args(flags + VARIANTS[variant]["lora_flags"])
        if VARIANTS[variant]["kit_precision"]:
            _, runtime = finetune.resolve_runtime(parsed)
        else:  # finetune.resolve_runtime before commit 61a69c0
            runtime = settings.training_runtime(parsed, "lora", optimizer=finetune.OPTIMIZER)
    if runtime.device != "cpu":
        sys.exit("bench/profile_step.py profiles CPU steps only: hide the GPU (CUDA_VISIBLE_DEVICES=)")
    if runtime.gradient_checkpointing:
        sys.exit("bench/profile_step.py does not enable gradient checkpointing as Trainer.train would")
    return parsed, runtime


def load_batches(args, tokenizer, kit_settings):
    """A few real batches (features, before collation) of the scripts' training split: consecutive examples of
    the length-sorted split (as group_by_length forms them), taken at evenly spaced length quantiles."""
    train, _, _ = common.load_splits(kit_settings)
    examples, _ = common.tokenize_records(tokenizer, train, args.max_length)
    if len(examples) < args.batch_size:
        sys.exit(f"{args.dataset}: {len(examples)} training examples fit --max-length {args.max_length}, "
                 f"fewer than --batch-size {args.batch_size}")
    examples.sort(key=lambda example: len(example["input_ids"]))
    batches = []
    for index in range(args.batches):
        quantile = (index + 1) / (args.batches + 1)
        first = min(int(quantile * len(examples)), len(examples) - args.batch_size)
        batches.append(training.to_dataset(examples[first:first + args.batch_size]))
    return batches


def batch_work(batch):
    rows, width = batch["input_ids"].shape
    if "shift_labels" in batch:
        scored = int((batch["shift_labels"] != common.IGNORE_INDEX).sum())
    else:
        scored = int((batch["labels"][..., 1:] != common.IGNORE_INDEX).sum())
    return {"rows": rows, "width": width, "positions": rows * width,
            "input_tokens": int(batch["attention_mask"].sum()), "scored_tokens": scored}


def tiny_model(source, folder, seed):
    """A tiny random model of --model's architecture, with its tokenizer, saved as a model folder (--quick)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = models.model_config(source)
    config.update(TINY)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return str(folder)


# --------------------------------------------------------------------------- models and the step


def build_model(source, tokenizer, kit_settings, runtime, method, kit_precision):
    """The model as finetune.main / full_finetune.main build it (without quantisation)."""
    training.seed_everything(kit_settings.seed)
    model = models.load_model(source, runtime.dtype, runtime.device, kit_settings.trust_remote_code, None,
                              kit_settings.attn_implementation)
    models.pad_with_the_tokenizers_token(model, tokenizer)
    if method == "lora":
        model = finetune.add_adapters(model, kit_settings)
        if kit_precision and runtime.bf16_autocast:
            adapters.cast_adapter_inputs(model, enabled=False)
    return model


def as_built(model, runtime):
    """What the model really is: checked on it, not taken from the variant's name."""
    frozen = {str(p.dtype).removeprefix("torch.") for p in model.parameters() if not p.requires_grad}
    trained = {str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad}
    casts = [m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    config = getattr(model, "peft_config", {}).get("default")
    return {"runtime": runtime.record(), "frozen_dtypes": sorted(frozen), "trained_dtypes": sorted(trained),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "lora_input_cast": any(casts) if casts else None,
            "lora_dropout": config.lora_dropout if config else None,
            "lora_targets": sorted(config.target_modules) if config else None}


class Stepper:
    """One optimizer step as Trainer._run_epoch does it (batch x 1, no accumulation), with the kit's Trainer
    subclass and its arguments, and the Trainer's own optimizer, scheduler and autocast (what
    Trainer._prepare_for_training does outside FSDP and DeepSpeed)."""

    def __init__(self, model, tokenizer, kit_settings, runtime, feature_batches):
        training_args = training.training_arguments(kit_settings, runtime, SCHEDULE_STEPS)
        collator = training.model_collator(training_args, model, tokenizer, runtime.device, kit_settings.packing)
        self.batches = [collator(features) for features in feature_batches]
        features = [row for batch in feature_batches for row in batch]  # as in training.train; never iterated
        trainer = training.make_trainer_class()(model=model, args=training_args, train_dataset=features,
                                                eval_dataset=features, data_collator=collator,
                                                processing_class=tokenizer,
                                                optimizer_in_backward=runtime.optimizer_in_backward)
        trainer.create_optimizer()  # with the step in backward: also its hooks
        self.model, trainer.optimizer = trainer.accelerator.prepare(model, trainer.optimizer)
        trainer.create_scheduler(num_training_steps=training_args.max_steps)
        trainer.model_wrapped = self.model
        trainer.current_gradient_accumulation_steps = 1
        self.trainer, self.tr_loss = trainer, torch.tensor(0.0)
        # Profiler ranges around the real compute_loss and backward (null contexts unless profiling).
        self.scope = contextlib.nullcontext
        trainer.compute_loss = self._scoped("step::forward", trainer.compute_loss)
        trainer.accelerator.backward = self._scoped("step::backward", trainer.accelerator.backward)

    def _scoped(self, name, function):
        def wrapper(*a, **kw):
            with self.scope(name):
                return function(*a, **kw)
        return wrapper

    def step(self, index):
        trainer, model, scope = self.trainer, self.model, self.scope
        with scope("step::trainer_bookkeeping"):
            samples, num_items = trainer.get_batch_samples(iter([dict(self.batches[index])]), 1, trainer.args.device)
            inputs = samples[0]
        with scope("step::training_step"):
            loss = trainer.training_step(model, inputs, num_items)
        with scope("step::trainer_bookkeeping"):
            if not (torch.isnan(loss) or torch.isinf(loss)):  # logging_nan_inf_filter
                self.tr_loss += loss
            trainer.current_flos += float(trainer.floating_point_ops(inputs))
        with scope("step::clip_grad_norm"):
            if trainer.args.max_grad_norm > 0:
                trainer._clip_grad_norm(model)
        with scope("step::optimizer"):
            trainer.optimizer.step()
        with scope("step::scheduler"):
            trainer.lr_scheduler.step()
        with scope("step::zero_grad"):
            model.zero_grad()
        trainer.state.global_step += 1
        return loss


# --------------------------------------------------------------------------- profiling


# A module's category by its class name's ending, for the modules not named above.
CLASS_CATEGORIES = (("RMSNorm", "norm"), ("Attention", "attention_core"), ("MLP", "mlp_act"),
                    ("DecoderLayer", "residual"), ("RotaryEmbedding", "rope"), ("ForCausalLM", "loss_and_head_glue"))


def module_category(name, module):
    """The category of the ops a module runs itself (innermost module wins)."""
    kind = type(module).__name__
    if "lora_" in name.replace("base_layer", ""):
        return "lora"
    if kind == "Linear" and type(module).__module__.startswith("peft"):
        return "lora"  # the wrapper's own ops: the cast of x, the scaling and the add
    leaf = name.replace(".base_layer", "").rsplit(".", 1)[-1]
    if leaf in ("q_proj", "k_proj", "v_proj", "o_proj"):
        return "attn_proj"
    if leaf in ("gate_proj", "up_proj", "down_proj"):
        return "mlp_proj"
    if leaf == "lm_head":
        return "lm_head"
    if leaf == "embed_tokens":
        return "embedding"
    return next((category for suffix, category in CLASS_CATEGORIES if kind.endswith(suffix)), None)


def tag_modules(model):
    """Forward hooks that open a profiler range per module, so every forward op has a module category."""
    from torch.autograd.profiler import record_function

    handles = []
    for name, module in model.named_modules():
        category = module_category(name, module)
        if category is None:
            continue

        def enter(mod, _args, category=category):
            scope = record_function(f"mod::{category}")
            scope.__enter__()
            mod.__dict__.setdefault("_profile_scopes", []).append(scope)

        def leave(mod, _args, _output):
            mod.__dict__["_profile_scopes"].pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    return handles


MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int8pack_mm"}
CASTS = {"aten::copy_", "aten::_to_copy", "aten::to", "aten::clone"}
ATTENTION_OPS = ("scaled_dot_product", "flash_attention")
PHASE_KEYS = {"training_step": "training_step: rest (input prep, scored-token count, loss scaling)"}


def categorize(events, works, vocab_size, lora_rank):
    """Self CPU time (ms) per category, from the profiler's events.

    Phase comes from the step's own ranges (the innermost); the module of a forward op from the hooks' ranges; a
    backward op inherits the module of the forward op with its sequence number. Backward 2-D matmuls are split
    by their contracting dimension: the batch's positions (or scored positions, for lm_head) mean a weight
    gradient, anything else an input gradient."""
    seq_category = {}

    def ancestors(event):
        parent = event.cpu_parent
        while parent is not None:
            yield parent
            parent = parent.cpu_parent

    def phase_and_module(event):
        phase = module = autograd_node = None
        for parent in ancestors(event):
            name = parent.name
            if module is None and name.startswith("mod::"):
                module = name[5:]
            if autograd_node is None and name.startswith("autograd::engine::evaluate_function"):
                autograd_node = parent
            if name.startswith("step::"):
                phase = name[6:]
                break
        return phase, module, autograd_node

    # First pass: the module of each forward op that records a sequence number.
    info = {}
    for event in events:
        phase, module, node = phase_and_module(event)
        info[id(event)] = (phase, module, node)
        if phase == "forward" and module and getattr(event, "sequence_nr", -1) >= 0:
            seq_category.setdefault(event.sequence_nr, module)

    totals = defaultdict(float)
    positions = {work["positions"] for work in works}
    scored = {work["scored_tokens"] for work in works}
    for event in events:
        if event.name.startswith(("step::", "mod::")):
            continue
        self_ms = event.self_cpu_time_total / 1000.0
        if self_ms <= 0:
            continue
        phase, module, node = info[id(event)]
        if phase is None:
            continue
        if phase == "forward":
            module = module or "other"
            if event.name in CASTS:
                key = "fwd: casts/copies (autocast, dtype)"
            elif any(op in event.name for op in ATTENTION_OPS):
                key = "fwd: attention (sdpa)"
            elif event.name in MATMULS and module in ("attn_proj", "mlp_proj"):
                key = "fwd: matmul q/k/v/o/mlp"
            elif module in ("lm_head", "embedding"):
                key = f"fwd: {module}"
            elif module == "lora":
                key = "fwd: LoRA own ops (dropout, A/B, scale, add)"
            else:
                key = f"fwd: {module} (non-matmul)"
        elif phase == "backward":
            origin = seq_category.get(node.sequence_nr) if node is not None else None
            origin = origin or "other"
            if any(op in event.name for op in ATTENTION_OPS) or (node is not None and "Attention" in node.name):
                key = "bwd: attention (sdpa)"
            elif event.name in MATMULS and len(event.input_shapes) >= 2 and len(event.input_shapes[0]) == 2:
                a, b = event.input_shapes[0], event.input_shapes[1]
                contracting = a[1]
                if origin == "lora" or lora_rank in (a + b):
                    key = "bwd: LoRA matmuls (A/B grads)"
                elif origin == "lm_head" or vocab_size in (a + b):
                    weight_grad = contracting in scored and b[0] == contracting
                    key = "bwd: lm_head " + ("weight grad" if weight_grad else "input grad")
                else:
                    weight_grad = contracting in positions and b[0] == contracting
                    key = "bwd: matmul " + ("weight grads" if weight_grad else "input grads")
            elif event.name in CASTS:
                key = "bwd: casts/copies/grad accumulation"
            elif origin == "lora":
                key = "bwd: LoRA own ops (dropout, scale, add)"
            elif origin == "embedding" or "Embedding" in (node.name if node else ""):
                key = "bwd: embedding grad"
            else:
                key = f"bwd: {origin} (non-matmul)"
        else:
            key = PHASE_KEYS.get(phase, phase)
        totals[key] += self_ms
    return dict(totals)


def profile_steps(steppers, models_by_method, works, cycles, vocab_size, lora_rank):
    """Profiles every batch `cycles` times per method, LoRA and full alternating, one profiler per step.
    Returns per method the category times of a mean step, each category (per batch) at its minimum over the
    cycles, which discards most of the time other processes take; the profiler of the fastest cycle of the
    first batch; and the mean count of top-level aten ops per step."""
    from torch.profiler import ProfilerActivity, profile, record_function

    handles = [handle for model in models_by_method.values() for handle in tag_modules(model)]
    best = {method: defaultdict(lambda: defaultdict(lambda: float("inf"))) for method in METHODS}
    fastest = {method: (float("inf"), None) for method in METHODS}
    counts = {method: [] for method in METHODS}
    for stepper in steppers.values():
        stepper.scope = record_function
    try:
        for cycle in range(cycles):
            for index in range(len(works)):
                order = METHODS if (cycle + index) % 2 == 0 else METHODS[::-1]
                for method in order:
                    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                        steppers[method].step(index)
                    events = prof.events()
                    totals = categorize(events, [works[index]], vocab_size, lora_rank)
                    for key, value in totals.items():
                        best[method][index][key] = min(best[method][index][key], value)
                    total = sum(totals.values())
                    if index == 0 and total < fastest[method][0]:
                        fastest[method] = (total, prof)
                    counts[method].append(sum(1 for e in events if e.name.startswith("aten::") and
                                              (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))))
    finally:
        for stepper in steppers.values():
            stepper.scope = contextlib.nullcontext
        for handle in handles:
            handle.remove()
    breakdowns = {}
    for method in METHODS:
        merged = defaultdict(float)
        for per_batch in best[method].values():
            for key, value in per_batch.items():
                merged[key] += value / len(works)
        breakdowns[method] = dict(merged)
    ops = {method: statistics.mean(counts[method]) for method in METHODS}
    return breakdowns, {method: fastest[method][1] for method in METHODS}, ops


# --------------------------------------------------------------------------- theory


def linear_shapes(config):
    h, inter = config.hidden_size, config.intermediate_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    return {"q_proj": (h, heads * head_dim), "k_proj": (h, kv * head_dim), "v_proj": (h, kv * head_dim),
            "o_proj": (heads * head_dim, h), "gate_proj": (h, inter), "up_proj": (h, inter),
            "down_proj": (inter, h)}, head_dim


def adapter_params(config, lora_targets, rank):
    shapes, _ = linear_shapes(config)
    targets = [name for name in lora_targets.split(",") if name]
    return config.num_hidden_layers * sum(rank * (shapes[name][0] + shapes[name][1]) for name in targets)


def theoretical_flops(config, work, method, lora_targets, rank, recompute=False):
    """Matmul FLOPs of one step from the shapes (multiply-add = 2). Padding positions are computed too, so the
    linear layers count every position of the padded batch; the vocabulary projection only scored ones."""
    shapes, head_dim = linear_shapes(config)
    h, layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    vocab = config.vocab_size
    linear_params = layers * sum(i * o for i, o in shapes.values())
    t, s, rows, width = work["positions"], work["scored_tokens"], work["rows"], work["width"]
    fwd_linear = 2 * t * linear_params
    # SDPA with a padding mask: QK^T and PV over the whole width (no causal skipping with an explicit mask).
    fwd_attention = layers * rows * heads * 4 * width * width * head_dim
    fwd_head = 2 * s * h * vocab
    out = {"forward: linear layers": fwd_linear, "forward: attention": fwd_attention, "forward: lm_head": fwd_head}
    out["backward: linear input grads"] = fwd_linear
    out["backward: attention"] = 2.5 * fwd_attention  # flash backward recomputes QK^T: 5 matmuls for 2
    out["backward: lm_head input grad"] = fwd_head
    if recompute:  # gradient checkpointing: every decoder layer's forward runs again in backward
        out["recompute: linear layers + attention"] = fwd_linear + fwd_attention
    if method == "full":
        out["backward: linear weight grads"] = fwd_linear
        out["backward: lm_head weight grad"] = fwd_head
    else:
        adapter = adapter_params(config, lora_targets, rank)
        out["forward: LoRA A/B"] = 2 * t * adapter * (2 if recompute else 1)
        out["backward: LoRA A/B (input + weight grads)"] = 4 * t * adapter
    out["total"] = sum(out.values())
    params = linear_params + vocab * h * (1 if config.tie_word_embeddings else 2)
    out["optimizer: parameters updated"] = params if method == "full" else None
    return out


def llama8b_ratios(lora_targets, rank):
    """What the same accounting gives for Llama-3-8B (untied, vocab 128256), the default adapters, one sequence
    of 1,024 or 2,048 tokens, 40% or all of them scored; without and with gradient checkpointing (on by default
    on CUDA). Matmul FLOPs only: the optimizer step and elementwise work come on top."""
    config = models.model_config(models.DEFAULT_MODEL)
    rows = []
    for width in (1024, 2048):
        for scored_share in (0.4, 1.0):
            work = {"rows": 1, "width": width, "positions": width, "scored_tokens": int(scored_share * width)}
            row = {"width": width, "scored_share": scored_share}
            for recompute in (False, True):
                full = theoretical_flops(config, work, "full", "", rank, recompute=recompute)
                lora = theoretical_flops(config, work, "lora", lora_targets, rank, recompute=recompute)
                key = "with_checkpointing" if recompute else "without_checkpointing"
                row[key] = full["total"] / lora["total"]
                row[f"full_tflop_{key}"] = full["total"] / 1e12
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- memory (child process per method)


def current_rss():
    text = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith("VmRSS:"))) * 1024


def memory_worker(args):
    source = models.check_model_source(args.model)
    method, variant = args.memory_worker, args.variant
    with tempfile.TemporaryDirectory() as workdir:
        kit_settings, runtime = script_settings(args, variant, method, workdir)
        tokenizer = models.load_tokenizer(source, kit_settings.chat_template, kit_settings.trust_remote_code)
        feature_batches = load_batches(args, tokenizer, kit_settings)
        model = build_model(source, tokenizer, kit_settings, runtime, method, VARIANTS[variant]["kit_precision"])
        stepper = Stepper(model, tokenizer, kit_settings, runtime, feature_batches)
        loaded = memory.cpu_peak_since_reset()  # the whole process so far: imports, data, model, Trainer
        memory.release_freed_memory()  # as lvf.memory.PhasePeak does before each phase
        unavailable = memory.reset_cpu_peak()
        start = current_rss()
        for index in range(max(args.warmup, 1) + len(feature_batches)):
            stepper.step(index % len(feature_batches))
        peak = None if unavailable else memory.cpu_peak_since_reset()
    print(json.dumps({"method": method, "variant": variant, "load_peak_bytes": loaded,
                      "rss_before_training_bytes": start, "training_peak_bytes": peak,
                      "training_peak_over_loaded_bytes": None if peak is None else peak - start,
                      "unavailable": unavailable}))


def measure_memory(args, variant):
    measured = {}
    for method in METHODS:
        command = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", method, "--variant", variant,
                   "--model", args.model, "--dataset", args.dataset, "--batch-size", str(args.batch_size),
                   "--max-length", str(args.max_length), "--batches", str(args.batches), "--bf16", args.bf16,
                   "--warmup", str(args.warmup), "--seed", str(args.seed)]
        command += ["--threads", str(args.threads)] if args.threads else []
        out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if out.returncode != 0:
            raise RuntimeError(f"memory worker {method}/{variant} failed:\n{out.stderr[-2000:]}")
        measured[method] = json.loads(out.stdout.strip().splitlines()[-1])
    return measured


# --------------------------------------------------------------------------- timing


def time_variant(args, variant, source, tokenizer, feature_batches, workdir, profile=False):
    """Builds both methods, then warm-up, optional profiling, and `rounds` timed rounds. Within a round every
    batch is stepped by LoRA and by full fine-tuning back to back (who goes first alternates), so load from other
    processes hits both. Ratios: the median of the rounds' full/LoRA time ratios, and the ratio of the summed
    per-step minima (each step at its fastest over the rounds). CPU seconds beside wall seconds: with one thread
    they leave out most of the time this process waits for a core."""
    built, steppers, setups = {}, {}, {}
    for method in METHODS:
        kit_settings, runtime = script_settings(args, variant, method, workdir)
        built[method] = build_model(source, tokenizer, kit_settings, runtime, method,
                                    VARIANTS[variant]["kit_precision"])
        setups[method] = as_built(built[method], runtime)
        steppers[method] = Stepper(built[method], tokenizer, kit_settings, runtime, feature_batches)
    works = [batch_work(batch) for batch in steppers["full"].batches]
    for method in METHODS:
        for index in range(args.warmup):
            steppers[method].step(index % len(works))
    profiled = None
    if profile:
        profiled = profile_steps(steppers, built, works, args.profile_cycles, built["full"].config.vocab_size,
                                 finetune.DEFAULTS["lora_r"])
    count = len(works)
    steps = {m: {clock: [[None] * args.rounds for _ in range(count)] for clock in ("wall", "cpu")} for m in METHODS}
    for round_index in range(args.rounds):
        for index in range(count):
            order = METHODS if (round_index + index) % 2 == 0 else METHODS[::-1]
            for method in order:
                start, start_cpu = time.perf_counter(), time.process_time()
                steppers[method].step(index)
                steps[method]["wall"][index][round_index] = time.perf_counter() - start
                steps[method]["cpu"][index][round_index] = time.process_time() - start_cpu
        line = []
        for clock in ("wall", "cpu"):
            lora = sum(steps["lora"][clock][i][round_index] for i in range(count))
            full = sum(steps["full"][clock][i][round_index] for i in range(count))
            line.append(f"{clock} LoRA {lora:.2f} s, full {full:.2f} s, ratio {full / lora:.3f}")
        print(f"  [{variant}] round {round_index + 1}: " + "; ".join(line), flush=True)
    scored = sum(work["scored_tokens"] for work in works)
    lora_setup = setups["lora"]
    result = {"variant": variant,
              "settings": {"lora_flags": VARIANTS[variant]["lora_flags"],
                           "kit_precision": VARIANTS[variant]["kit_precision"],
                           "lora_dropout": lora_setup["lora_dropout"], "lora_targets": lora_setup["lora_targets"],
                           "lora_base_dtype": ",".join(lora_setup["frozen_dtypes"]),
                           "lora_input_cast": lora_setup["lora_input_cast"],
                           "bf16": lora_setup["runtime"]["bf16_autocast"],
                           "max_grad_norm": steppers["lora"].trainer.args.max_grad_norm,
                           "optim": {m: setups[m]["runtime"]["optimizer"] for m in METHODS}},
              "as_built": setups, "threads": torch.get_num_threads(), "step_seconds": steps}
    for clock in ("wall", "cpu"):
        rounds = {m: [sum(steps[m][clock][i][r] for i in range(count)) for r in range(args.rounds)] for m in METHODS}
        minima = {m: sum(min(per_batch) for per_batch in steps[m][clock]) for m in METHODS}
        ratios = [f / lo for f, lo in zip(rounds["full"], rounds["lora"], strict=True)]
        result[clock] = {
            "round_ratios": ratios,
            "median_ratio": statistics.median(ratios),
            "min_ratio": minima["full"] / minima["lora"],
            "scored_tokens_per_second_at_min": {m: scored / minima[m] for m in METHODS},
        }
    return result, profiled, works


# --------------------------------------------------------------------------- report


def print_breakdown(breakdowns):
    keys = sorted(set(breakdowns["lora"]) | set(breakdowns["full"]),
                  key=lambda k: -(breakdowns["full"].get(k, 0) + breakdowns["lora"].get(k, 0)))
    print("\nSelf CPU time of a mean step (ms; per batch, each category at its minimum over the profiled cycles; "
          "the profiler and module hooks add overhead):")
    print("| category | LoRA | full | full - LoRA |\n| --- | ---: | ---: | ---: |")
    for key in keys:
        lora, full = breakdowns["lora"].get(key, 0), breakdowns["full"].get(key, 0)
        print(f"| {key} | {lora:.1f} | {full:.1f} | {full - lora:+.1f} |")
    lora_total, full_total = sum(breakdowns["lora"].values()), sum(breakdowns["full"].values())
    print(f"| **total** | {lora_total:.1f} | {full_total:.1f} | {full_total - lora_total:+.1f} |")
    print(f"profiled full/LoRA time ratio: {full_total / lora_total:.3f}")


def machine_info(args):
    text = Path("/proc/cpuinfo").read_text()
    cpu = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
               platform.processor())
    return {"cpu": cpu, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "amx_bf16": "amx_bf16" in text, "avx512_bf16": "avx512_bf16" in text,
            "bf16_autocast_baseline": settings.use_bf16_autocast(args.bf16, "cpu"), "load_average": os.getloadavg()}


def print_theory(config, works, report):
    targets, rank = finetune.DEFAULTS["lora_targets"], finetune.DEFAULTS["lora_r"]
    theory = {m: defaultdict(float) for m in METHODS}
    for work in works:
        for method in METHODS:
            for key, value in theoretical_flops(config, work, method, targets, rank).items():
                if value is not None:
                    theory[method][key] += value / len(works)
    print("\nTheoretical matmul GFLOP per step (mean over the batches):")
    print("| part | LoRA | full |\n| --- | ---: | ---: |")
    for key in sorted(set(theory["lora"]) | set(theory["full"])):
        if not key.startswith("optimizer"):
            print(f"| {key} | {theory['lora'].get(key, 0) / 1e9:.3f} | {theory['full'].get(key, 0) / 1e9:.3f} |")
    print(f"full/LoRA FLOP ratio: {theory['full']['total'] / theory['lora']['total']:.3f}; full also updates "
          f"{theory['full']['optimizer: parameters updated']:,.0f} parameters with AdamW, LoRA "
          f"{adapter_params(config, targets, rank):,}")
    report["theory_gflop"] = {m: {k: v / 1e9 for k, v in theory[m].items()} for m in METHODS}
    report["llama3_8b_flop_ratios"] = llama8b_ratios(targets, rank)
    print(f"Llama-3-8B full/LoRA matmul FLOP ratio (r={rank} on {targets}), without / with gradient checkpointing: "
          + ", ".join(f"{row['width']} tokens, {row['scored_share']:.0%} scored: {row['without_checkpointing']:.3f} / "
                      f"{row['with_checkpointing']:.3f}" for row in report["llama3_8b_flop_ratios"]))


def write_report(report, output):
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(report, indent=2, default=str) + "\n")


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        return memory_worker(args)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lvf-profile-") as workdir:
        source = models.check_model_source(args.model)
        model_name = args.model
        if args.quick:
            args.model = source = tiny_model(source, Path(workdir) / "tiny-model", args.seed)
        kit_settings, _ = script_settings(args, args.variants[0], "full", workdir)
        tokenizer = models.load_tokenizer(source, kit_settings.chat_template, kit_settings.trust_remote_code)
        feature_batches = load_batches(args, tokenizer, kit_settings)
        report = {"machine": machine_info(args), "quick": args.quick,
                  "model": model_name + (" (--quick: tiny random model of its architecture)" if args.quick else ""),
                  "options": {key: getattr(args, key) for key in ("dataset", "batch_size", "max_length", "batches",
                                                                  "warmup", "profile_cycles", "rounds", "bf16",
                                                                  "seed", "threads")},
                  "batches": None, "versions": results.package_versions(), "git_commit": results.git_commit(),
                  "variants": []}
        print(f"machine: {report['machine']}", flush=True)
        for position, variant in enumerate(args.variants):
            profile = variant in args.profile and not args.no_profile
            result, profiled, works = time_variant(args, variant, source, tokenizer, feature_batches, workdir,
                                                   profile)
            if report["batches"] is None:
                report["batches"] = works
                print(f"batches: {works}")
                print_theory(models.model_config(source), works, report)
            if profiled:
                breakdowns, fastest, ops = profiled
                for method in METHODS:
                    print(f"\n== [{variant}] {method}: top {args.top} ops by self CPU time (fastest profiled step of "
                          f"batch 1; {ops[method]:.0f} top-level aten ops per step on average) ==")
                    print(fastest[method].key_averages(group_by_input_shape=True).table(
                        sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40,
                        max_shapes_column_width=70))
                print_breakdown(breakdowns)
                result["breakdown_ms_per_step"] = breakdowns
                result["top_level_aten_ops_per_step"] = ops
            wall, cpu = result["wall"], result["cpu"]
            print(f"\n[{variant}] LoRA/full scored tokens/s ({result['threads']} threads): wall median "
                  f"{wall['median_ratio']:.3f}, at minima {wall['min_ratio']:.3f}; per CPU second median "
                  f"{cpu['median_ratio']:.3f}, at minima {cpu['min_ratio']:.3f}; tokens/s at minima: LoRA "
                  f"{wall['scored_tokens_per_second_at_min']['lora']:.1f}, full "
                  f"{wall['scored_tokens_per_second_at_min']['full']:.1f}", flush=True)
            if not args.no_memory and not (args.quick and position > 0):
                measured = measure_memory(args, variant)
                peaks = {m: measured[m]["training_peak_bytes"] for m in METHODS}
                ratio = None if None in peaks.values() else peaks["lora"] / peaks["full"]
                result["memory"], result["lora_over_full_training_peak"] = measured, ratio
                if ratio is None:
                    print(f"[{variant}] training peak RSS unavailable: {measured['lora']['unavailable']}")
                else:
                    gib = 1024**3
                    print(f"[{variant}] training peak RSS: LoRA {peaks['lora'] / gib:.2f} GiB "
                          f"(+{measured['lora']['training_peak_over_loaded_bytes'] / gib:.2f} over loaded), full "
                          f"{peaks['full'] / gib:.2f} GiB "
                          f"(+{measured['full']['training_peak_over_loaded_bytes'] / gib:.2f}); LoRA/full {ratio:.3f}",
                          flush=True)
            report["variants"].append(result)
            write_report(report, args.output)
    report["seconds"] = time.perf_counter() - started
    write_report(report, args.output)
    print(f"\n{time.perf_counter() - started:.0f} s" + (f"; wrote {args.output}" if args.output else ""))


if __name__ == "__main__":
    main()
