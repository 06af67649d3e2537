"""The Trainer harness: arguments, collator, a Trainer that counts what it trains on, stopping on a
signal with a checkpoint, resuming, and saving the final artifact."""

import contextlib
import dataclasses
import datetime as dt
import inspect
import math
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from transformers import (
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_pt_utils import LengthGroupedSampler

import common
from common import IGNORE_INDEX
from lvf import precision, preflight, scoring
from lvf.artifacts import ORIGIN_FILE
from lvf.checkpoints import latest_checkpoint
from lvf.errors import SIGNAL_EXIT_STATUS, Interrupted, UsageError
from lvf.memory import PhasePeak, TrainingBreakdown
from lvf.results import is_main_process, weights_bytes
from lvf.settings import display_path


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """Length-grouped order drawn from its own generator, seeded with seed + epoch at each pass, so that an
    epoch's order does not depend on what consumed the global RNG before it (see epoch_seeded_sampler)."""

    def __init__(self, batch_size, lengths, seed):
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        self.generator.manual_seed(self.seed + self.epoch)
        return super().__iter__()


def epoch_seeded_sampler(sampler, args):
    """Workaround for transformers (5.23, 5.17) Trainer._get_train_sampler (trainer.py), which builds
    LengthGroupedSampler (trainer_pt_utils.py) without a generator, so get_length_grouped_indices draws each
    epoch's order from the global torch RNG when the epoch's iteration begins. A run resumed mid-epoch starts from
    a freshly seeded RNG (the checkpoint's rng_state.pth is put back only after the skipped batches), so from the
    second epoch on the rest of the resumed epoch trains on other batches than the uninterrupted run did: LoRA and
    full fine-tuning alike. The replacement's order is a function of (data seed, epoch) alone."""
    if type(sampler) is not LengthGroupedSampler or sampler.generator is not None:
        return sampler
    seed = args.data_seed if args.data_seed is not None else args.seed
    return EpochSeededLengthGroupedSampler(sampler.batch_size, sampler.lengths, seed)


class SetSamplerEpoch(TrainerCallback):
    """Gives the epoch-seeded sampler the epoch the loop is in, also in the epoch a run resumes into."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        # state.epoch is the loop's epoch exactly at an epoch's start (k + n/n at its end), and k + a fraction
        # in the epoch a run resumes into; accelerate forwards the Trainer's own set_epoch to the sampler except
        # through SkipBatchSampler(BatchSamplerShard(...)), i.e. a DDP mid-epoch resume.
        sampler = self.trainer.epoch_seeded_sampler
        if sampler is not None:
            sampler.set_epoch(math.floor(state.epoch or 0))


class OptimizerInBackward:
    """Applies the Trainer's optimizer to each weight as soon as that weight's gradient is complete, and frees
    the gradient: backward never holds more than the gradients in flight, instead of one for every weight (for
    Llama 3 8B in fp32, 32.1 GB). PyTorch's `register_post_accumulate_grad_hook` fusion (the mechanism of
    torchtune's optimizer_in_bwd and of transformers' layer-wise GaLore), with one change: a single optimizer
    holds every weight and its step() updates only the weights that have a gradient, which at each hook is the
    one weight that just got it. So the Trainer's own optimizer.step() finds no gradients and does nothing, and
    its scheduler, checkpoints (optimizer.pt) and resume work on that optimizer unchanged.

    No gradient accumulation (a weight is stepped on one micro-batch's gradient) and no global-norm clipping
    (no moment holds every gradient); the gradients' global norm is still summed here, for the logs."""

    def __init__(self):
        self.handles = []
        self.squared_norm = None

    def attach(self, optimizer, parameters):
        def step(parameter):
            squared = torch.linalg.vector_norm(parameter.grad, dtype=torch.float32).square()  # no copy of it
            self.squared_norm = squared if self.squared_norm is None else self.squared_norm + squared
            optimizer.step()
            parameter.grad = None

        self.handles = [parameter.register_post_accumulate_grad_hook(step)
                        for parameter in parameters if parameter.requires_grad]

    def take_grad_norm(self):
        """The global gradient norm of the backward passes since the last call (None if there were none)."""
        squared, self.squared_norm = self.squared_norm, None
        return None if squared is None else squared.sqrt()

    def detach(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []


def make_trainer_class(base=None):
    """Trainer that also counts the scored tokens it trains on and times, apart, what Trainer.train() does besides
    its steps: validation (`validation_seconds`) and checkpoints (`checkpoint_seconds`: writing them, and loading
    the best one back at the end), so step time and tokens/s mean training alone; and whose length-grouped data
    order survives a resume (EpochSeededLengthGroupedSampler).
    `base` (default: transformers.Trainer) lets bench/throughput.py measure other trainers the same way."""
    class MeasuredTrainer(base or Trainer):
        def __init__(self, *a, optimizer_in_backward=False, **kw):
            super().__init__(*a, **kw)
            self.in_backward = OptimizerInBackward() if optimizer_in_backward else None
            self.scored_tokens = None
            self.seconds_away = {"validation": 0.0, "checkpoint": 0.0}
            self.epoch_seeded_sampler = None
            self.add_callback(SetSamplerEpoch(self))

        def _get_train_sampler(self, train_dataset=None):
            sampler = epoch_seeded_sampler(super()._get_train_sampler(train_dataset), self.args)
            if isinstance(sampler, EpochSeededLengthGroupedSampler):
                self.epoch_seeded_sampler = sampler
            return sampler

        def create_optimizer(self, model=None):
            optimizer = super().create_optimizer(model)
            if self.in_backward is not None and not self.in_backward.handles:
                self.in_backward.attach(optimizer, (self.model if model is None else model).parameters())
            return optimizer

        def _get_grad_norm(self, model, grad_norm=None):
            # In backward the gradients are gone by the time the Trainer would measure them (it would log 0).
            if self.in_backward is not None:
                return self.in_backward.take_grad_norm()
            return super()._get_grad_norm(model, grad_norm)

        def training_step(self, model, inputs, num_items_in_batch=None):
            # Scored = a target that counts in the loss and is not padding (some pipelines label padding).
            # Summed on the device: no host sync per step.
            scored = inputs["labels"][..., 1:] != IGNORE_INDEX
            if "attention_mask" in inputs:
                scored = scored & inputs["attention_mask"][..., 1:].bool()
            count = scored.sum()
            self.scored_tokens = count if self.scored_tokens is None else self.scored_tokens + count
            return super().training_step(model, inputs, num_items_in_batch)

        @contextlib.contextmanager
        def away_from_training(self, what):
            # On CUDA the steps' kernels run asynchronously: waiting for them first keeps their time out of the
            # validation's or checkpoint's, and waiting at the end keeps theirs out of the steps'.
            synchronize(self.args.device)
            start = time.perf_counter()
            try:
                yield
            finally:
                synchronize(self.args.device)
                self.seconds_away[what] += time.perf_counter() - start

        def evaluate(self, *a, **kw):
            with self.away_from_training("validation"):
                return super().evaluate(*a, **kw)

        def _save_checkpoint(self, *a, **kw):
            with self.away_from_training("checkpoint"):
                return super()._save_checkpoint(*a, **kw)

        def _load_best_model(self, *a, **kw):
            with self.away_from_training("checkpoint"):
                return super()._load_best_model(*a, **kw)

    return MeasuredTrainer


def synchronize(device):
    """Waits for the device's queued work (CUDA); elsewhere nothing is queued."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def step_timing(train_seconds, seconds_away, train_tokens):
    """The results' time fields: Trainer.train()'s wall time split into steps, validation and checkpoints;
    tokens/s from the steps' time alone."""
    step_seconds = max(train_seconds - seconds_away["validation"] - seconds_away["checkpoint"], 1e-9)
    return {
        "train_seconds": train_seconds,
        "train_step_seconds": step_seconds,
        "validation_seconds": seconds_away["validation"],
        "checkpoint_seconds": seconds_away["checkpoint"],
        "train_tokens_per_second": train_tokens / step_seconds,
    }


class StopOnSignal:
    """While active, SIGINT/SIGTERM ask the Trainer to save a checkpoint and stop after the current
    optimizer step; outside training the default behaviour is back.

    Every rank stops at the same step (the flag is all-reduced each step): a launcher may signal the
    ranks at different moments, and a rank that stops alone would leave the others waiting forever.
    A second signal stops at once, without a checkpoint, unless it comes within a second of the first
    (that is a launcher forwarding the same Ctrl-C the workers already got from the terminal).
    """

    def __init__(self):
        outer = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if outer.any_rank_received(args.device):
                    outer.stopped = True
                    control.should_save = True
                    control.should_training_stop = True
                return control

        self.received = None
        self.received_at = None
        self.stopped = False
        self.callback = Callback()
        self._previous_handlers = {}

    def any_rank_received(self, device):
        received = self.received is not None
        if dist.is_available() and dist.is_initialized():
            flag = torch.tensor(int(received), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            received = bool(flag.item())
        return received

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.received is not None:
            if now - self.received_at > 1.0:
                raise KeyboardInterrupt
            return
        self.received, self.received_at = signum, now
        if is_main_process():
            print(f"\n[signal {signum}] saving a checkpoint after this step; rerun with --resume to continue "
                  "(signal again to stop at once, without one)", file=sys.stderr)

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous_handlers[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)


def optimizer_steps(settings, train_examples, examples_per_step):
    """Optimizer steps the run will take: --max-steps, or the epochs at examples_per_step (examples_per_step())."""
    if settings.max_steps > 0:
        return settings.max_steps
    return math.ceil(max(1, math.ceil(train_examples / examples_per_step)) * settings.num_epochs)


def examples_per_step(arguments):
    """Examples in one optimizer step as the Trainer batches them: its train_batch_size (the per-device batch times
    the GPUs of one process), gradient accumulation, and the processes (world_size)."""
    return arguments.train_batch_size * arguments.gradient_accumulation_steps * arguments.world_size


def on_one_gpu(arguments):
    """Workaround for transformers (5.23) TrainingArguments._setup_devices: a process started directly (no accelerate
    launch) that sees several GPUs gets n_gpu = torch.cuda.device_count(), and the Trainer then wraps the model in
    torch.nn.DataParallel (Trainer._wrap_model; not a 4-bit one) and multiplies the batch by n_gpu
    (TrainingArguments.train_batch_size): on an 8-GPU node batch 4 became 32, and QLoRA took all 32 on one GPU. One
    experiment is one run on one GPU wherever it starts, so n_gpu is set to 1, as the Trainer itself does for a
    model-parallel model (`self.args._n_gpu = 1`), and the run says which GPU: cuda:0, the first CUDA_VISIBLE_DEVICES
    shows (_setup_devices made it the current device). Not by setting CUDA_VISIBLE_DEVICES here: CUDA reads it once
    when it initialises, and the scripts have asked torch.cuda.is_available() by then, so a change would be ignored
    silently. Under accelerate launch each process has one GPU (n_gpu 1) already."""
    visible = arguments.n_gpu
    if visible <= 1:
        return arguments
    arguments._n_gpu = 1
    if is_main_process():
        print(f"{visible} GPUs visible to one process: training on one, {arguments.device} "
              f"({torch.cuda.get_device_name(arguments.device)}; CUDA_VISIBLE_DEVICES chooses which); for all "
              f"{visible}, accelerate launch --num_processes {visible} (docs/multi-gpu.md), or one run per GPU with "
              f"study.py --workers {visible}", file=sys.stderr, flush=True)
    return arguments


def warmup_steps(total_steps):
    """3% of the run, at least one step (the schedule the kit trains with, and the benchmark's)."""
    return max(1, round(0.03 * total_steps))


# transformers 5.23 renamed TrainingArguments' gradient_checkpointing(_kwargs) to activation_checkpointing(_kwargs):
# the old names warn (FutureWarning) on every run, even when False; 5.17 knows only the old names.
CHECKPOINTING_ARGUMENT = next(name for name in ("activation_checkpointing", "gradient_checkpointing")
                              if name in {field.name for field in dataclasses.fields(TrainingArguments)})


def checkpointing_arguments(enabled):
    """Activation (gradient) checkpointing, under the names this transformers knows; non-reentrant, which
    needs no input gradients and works with frozen embeddings (LoRA)."""
    return {CHECKPOINTING_ARGUMENT: enabled,
            f"{CHECKPOINTING_ARGUMENT}_kwargs": {"use_reentrant": False} if enabled else None}


def training_arguments(settings, runtime, train_examples):
    """The Trainer's arguments. Build them before the model loads: building them starts the process group and,
    under `accelerate launch`, registers DeepSpeed's config, and only then does from_pretrained see FSDP
    (is_fsdp_enabled, for cpu-ram-efficient loading) or ZeRO-3 (partitioned as it is built). Hold them until
    training: DeepSpeed's config is kept through a weak reference.

    One process trains on one GPU (on_one_gpu). The schedule (warm-up, validation, checkpoints, logging) is then
    computed from the batch the Trainer will really take and the processes it really runs (examples_per_step), so
    it cannot disagree with the Trainer's own count of steps."""
    arguments = TrainingArguments(
        output_dir=str(runtime.output_dir),
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.eval_batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.num_epochs,
        max_steps=settings.max_steps,
        lr_scheduler_type="cosine",
        eval_strategy="steps",
        save_strategy="steps",
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        bf16=runtime.bf16_autocast,
        **checkpointing_arguments(runtime.gradient_checkpointing),
        optim=runtime.optimizer,
        # The runtime's: 0 (no clipping) when stepped in backward, else the Trainer's default 1.0 (full_finetune.py).
        max_grad_norm=runtime.max_grad_norm,
        seed=settings.seed,
        data_seed=settings.seed,
        train_sampling_strategy="group_by_length",
        report_to=settings.report_to,
        remove_unused_columns=False,
        use_cpu=runtime.device == "cpu",
        dataloader_num_workers=0,
        save_only_model=False,
        ddp_find_unused_parameters=False if runtime.world_size > 1 else None,
    )
    total_steps = optimizer_steps(settings, train_examples, examples_per_step(on_one_gpu(arguments)))
    eval_steps = settings.eval_steps or max(1, math.ceil(total_steps / 5))
    arguments.warmup_steps = warmup_steps(total_steps)
    arguments.eval_steps = arguments.save_steps = eval_steps  # equal: load_best_model_at_end needs a multiple
    arguments.logging_steps = max(1, min(10, eval_steps))
    return arguments


def to_dataset(examples):
    """A plain list of features: the Trainer's length-grouped sampler reads each one's input_ids length, and
    training needs no `datasets` (which a GPU machine may lack)."""
    return [{key: example[key] for key in ("input_ids", "attention_mask", "labels")} for example in examples]


def accepts_logits_to_keep(model):
    """Whether the (unwrapped) causal LM takes logits_to_keep, as transformers 5 models do."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def accepts_boolean_logits_to_keep(model):
    """Whether logits_to_keep may be a 2-D boolean mask (per-row positions): models whose modeling file slices
    through transformers' slice_logits_to_keep (5.2x). Older 5.x (5.17) index
    hidden_states[:, logits_to_keep, :], which takes an int or 1-D positions only."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return hasattr(sys.modules.get(type(base).__module__), "slice_logits_to_keep")


def model_collator(training_args, model, tokenizer, device, packing=False):
    """The training collator this model and these arguments allow: scored logits only where the model takes
    logits_to_keep and one process drives at most one GPU (DataParallel would split the flat shift_labels
    across replicas), as a boolean mask where the model's transformers accepts one."""
    scored_logits_only = training_args.n_gpu <= 1 and accepts_logits_to_keep(model)
    return training_collator(tokenizer, device, packing, scored_logits_only, accepts_boolean_logits_to_keep(model))


def training_collator(tokenizer, device, packing=False, scored_logits_only=True, boolean_logits_to_keep=True):
    """Pads a batch (or, with packing, flattens it into one row with position ids), then adds two
    things that make a step cheaper without changing its loss or gradients:

    - logits_to_keep, a boolean mask of the positions whose next token is scored, and the matching
      shift_labels: the model projects onto the vocabulary only there. In our Dolly records ~60% of tokens are
      prompt, and in a small model the vocabulary projection and its softmax are a large share of a
      step's time and memory. Without boolean_logits_to_keep (transformers 5.17), the positions scored in
      any row, the same for every row, with shift_labels -100 where a row scores nothing.
    - use_cache=False: training never reads a KV cache, and transformers derives the per-example
      attention mask of a packed row from its position ids only when no cache is passed (with a cache,
      examples in a packed row silently attend to each other).
    """
    if packing:
        # Labels get -100 at every example's first token, so no example predicts across a boundary.
        pad_or_flatten = DataCollatorWithFlattening(separator_id=IGNORE_INDEX)
    else:
        pad_or_flatten = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX,
                                                pad_to_multiple_of=8 if device == "cuda" else None)

    def collate(features):
        batch = pad_or_flatten(features)
        batch["use_cache"] = False
        if scored_logits_only:
            targets = batch["labels"][..., 1:]
            scored = targets != IGNORE_INDEX
            if boolean_logits_to_keep:
                batch["logits_to_keep"] = torch.nn.functional.pad(scored, (0, 1), value=False)
                batch["shift_labels"] = targets[scored]
            else:  # a packed batch is one row: there "any row" is exactly its scored positions
                positions = scored.any(0).nonzero().flatten()
                batch["logits_to_keep"] = positions
                batch["shift_labels"] = targets[:, positions]
        return batch

    return collate


def start_run(settings, runtime):
    """Seeds every generator (the adapters' random initialisation comes before the Trainer seeds) and
    refuses to mix a new run into the checkpoints of an earlier one."""
    seed_everything(settings.seed)
    warn_if_launched_alone()
    if not settings.dry_run and not settings.resume and latest_checkpoint(runtime.output_dir) is not None:
        raise UsageError(f"{runtime.output_dir} holds checkpoints of an earlier run: pass --resume to continue it, "
                         "or choose another --output-dir")


def train(settings, runtime, model, tokenizer, train_examples, val_examples, training_args):
    """Trains with the Trainer, keeps the best checkpoint by validation loss. Returns the trainer, the
    measurements and training's own peak memory (validation and checkpoints during training included)."""
    stopper = StopOnSignal()
    breakdown = TrainingBreakdown()
    collator = model_collator(training_args, model, tokenizer, runtime.device, settings.packing)
    trainer = make_trainer_class()(
        model=model,
        args=training_args,
        train_dataset=to_dataset(train_examples),
        eval_dataset=to_dataset(val_examples),
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[stopper.callback, breakdown],
        optimizer_in_backward=runtime.optimizer_in_backward,
    )
    output_dir = runtime.output_dir
    resume = latest_checkpoint(output_dir) if settings.resume else None
    if settings.resume and resume is None:
        print(f"--resume: no checkpoint in {output_dir}; starting from the beginning", file=sys.stderr)
    start = time.perf_counter()
    with stopper, PhasePeak(runtime.device) as train_peak:
        if is_main_process():
            # The optimizer and why, so that a missing package never changes it silently.
            print(f"training: {preflight.optimizer_line(runtime)}; checkpoints in {output_dir}; SIGINT or SIGTERM "
                  f"saves one and stops (exit status {SIGNAL_EXIT_STATUS}), --resume continues", file=sys.stderr,
                  flush=True)
        try:
            trainer.train(resume_from_checkpoint=resume)
        finally:
            if trainer.in_backward is not None:  # evaluation and saving need no hooks
                trainer.in_backward.detach()
    train_seconds = time.perf_counter() - start
    if stopper.stopped:
        raise Interrupted(f"training stopped by a signal; checkpoint saved in {latest_checkpoint(output_dir)}; "
                          "rerun the same command with --resume to continue")
    local_tokens = trainer.scored_tokens if trainer.scored_tokens is not None else torch.zeros((), dtype=torch.long)
    train_tokens = int(trainer.accelerator.reduce(local_tokens.to(trainer.args.device), "sum"))
    return trainer, {
        "train_examples": len(train_examples),
        **step_timing(train_seconds, trainer.seconds_away, train_tokens),
        "train_tokens": train_tokens,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "best_validation_loss": trainer.state.best_metric,
        "optimizer_steps": trainer.state.global_step,
        "resumed_from": resume,
        "train_memory_breakdown": breakdown.breakdown(train_peak.bytes),
        "log_history": trainer.state.log_history,  # losses and validation over steps, for curves
    }, train_peak


def warn_if_launched_alone():
    """`accelerate launch --cpu --num_processes N` on one machine starts one process (its CPU launcher
    needs mpirun for more); say so rather than let a user believe N processes trained."""
    if os.environ.get("ACCELERATE_USE_CPU") == "True" and "MASTER_PORT" in os.environ and "RANK" not in os.environ:
        print("warning: accelerate launch --cpu started a single process; for DDP on CPUs launch with "
              "--multi_gpu --num_processes N and CUDA_VISIBLE_DEVICES= (see docs/multi-gpu.md)", file=sys.stderr)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CUDA too


def save_artifact(trainer, output_dir):
    """Saves the final model (adapter or full weights, safetensors only) atomically to output_dir/final.

    Every rank calls it (FSDP and DeepSpeed gather the weights collectively) and writes into the same
    staging folder; the main process then swaps it in, keeping an earlier final-* beside it."""
    final = Path(output_dir) / "final"
    staging = final.with_name("final.partial")
    if trainer.args.should_save:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        # A pickle (torch.save of the TrainingArguments); the results' config already records them.
        (staging / "training_args.bin").unlink(missing_ok=True)
        origin = Path(output_dir) / ORIGIN_FILE  # what the artifact is, kept with it wherever it is copied
        if origin.is_file():
            shutil.copy2(origin, staging / ORIGIN_FILE)
        if final.exists():
            stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
            final.replace(final.with_name(f"final-{stamp}"))
        staging.replace(final)
    return final


def without_mixed_precision_wrapper(trainer):
    """The model to evaluate: the distributed wrapper is kept (under FSDP and DeepSpeed every rank must run
    the same forwards, which gather the weights collectively), but the bf16 autocast that accelerate put
    around the inner model's forward (`model.forward = convert_outputs_to_fp32(autocast(forward))`, the
    original kept in `_original_forward`) is taken off in place, so a tuned model is scored in its weights'
    precision, as the base model is. Training is over: nothing calls the autocast forward again."""
    trainer.accelerator.unwrap_model(trainer.model_wrapped, keep_fp32_wrapper=False)
    return trainer.model_wrapped


def scored_in_eval_dtype(trainer, runtime):
    """The fully fine-tuned model to score, after it is saved: autocast taken off (without_mixed_precision_wrapper)
    and its weights cast in place to the evaluation dtype, as a deployment would load them (fp32 master weights to
    bf16 rounds to nearest, as from_pretrained(dtype=torch.bfloat16) of the saved model does), so that it is scored
    as the base model and LoRA are (lvf.precision). Parameters only, not module.to(dtype): from_pretrained keeps
    buffers such as the rotary embedding's inv_freq in fp32, and .to would round them to bf16 too. Under FSDP or
    DeepSpeed the wrapper is kept and its sharded forward computes in the config's bf16
    (precision.scoring_problem refuses another --eval-dtype there)."""
    scored = without_mixed_precision_wrapper(trainer)
    if not precision.sharded():
        for parameter in trainer.accelerator.unwrap_model(scored).parameters():
            if parameter.is_floating_point():
                parameter.data = parameter.data.to(runtime.eval_dtype)
    return scored


def evaluate_trained(model, trainer, tokenizer, examples, eval_records, settings, runtime, label):
    """The trained model scored: the held-out set (and the general text) as lvf.scoring.evaluate_model scores every
    method, under its own phase peak; then the kept checkpoint's validation loss, token-weighted like the test
    figure, which is what a learning-rate sweep compares (the Trainer's eval_loss weights each batch's mean by its
    size, not by its tokens). Every rank evaluates the whole set (under FSDP and DeepSpeed the forwards gather the
    weights collectively); the main process writes. Returns (fields, the evaluation's PhasePeak)."""
    device = trainer.args.device  # this rank's
    with PhasePeak(runtime.device) as eval_peak:
        fields = scoring.evaluate_model(model, tokenizer, examples["eval"], eval_records, settings, device,
                                        desc=f"evaluate {label}", general_examples=examples["general"])
    validation = common.evaluate_perplexity(model, examples["validation"], tokenizer.pad_token_id,
                                            settings.eval_batch_size, device, settings.seed,
                                            settings.bootstrap_resamples, desc=f"validate {label}")
    fields.update(validation_loss=validation["eval_loss"], validation_tokens=validation["eval_tokens"])
    return fields, eval_peak


def artifact_fields(artifact):
    return {"artifact_path": display_path(artifact),
            "artifact_bytes": weights_bytes(artifact) if Path(artifact).exists() else None}
