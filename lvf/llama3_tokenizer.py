"""The real Llama 3 tokenizer, for the tests and bench/gpu_smoke.py, built from Meta's `llama-models` PyPI
package.

The package ships `llama_models/llama3/tokenizer.model` (tiktoken format, Meta Llama 3 Community
License); it is installed at test time and never committed. transformers' tiktoken converter turns
it into a fast tokenizer with the same special tokens and ids as Meta-Llama-3-8B-Instruct.
"""

import importlib.util
from pathlib import Path

import common

NUM_RESERVED_SPECIAL_TOKENS = 256
BOS_ID = 128000
EOT_ID = 128009


def special_tokens():
    # The order (and so the ids from 128000 up) of llama_models/llama3/tokenizer.py.
    names = [
        "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
        "<|eot_id|>", "<|python_tag|>",
    ]
    names += [f"<|reserved_special_token_{i}|>" for i in range(2, NUM_RESERVED_SPECIAL_TOKENS - len(names) + 2)]
    return names


def tokenizer_model_path():
    spec = importlib.util.find_spec("llama_models")
    if spec is None:
        raise RuntimeError("install Meta's llama-models package: pip install --no-deps llama-models")
    return Path(spec.submodule_search_locations[0]) / "llama3" / "tokenizer.model"


def build_llama3_tokenizer(output_dir):
    """Converts tokenizer.model to a transformers tokenizer with the official chat template."""
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
    from tiktoken.load import load_tiktoken_bpe
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = tokenizer_model_path()
    ranks = load_tiktoken_bpe(str(path))
    assert len(ranks) == BOS_ID, len(ranks)
    specials = special_tokens()
    backend = TikTokenConverter(vocab_file=str(path), pattern=MetaTokenizer.pat_str,
                                extra_special_tokens=specials).converted()
    # The Hub tokenizer.json's post-processor: plain tokenizer(text) calls (add_special_tokens=True)
    # start with <|begin_of_text|>, so a test can catch a BOS added twice.
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
                                      special_tokens=[("<|begin_of_text|>", BOS_ID)]),
    ])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                        eos_token="<|eot_id|>", chat_template=common.LLAMA3_CHAT_TEMPLATE)
    tokenizer.save_pretrained(output_dir)
    return tokenizer
