import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # any Hub call fails at once instead of waiting on the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
PROJECT_DIR = Path(__file__).resolve().parents[1]

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


@pytest.fixture(scope="session")
def llama3_tokenizer_dir(tmp_path_factory):
    from lvf.llama3_tokenizer import build_llama3_tokenizer

    folder = tmp_path_factory.mktemp("llama3-tokenizer")
    build_llama3_tokenizer(folder)
    return folder


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


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, llama3_tokenizer_dir):
    """A tiny random Llama with the real Llama 3 tokenizer, saved like a Hub model folder."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(folder)
    AutoTokenizer.from_pretrained(llama3_tokenizer_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_64_dir(tmp_path_factory, llama3_tokenizer_dir):
    """Layer sizes that are multiples of 64 (bitsandbytes' 4-bit blocks on CPU)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama-64")
    config = tiny_llama_config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(llama3_tokenizer_dir).save_pretrained(folder)
    return folder
