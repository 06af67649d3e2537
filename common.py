"""What the three scripts share at the core of the experiment: Dolly-style records loaded and split (a Hub
dataset id checked in seconds), chat-template tokenization with the prompt masked, and perplexity with its
bootstrap intervals.

The ground floor: it imports nothing of lvf/, which builds on it (model resolution, the Trainer harness, results
and exits, one module per job); bad input is usage_error.UsageError, which both raise. `datasets` is imported
only where a Hub id, .csv or .parquet file is read: it is slow to import and the JSON files every test and the
demo use do not need it.
"""

import hashlib
import json
import math
import re
import time
from pathlib import Path
from pydoc_data.topics import topics as pydoc_topics

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import HfApi, get_token
from huggingface_hub.constants import HF_HUB_CACHE, is_offline_mode
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
from scipy import stats
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

from usage_error import UsageError

PROJECT_DIR = Path(__file__).resolve().parent
REQUIRED_FIELDS = ("instruction", "context", "response")
IGNORE_INDEX = -100

# The official Meta-Llama-3-8B-Instruct chat template (tokenizer_config.json on the Hub).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

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


# Hub ids that fail in seconds: a cached copy is used as it is, otherwise one metadata request with a short time-out
# tells a typo, a gated repository or no network apart before anything loads.


def ensure_hub_reachable(repo_id, kind="model", timeout=5.0):
    """Fails in seconds, not after the ~25-50 s network time-out, when a Hub id cannot be fetched:
    one metadata request with a short time-out, which also catches a typo or a gated repo."""
    if in_hub_cache(repo_id, kind):
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
                         f"({type(error).__name__}): check the network, or pass a local folder") from None
    if info.gated and get_token() is None:
        raise UsageError(f"{kind} {repo_id!r} is gated: accept its licence on the Hub, then log in "
                         "(hf auth login, or set HF_TOKEN)")
    if info.gated:
        check_gated_access(repo_id, kind)


def check_gated_access(repo_id, kind="model"):
    """Raises UsageError unless this token may download the gated repo_id (auth_check: GatedRepoError when its
    licence is not accepted for this account, or the request is pending; repo_info answers for a gated repository
    whether or not its licence was accepted). GatedRepoError is a RepositoryNotFoundError, hence the order of the
    handlers."""
    try:
        HfApi().auth_check(repo_id, repo_type=kind)
    except GatedRepoError:
        raise UsageError(f"{kind} {repo_id} is gated and this Hub token has no access to it: accept its licence "
                         f"on https://huggingface.co/{repo_id} with the account you logged in with (hf auth whoami), "
                         "wait for the approval, then run again") from None
    except RepositoryNotFoundError:
        raise UsageError(f"{kind} {repo_id} not found on the Hub (or private: log in with an account that can "
                         "read it: hf auth login)") from None


def in_hub_cache(repo_id, kind):
    folder = Path(HF_HUB_CACHE) / f"{kind}s--{repo_id.replace('/', '--')}"
    return folder.is_dir()


def _load_table(name, data_files, source, config=None, split="train"):
    import datasets

    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(name, config, data_files=data_files, split=split).to_list()
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
    alone picks the checkpoint. Records that share a normalised instruction stay together (a
    duplicated question in training would leak its answer into validation or test). Categories
    too small to stratify are pooled, and tiny data falls back to an unstratified split instead
    of crashing.
    """
    groups, labels = instruction_groups(records)
    rest, test = _stratified_split(np.arange(len(groups)), labels, test_fraction, seed)
    train, val = _stratified_split(rest, [labels[i] for i in rest], val_fraction, seed)
    return _records_of(records, groups, train), _records_of(records, groups, val), _records_of(records, groups, test)


def held_out_split(records, test_fraction=0.1, seed=42):
    """split_records' test split alone: it is drawn first, so it does not depend on the validation share."""
    groups, labels = instruction_groups(records)
    _, test = _stratified_split(np.arange(len(groups)), labels, test_fraction, seed)
    return _records_of(records, groups, test)


def normalised_instruction(record):
    return " ".join(record["instruction"].lower().split())


def instruction_groups(records):
    """Record indices grouped by normalised instruction (in order of first appearance), and each group's
    category (its first record's) to stratify by. Without duplicates every group is one record, and the
    split is the record-level one."""
    if len(records) < 3:
        raise UsageError(f"need at least 3 records to make train/validation/test splits, got {len(records)}")
    by_instruction = {}
    for index, record in enumerate(records):
        by_instruction.setdefault(normalised_instruction(record), []).append(index)
    groups = list(by_instruction.values())
    if len(groups) < 3:
        raise UsageError(f"need at least 3 distinct instructions to make train/validation/test splits, "
                         f"got {len(groups)}")
    return groups, [records[group[0]]["category"] for group in groups]


def _records_of(records, groups, chosen):
    return [records[i] for i in sorted(i for group in chosen for i in groups[group])]


def _stratified_split(indices, labels, share, seed):
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


def load_splits(settings, training=True):
    """Train, validation and eval records (train and validation None when not training).

    --split-seed alone decides the split and every subset, so runs with different --seed values are
    scored on the same examples. --eval-file replaces the test split (and, for the base model, is the
    only data read).
    """
    train = val = test = None
    if training:
        train, val, test = split_records(load_records(settings.dataset), settings.test_fraction,
                                         settings.val_fraction, settings.split_seed)
        train = take_subset(train, settings.max_train_samples, settings.split_seed)
        val = take_subset(val, settings.max_val_samples, settings.split_seed)
    elif not settings.eval_file:
        test = held_out_split(load_records(settings.dataset), settings.test_fraction, settings.split_seed)
    eval_records = load_records(settings.eval_file) if settings.eval_file else test
    eval_records = take_subset(eval_records, settings.max_eval_samples, settings.split_seed)
    return train, val, eval_records


def load_examples(settings, tokenizer, records):
    """The records of load_splits (train, validation, eval; train and validation None when not training)
    tokenized, and the general text's blocks (examples["general"]): every check that needs no model, done
    before one loads. Returns (examples by split, truncation counts by split)."""
    train, val, eval_records = records
    splits = {"train": train, "validation": val, "eval": eval_records} if train is not None else {"eval": eval_records}
    examples, truncation = tokenize_splits(tokenizer, settings.max_length, **splits)
    examples["general"] = load_general_examples(settings, tokenizer)
    return examples, truncation


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


# --------------------------------------------------------------------------- general text (forgetting)

# Named plain-text sources for --general-file. WikiText-2 (raw, test split; CC BY-SA 3.0) is the usual
# forgetting probe and needs the Hub and `datasets`; Python's own documentation (the English text of
# pydoc_data/topics.py, PSF License Version 2, like the rest of Python) ships with every Python, so the
# demo measures forgetting offline on text that is neither Dolly nor the demo data.
WIKITEXT = ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")


def _wikitext_text():
    name, config, split = WIKITEXT
    try:
        ensure_hub_reachable(name, kind="dataset")
        rows = _load_table(name, None, name, config=config, split=split)
    except (UsageError, ImportError) as error:
        raise UsageError(general_text_unavailable("wikitext-2", error)) from error
    return "".join(row["text"] for row in rows)


def general_text_unavailable(source, cause):
    """One line: the general text cannot be had, what it is for, and the two ways on."""
    cause = str(cause) if not isinstance(cause, ImportError) else f"{cause.name or cause} is not installed"
    return (f"--general-file {source}, the general text that measures forgetting, cannot be had: {cause}; "
            "pass --general-file FILE (a .txt or .jsonl file, or python-docs, which ships with Python) or "
            "--general-file '' to skip the forgetting measure")


def _python_docs_text():
    return "\n\n".join(pydoc_topics[key] for key in sorted(pydoc_topics))


GENERAL_SOURCES = {"wikitext-2": _wikitext_text, "python-docs": _python_docs_text}


def load_general_text(source):
    """The plain text that measures forgetting: a named source, a .txt file, or .jsonl/.json rows with a
    `text` field (joined by blank lines)."""
    if source in GENERAL_SOURCES:
        return GENERAL_SOURCES[source]()
    path = Path(source)
    if not path.is_file():
        raise UsageError(f"--general-file: use {' or '.join(GENERAL_SOURCES)}, or a .txt or .jsonl file; "
                         f"not found: {source}")
    if path.suffix.lower() in (".json", ".jsonl"):
        rows, _ = read_json_records(path)
        if not isinstance(rows, list) or not all(isinstance(row, dict) and isinstance(row.get("text"), str)
                                                 for row in rows):
            raise UsageError(f"--general-file {source}: every row needs a 'text' string")
        return "\n\n".join(row["text"] for row in rows)
    return path.read_text(encoding="utf-8")


def general_blocks(tokenizer, text, block_length, max_blocks=None, seed=42):
    """The text tokenized once without a chat template and cut into blocks of block_length tokens, each
    starting with the tokenizer's BOS (when it has one, unscored) so every text token is scored exactly
    once. Ids name the block's place and content, so runs on the same text and tokenizer pair up."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    tokens = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # no length warning: cut below
    step = block_length - len(bos)
    if step < 1 or len(tokens) < step + 1:
        raise UsageError(f"--general-file: the text has {len(tokens)} tokens, too few for one block of "
                         f"{block_length} (--max-length)")
    blocks = []
    for index, first in enumerate(range(0, len(tokens) - step + 1, step)):  # whole blocks only
        ids = bos + tokens[first:first + step]
        digest = hashlib.sha1(json.dumps(ids).encode()).hexdigest()[:8]
        labels = [IGNORE_INDEX] * len(bos) + ids[len(bos):]
        blocks.append({"id": f"general-{index:05d}-{digest}", "input_ids": ids, "attention_mask": [1] * len(ids),
                       "labels": labels})
    return take_subset(blocks, max_blocks, seed)


def load_general_examples(settings, tokenizer):
    """--general-file's blocks, read and tokenized before any model loads (None: not asked)."""
    if not settings.general_file:
        return None
    text = load_general_text(settings.general_file)
    return general_blocks(tokenizer, text, settings.max_length, settings.max_general_blocks, settings.split_seed)


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


# Positions projected onto the vocabulary at once while scoring: the largest logits tensor evaluation makes is
# LOGITS_BLOCK x vocabulary in fp32 (128 MB for Llama 3's 128,256 tokens), whatever the batch and length.
LOGITS_BLOCK = 256


def unwrap_distributed(model):
    """The model inside DDP, FSDP or DeepSpeed's engine (each keeps it in .module)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def score_positions(lm_head, hidden, targets, softcap=None):
    """Summed NLL and scored-token count per row: the vocabulary projection of a row's scored positions,
    LOGITS_BLOCK at a time, in the head's own precision, then log-softmax in fp32."""
    nll_sums, token_counts = [], []
    for row in range(hidden.shape[0]):
        keep = targets[row] != IGNORE_INDEX
        positions, row_targets = hidden[row, :-1][keep], targets[row][keep]
        nll = 0.0
        for first in range(0, len(row_targets), LOGITS_BLOCK):
            # .forward, not __call__: this runs inside the head's own pre-hook (see sequence_nll).
            logits = lm_head.forward(positions[first:first + LOGITS_BLOCK]).float()
            if softcap:  # Gemma 2's final logit soft-capping, which its forward applies after the head
                logits = torch.tanh(logits / softcap) * softcap
            nll += float(F.cross_entropy(logits, row_targets[first:first + LOGITS_BLOCK], reduction="sum"))
        nll_sums.append(nll)
        token_counts.append(int(keep.sum()))
    return nll_sums, token_counts


def sequence_nll(model, input_ids, attention_mask, labels):
    """Per-example summed NLL and scored-token counts for one padded batch (call under no_grad).

    The model runs its own forward (under FSDP or DeepSpeed every rank must, to gather weights), but its
    vocabulary projection is scored block by block from inside the head's forward pre-hook, while the
    head's weights are gathered, and the head itself then projects nothing: no logits tensor for the whole
    batch is ever made."""
    inner = unwrap_distributed(model)
    lm_head = inner.get_output_embeddings()
    softcap = getattr(inner.config, "final_logit_softcapping", None)
    scored = {}

    def score_then_skip(module, args):
        hidden = args[0]
        scored["rows"] = score_positions(module, hidden, labels[:, 1:], softcap)
        return (hidden[:, :0], *args[1:])

    handle = lm_head.register_forward_pre_hook(score_then_skip)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        handle.remove()
    if "rows" not in scored:
        raise RuntimeError(f"{type(inner).__name__}'s forward does not call its output embeddings "
                           "(get_output_embeddings()), so its logits cannot be scored block by block")
    return scored["rows"]


def no_autocast(device):
    """Evaluation runs in the weights' own precision, whatever autocast is around it."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)


def eval_precision(model):
    """How evaluation computed: the parameters' dtypes, no autocast, fp32 log-softmax over LOGITS_BLOCK
    positions at a time."""
    dtypes = sorted({str(parameter.dtype).removeprefix("torch.") for parameter in model.parameters()})
    return {"weights": dtypes, "autocast": False, "log_softmax": "float32", "logits_block": LOGITS_BLOCK}


def evaluate_perplexity(model, examples, pad_token_id, batch_size=8, device=None, seed=42, resamples=1000,
                        desc="evaluate"):
    """PPL = exp(sum NLL / sum scored tokens) over all examples, with a bootstrap 95% interval.

    Examples are sorted by length so batches carry little padding; padding and the prompt never
    count, so the batch size does not change the result.
    """
    if not examples:
        raise UsageError("nothing to evaluate: the evaluation set is empty after filtering")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]), reverse=True)
    per_example = [None] * len(examples)
    start = time.perf_counter()
    # not inference_mode: FSDP's gathered weights must stay ordinary tensors
    with torch.no_grad(), no_autocast(device):
        for first in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
            chunk = order[first:first + batch_size]
            batch = pad_batch([examples[i] for i in chunk], pad_token_id)
            batch = {key: value.to(device) for key, value in batch.items()}
            nll_sums, token_counts = sequence_nll(model, **batch)
            for i, nll, tokens in zip(chunk, nll_sums, token_counts, strict=True):
                per_example[i] = {"id": examples[i]["id"], "nll_sum": nll, "tokens": tokens}
    model.train(was_training)
    summary = summarize_nll(per_example, seed=seed, resamples=resamples)
    summary["eval_seconds"] = time.perf_counter() - start
    return summary


# What evaluate_model records of the general text, each as general_<name>.
GENERAL_FIELDS = ("perplexity", "perplexity_ci95", "eval_loss", "eval_tokens", "eval_examples", "per_example",
                  "eval_seconds")


def summarize_nll(per_example, seed=42, resamples=1000):
    nll = np.array([item["nll_sum"] for item in per_example], dtype=np.float64)
    tokens = np.array([item["tokens"] for item in per_example], dtype=np.float64)
    eval_tokens = int(tokens.sum())
    if eval_tokens == 0:
        raise UsageError("nothing to evaluate: no response tokens in the evaluation set")
    eval_loss = float(nll.sum() / eval_tokens)
    return {
        "perplexity": math.exp(eval_loss),
        "perplexity_ci95": perplexity_interval(nll, tokens, seed=seed, resamples=resamples),
        "eval_loss": eval_loss,
        "eval_tokens": eval_tokens,
        "eval_examples": len(per_example),
        "per_example": per_example,
    }


def bootstrap_examples(samples, statistic, seed=42, resamples=1000):
    """The project's one bootstrap over examples: scipy's percentile bootstrap, the examples (the rows of every
    array in `samples`) resampled together (paired), `statistic(*samples, axis=-1)` on each resample. Its draws,
    for interval(). One example has nothing to resample (scipy asks for two): its draws are the statistic."""
    samples = [np.asarray(sample, dtype=np.float64) for sample in samples]
    if len(samples[0]) < 2:
        return np.full(resamples, statistic(*samples, axis=-1))
    found = stats.bootstrap(samples, statistic, paired=True, vectorized=True, n_resamples=resamples,
                            method="percentile", rng=np.random.default_rng(seed))
    return found.bootstrap_distribution


def interval(draws, level=0.95):
    """The percentile interval of bootstrap draws (the examples' here, the seeds-then-examples' in lvf.statistics)."""
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(draws, tail)), float(np.percentile(draws, 100 - tail))]


def pooled_perplexity(nll_sums, token_counts, axis=-1):
    """exp(sum NLL / sum tokens), over the last axis (one resample per row)."""
    return np.exp(np.sum(nll_sums, axis=axis) / np.maximum(np.sum(token_counts, axis=axis), 1))


def perplexity_interval(nll_sums, token_counts, seed=42, resamples=1000, level=0.95):
    """Percentile bootstrap over examples of exp(sum NLL / sum tokens)."""
    return interval(bootstrap_examples([nll_sums, token_counts], pooled_perplexity, seed, resamples), level)
