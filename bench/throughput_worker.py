"""One contender of bench/throughput.py in its own process: TRL's SFTTrainer, or the write-up's recipe with a
plain Trainer, trained on exactly the records the orchestrator wrote and measured as training.train measures the
kit's own scripts (the same MeasuredTrainer counts scored tokens and time away from training).

    python bench/throughput_worker.py --contender writeup --method lora --records train.jsonl \\
        --result writeup-lora.json --workdir /tmp/x --steps 4 --batch-size 2 --grad-accum 2 --max-length 1024

bench/throughput.py runs it once per contender and method; by hand only to debug one of them.
"""

import argparse
import json
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]

from peft import get_peft_model  # noqa: E402
from transformers import TrainingArguments, default_data_collator  # noqa: E402

import common  # noqa: E402
from lvf import defaults, errors, full, lora, memory, models, results, settings, training, writeup  # noqa: E402

CONTENDERS = ("trl", "writeup")
METHODS = {"lora": lora, "full": full}  # each method as its script runs it


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=settings.description(__doc__),
                                     formatter_class=settings.HelpFormatter)
    add = parser.add_argument
    add("--contender", choices=CONTENDERS, required=True)
    add("--method", choices=tuple(METHODS), required=True)
    add("--records", required=True, help="the training records, all of them used, in this order")
    add("--result", required=True, help="where the measurements go (JSON)")
    add("--workdir", required=True, help="the run's temporary folder (the Trainer's output_dir goes inside)")
    add("--steps", type=settings.positive_int, required=True, help="optimizer steps")
    add("--batch-size", type=settings.positive_int, required=True)
    add("--grad-accum", type=settings.positive_int, required=True)
    add("--max-length", type=settings.positive_int, required=True, help="TRL's max_length")
    add("--seed", type=int, default=42)
    add("--model", default="smollm2-135m", help="model preset, Hub id or folder")
    add("--trl-precision", choices=["defaults", "ours"], default="defaults")
    return parser.parse_args(argv)


def load_model(model_source, method, peft_yourself):
    """The model as our scripts load it: same dtype (fp32 on the CPU), SDPA; LoRA from finetune.py's defaults."""
    device = settings.resolve_device()
    model = models.load_model(model_source, settings.resolve_dtype("auto", device), device)
    lora_config = lora.default_lora_config() if method == "lora" else None
    if lora_config is not None and peft_yourself:
        model, lora_config = get_peft_model(model, lora_config), None
    return model, lora_config


def shared_hyperparameters(args):
    """What every contender shares with the scripts: their learning rate, batch, schedule, optimizer, seed."""
    return dict(
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate={"lora": defaults.LORA, "full": defaults.FULL}[args.method].learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=training.warmup_steps(args.steps),
        optim="adamw_torch",
        seed=args.seed,
        data_seed=args.seed,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        use_cpu=settings.resolve_device() == "cpu",
        output_dir=str(Path(args.workdir) / f"{args.contender}-{args.method}"),
    )


def trl_trainer(args, model_source, tokenizer, records):
    """TRL's SFTTrainer, its defaults, on a conversational prompt-completion dataset."""
    # Deferred: trl (and the datasets it takes) are benchmark-only dependencies (requirements-bench.txt);
    # the write-up contender runs without them.
    import datasets
    from trl import SFTConfig, SFTTrainer

    model, lora_config = load_model(model_source, args.method, peft_yourself=False)
    rows = [{"prompt": [{"role": "user", "content": common.user_turn(record)}],
             "completion": [{"role": "assistant", "content": record["response"]}]} for record in records]
    extra = {}
    if args.trl_precision == "ours":
        device = settings.resolve_device()
        extra = dict(bf16=settings.use_bf16_autocast("auto", device), gradient_checkpointing=device == "cuda")
    config = SFTConfig(**shared_hyperparameters(args), max_length=args.max_length, **extra)
    trainer = training.make_trainer_class(SFTTrainer)(model=model, args=config,
                                                    train_dataset=datasets.Dataset.from_list(rows),
                                                    processing_class=tokenizer, peft_config=lora_config)
    input_tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    return trainer, {"input_tokens": input_tokens, "train_examples": len(trainer.train_dataset)}


def writeup_trainer(args, model_source, tokenizer, records):
    """The write-up's recipe (lvf.writeup: context dropped, padded to 512 with eos, labels = input_ids), plain
    Trainer."""
    model, _ = load_model(model_source, args.method, peft_yourself=True)
    rows = writeup.encode(tokenizer, records)
    trainer = training.make_trainer_class()(model=model, args=TrainingArguments(**shared_hyperparameters(args)),
                                          train_dataset=rows, data_collator=default_data_collator)
    # Its labels cover the prompt too; what follows the prompt (cut at 512) is the response it learns.
    lengths = [sum(row["attention_mask"]) for row in rows]
    prompt_lengths = writeup.prompt_lengths(tokenizer, records)
    return trainer, {"input_tokens": sum(lengths), "train_examples": len(rows),
                     "response_tokens": sum(max(0, n - p) for n, p in zip(lengths, prompt_lengths, strict=True))}


def main(argv=None):
    """Builds the contender's trainer, trains, and writes what training.train would measure."""
    args = parse_args(argv)
    model_source = models.check_model_source(args.model)
    tokenizer = models.load_tokenizer(model_source)
    records = common.load_records(args.records)
    build = trl_trainer if args.contender == "trl" else writeup_trainer
    trainer, work = build(args, model_source, tokenizer, records)
    start = time.perf_counter()  # timed as training.train times our own path, and its peak taken alike
    with memory.PhasePeak(settings.resolve_device()) as train_peak:
        trainer.train()
    train_seconds = time.perf_counter() - start
    train_tokens = int(trainer.scored_tokens)
    measured = {
        "train_tokens": train_tokens,
        **training.step_timing(train_seconds, trainer.seconds_away, train_tokens),
        "response_tokens": work.get("response_tokens", train_tokens),
        **work,
        "optimizer_steps": trainer.state.global_step,
        "bf16_autocast": bool(trainer.args.bf16),
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "peak_memory_bytes": memory.process_peak("cpu")[0],
        "train_peak_memory_bytes": train_peak.bytes,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
    }
    results.write_atomic(args.result, json.dumps(measured, indent=2) + "\n")


if __name__ == "__main__":
    errors.main_guard(main)
