import contextlib
import ctypes
import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import pytest
from filelock import FileLock

os.environ["HF_HUB_OFFLINE"] = "1"  # any Hub call fails at once instead of waiting on the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
PROJECT_DIR = Path(__file__).resolve().parents[1]

# glibc's malloc maps every block over 32 MiB (the tiny models' logits over Llama 3's 128,256-token vocabulary) with
# mmap and unmaps it when freed, so each step faults those pages in afresh: a third of a tiny run's time went to the
# kernel. Freed memory stays in the heap instead (no mmap, trimmed only above 2 GiB) in
# the test processes (mallopt) and in the processes they start (glibc reads these variables at a process's start),
# unless the environment sets either already. lvf.memory's malloc_trim between phases still hands the freed pages back
# to the system; the largest test process stays under 3.5 GB.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
HEAP_SETTINGS = {"MALLOC_MMAP_MAX_": (M_MMAP_MAX, 0), "MALLOC_TRIM_THRESHOLD_": (M_TRIM_THRESHOLD, 2**31 - 1)}
if not any(name in os.environ for name in HEAP_SETTINGS):
    os.environ.update({name: str(value) for name, (_, value) in HEAP_SETTINGS.items()})
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to tune
        libc = ctypes.CDLL("libc.so.6")
        for option, value in HEAP_SETTINGS.values():
            libc.mallopt(option, value)

import torch  # noqa: E402

torch.set_num_threads(1)  # two threads collapse when another process is busy

DEMO_RECORDS = PROJECT_DIR / "data" / "demo.jsonl"
REAL_DOLLY = PROJECT_DIR.parent / "shared" / "dolly" / "dolly-subset.jsonl"


@pytest.fixture(scope="session")
def records_path():
    """Instruction records in Dolly's schema that ship with the project (original text, ours to commit)."""
    return DEMO_RECORDS


@pytest.fixture(scope="session")
def real_dolly_path():
    """Real Dolly records, kept outside the repository (CC BY-SA 3.0): CI has them beside the clone,
    a user's clone does not, so tests that need what only real data has are skipped there."""
    if not REAL_DOLLY.is_file():
        pytest.skip(f"real Dolly records not found at {REAL_DOLLY} (CI provides them)")
    return REAL_DOLLY


# The files that take longest, longest first (from a full run's --durations; docs/testing.md). make test runs
# pytest-xdist with --dist loadfile --no-loadscope-reorder: it hands out whole files in this order, so the long
# ones start at once, side by side, and the short ones fill in behind them (xdist's own order is by test count,
# which would start a 1-test file of 2.5 minutes last).
LONGEST_FILES = ["test_gpu_smoke.py", "test_resume.py", "test_scheduling.py", "test_report.py", "test_study.py",
                 "test_end_to_end.py", "test_evaluate_artifacts.py", "test_errors.py", "test_distributed.py",
                 "test_fsdp_loading.py", "test_benchmark_checks.py", "test_lora_variants.py", "test_full_precision.py"]


def pytest_collection_modifyitems(items):
    """A test that reads the session's trained runs is slow: the first one to ask trains them. The longest files
    come first (LONGEST_FILES), each file's tests in their own order."""
    for item in items:
        if "trained_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    rank = {name: position for position, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def shared_folder(tmp_path_factory):
    """A folder every pytest process of this session sees: with pytest-xdist, the parent of the workers' own
    temporary folders (`.../pytest-N/`); in one process, that process's own."""
    own = tmp_path_factory.getbasetemp()
    return own.parent if os.environ.get("PYTEST_XDIST_WORKER") else own


def built_once(folder, build):
    """folder, built by build(folder) in whichever pytest process asks first; the others wait for it (a file lock)
    and then read it. A folder left half-built (a process killed while building) is built again."""
    done = folder / ".built"
    with FileLock(f"{folder}.lock"):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def llama3_tokenizer_dir(tmp_path_factory):
    from lvf.llama3_tokenizer import build_llama3_tokenizer

    return built_once(shared_folder(tmp_path_factory) / "llama3-tokenizer", build_llama3_tokenizer)


@pytest.fixture(scope="session")
def llama3_tokenizer(llama3_tokenizer_dir):
    from transformers import AutoTokenizer

    import common

    return common.setup_tokenizer(AutoTokenizer.from_pretrained(llama3_tokenizer_dir))


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    values = dict(vocab_size=128256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  bos_token_id=128000, eos_token_id=128009, tie_word_embeddings=True)
    values.update(overrides)
    return LlamaConfig(**values)


def save_tiny_llama(folder, tokenizer_dir, **overrides):
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(**overrides)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, llama3_tokenizer_dir):
    """A tiny random Llama with the real Llama 3 tokenizer, saved like a Hub model folder."""
    return built_once(shared_folder(tmp_path_factory) / "tiny-llama",
                      lambda folder: save_tiny_llama(folder, llama3_tokenizer_dir))


@pytest.fixture(scope="session")
def tiny_llama_64_dir(tmp_path_factory, llama3_tokenizer_dir):
    """Layer sizes that are multiples of 64 (bitsandbytes' 4-bit blocks on CPU)."""
    return built_once(shared_folder(tmp_path_factory) / "tiny-llama-64",
                      lambda folder: save_tiny_llama(folder, llama3_tokenizer_dir, hidden_size=64,
                                                     intermediate_size=128, num_attention_heads=4,
                                                     num_key_value_heads=4))


# The session's trained runs: each script run once, in-process, on tiny_llama_64_dir and the demo records, by
# whichever pytest process asks first (docs/testing.md, "The trained runs"). Flags after the model and data.
SMALL_EVAL = ["--max-eval-samples", "12", "--max-length", "256", "--eval-batch-size", "4",
              "--general-file", "python-docs", "--max-general-blocks", "6"]
SMALL_TRAINING = [*SMALL_EVAL, "--max-train-samples", "24", "--max-val-samples", "6", "--max-steps", "4",
                  "--eval-steps", "2"]
SHORT_TRAINING = [*SMALL_EVAL, "--max-train-samples", "8", "--max-val-samples", "2", "--max-steps", "2",
                  "--eval-steps", "2"]
# base, lora and full also score the project's own lm-eval task on its first BENCHMARK_LIMIT items
# (tests/test_benchmarks.py checks them against lm_eval's own run of the saved models).
BENCHMARK_TASKS_DIR = PROJECT_DIR / "data" / "benchmarks"
BENCHMARK_LIMIT = 12
BENCHMARK = ["--benchmarks", "demo_mc", "--benchmark-tasks-dir", str(BENCHMARK_TASKS_DIR), "--benchmark-limit",
             str(BENCHMARK_LIMIT), "--benchmark-batch-size", "4"]
TRAINED_RUNS = {
    "base": ("evaluate_base_model", [*SMALL_EVAL, "--seed-style-metric", *BENCHMARK]),
    # Checkpointing on where it goes through another call (the Trainer's, or peft's for 4-bit): the quiet-run
    # tests read these runs' warnings.
    "lora": ("finetune", [*SMALL_TRAINING, "--learning-rate", "5e-2", "--gradient-checkpointing", "on",
                          *BENCHMARK]),
    "qlora": ("finetune", [*SMALL_TRAINING, "--learning-rate", "5e-2", "--gradient-checkpointing", "on",
                           "--quantize", "4bit"]),
    "full": ("full_finetune", [*SMALL_TRAINING, "--learning-rate", "1e-3", *BENCHMARK]),  # checkpointing off: the
    # CPU default
    # As on a CPU with AMX or AVX512-BF16 (--bf16-autocast auto turns it on there): LoRA trains on a bf16 base.
    # These two check the dtypes each part is trained and scored in, not what training does: two steps.
    "lora-bf16-autocast": ("finetune", [*SHORT_TRAINING, "--learning-rate", "5e-2", "--bf16-autocast", "on"]),
    # --dtype and --eval-dtype bfloat16 (CUDA's auto): the trained model itself is scored, in bf16, without autocast.
    "lora-bf16-weights": ("finetune", [*SHORT_TRAINING, "--learning-rate", "5e-2", "--dtype", "bfloat16",
                                       "--eval-dtype", "bfloat16", "--bf16-autocast", "on"]),
}


class TrainedRun:
    """One of TRAINED_RUNS, finished: its results JSON, its --output-dir, and what it warned or logged."""

    def __init__(self, folder):
        self.folder = folder
        self.results_path = folder / "results.json"
        self.output_dir = folder / folder.name  # the name the saved folders are scored under (eval-<name>-final)
        self.results = json.loads(self.results_path.read_text())
        self.output = (folder / "output.txt").read_text()  # what it printed, stdout and stderr
        recorded = json.loads((folder / "recorded.json").read_text())
        self.warnings, self.notices = recorded["warnings"], recorded["notices"]


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


# In the environment of every trained run: tests/test_safety.py checks it reaches no file and no output of theirs.
SESSION_SECRET = "hf_TrainedRunsSecretNotARealToken42"


def run_recorded(name, model_dir, records_path, folder):
    """Runs one of TRAINED_RUNS in this process as the command line would, recording every warning (filters
    reset to "always"), the transformers logger's warnings (they do not reach the root logger) and what it
    printed (output.txt), with SESSION_SECRET as HF_TOKEN."""
    import importlib

    module, flags = TRAINED_RUNS[name]
    argv = ["--model", str(model_dir), "--dataset", str(records_path), *flags,
            "--output", str(folder / "results.json")]
    if module != "evaluate_base_model":
        argv += ["--output-dir", str(folder / name)]
    notices = Recorder()
    logging.getLogger("transformers").addHandler(notices)
    token = os.environ.get("HF_TOKEN")
    os.environ["HF_TOKEN"] = SESSION_SECRET
    try:
        with (open(folder / "output.txt", "w") as output, contextlib.redirect_stdout(output),
              contextlib.redirect_stderr(output), warnings.catch_warnings(record=True) as caught):
            warnings.simplefilter("always")
            importlib.import_module(module).main(argv)
    finally:
        logging.getLogger("transformers").removeHandler(notices)
        if token is None:
            del os.environ["HF_TOKEN"]
        else:
            os.environ["HF_TOKEN"] = token
    recorded = {"warnings": [{"categories": [kind.__name__ for kind in item.category.__mro__],
                              "message": str(item.message)} for item in caught],
                "notices": notices.messages}
    (folder / "recorded.json").write_text(json.dumps(recorded))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_llama_64_dir):
    """trained_run(name) -> TrainedRun: the run trained once per test session, shared by every pytest process."""
    shared = shared_folder(tmp_path_factory) / "trained"

    def get(name):
        folder = built_once(shared / name, lambda where: run_recorded(name, tiny_llama_64_dir, DEMO_RECORDS, where))
        return TrainedRun(folder)

    return get
