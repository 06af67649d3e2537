"""LoRA adapters through peft: the configuration, adding them to a model, and peft's 4-bit preparation."""

import copy
import warnings

from peft import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    prepare_model_for_kbit_training,
    set_peft_model_state_dict,
)

from lvf.errors import UsageError

# At every save (each checkpoint and the final adapter) peft checks whether the base model's vocabulary was
# resized, by reading config.json from base_model_name_or_path. Ours names the base as the user did (a preset, or
# a Hub id that HF_HUB_OFFLINE makes unreachable), so peft warned at every save that it could not check. The kit
# never resizes the vocabulary (padding reuses a token the tokenizer has), so there is nothing to find.
warnings.filterwarnings("ignore", message="Could not find a config file in .* - will assume that the vocabulary "
                        "was not modified", category=UserWarning)


# --init-lora-weights: peft's LoraConfig(init_lora_weights=...) values the kit offers. Left out: False (peft's
# debugging init), "eva", "corda", "lora_ga" and "loftq" (they need data or a config of their own),
# "pissa_niter_N" (a randomised SVD: evaluating the saved adapter again redoes the init on the base and would not
# find the same residual weights), "orthogonal" (creates the adapters in the base weights' dtype, bf16 while LoRA
# trains on a bf16 base) and "mica" (freezes lora_B: another count of trainable parameters).
INIT_CHOICES = ("true", "gaussian", "pissa", "olora")
# These subtract their initial adapter from the base weights (W - scale * B0 A0) from an SVD (PiSSA) or QR
# (OLoRA) of each weight. peft saves the adapter without the changed base and, on loading, redoes the init on the
# base it is given, which reproduces the residual as both factorisations are deterministic.
INITS_FROM_THE_WEIGHTS = ("pissa", "olora")


def init_lora_weights_value(name):
    """The flag's value as peft's LoraConfig takes it: True for "true", else the name."""
    if name not in INIT_CHOICES:
        raise UsageError(f"--init-lora-weights {name}: choose one of {', '.join(INIT_CHOICES)}")
    return True if name == "true" else name


def lora_config(rank, alpha, dropout, targets, use_dora=False, use_rslora=False, init_lora_weights="true"):
    """targets: comma-separated module names, or peft's "all-linear" (every linear layer but the output one).
    use_dora: DoRA (a trained magnitude per output feature of each adapted module, besides A and B); use_rslora:
    scale alpha/sqrt(r) instead of alpha/r; init_lora_weights: one of INIT_CHOICES. peft implements all three."""
    names = [name.strip() for name in targets.split(",") if name.strip()]
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules="all-linear" if names == ["all-linear"] else names,
                      bias="none", task_type="CAUSAL_LM", use_dora=use_dora, use_rslora=use_rslora,
                      init_lora_weights=init_lora_weights_value(init_lora_weights))


def for_counting(model, config):
    """The config to build adapters with on `model`: itself, except on the meta device (a dry run), where PiSSA's
    SVD and OLoRA's QR cannot run (the weights have no values; peft fails assigning the factors). There the
    adapters are built with peft's default init: an init sets values, never shapes or which parameters train,
    so the counts are the same."""
    on_meta = any(parameter.is_meta for parameter in model.parameters())
    if on_meta and config.init_lora_weights in INITS_FROM_THE_WEIGHTS:
        config = copy.deepcopy(config)
        config.init_lora_weights = True
    return config


def add_adapters(model, config, targets_flag):
    config = for_counting(model, config)
    try:
        with warnings.catch_warnings():
            # peft (0.21, peft_model.py PeftModel.__init__) reads model.is_gradient_checkpointing, which transformers
            # 5.23 deprecated (is_activation_checkpointing): a FutureWarning on every LoRA run that is peft's to
            # fix, not the user's. Only that message, only during this call, is ignored.
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
            return get_peft_model(model, config)
    except ValueError as error:  # e.g. --lora-targets that name no module of this model
        raise UsageError(f"--lora-targets {targets_flag}: {error}".splitlines()[0]) from error


def cast_adapter_inputs(model, enabled):
    """peft casts each adapter's input to the adapter's dtype (fp32) before its dropout and lora_A. Under bf16
    autocast, lora_A's matmul casts it straight back to bf16: two copies of the activation per adapted module
    each step, and the dropout in fp32; so training under autocast turns the cast off (enabled=False). Without
    autocast an fp32 lora_A cannot take a bf16 input, so scoring the trained model turns it on again."""
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = enabled


def on_another_base(trained, base):
    """The trained adapters (their values, copied) on another copy of their base model, e.g. one held in another
    dtype for evaluation; frozen, in eval mode."""
    # A copy: get_peft_model renames the config's base_model_name_or_path after `base` (a preset's cache folder),
    # and the trained model's config is the one its saved adapter records.
    config = copy.deepcopy(trained.peft_config["default"])
    config.base_model_name_or_path = None
    model = add_adapters(base, config, config.target_modules)
    set_peft_model_state_dict(model, get_peft_model_state_dict(trained))
    model.requires_grad_(False)
    return model.eval()


def keep_4bit_weights_unchanged(model):
    """Workaround for bitsandbytes (0.50) on CPUs with AVX512-BF16: Linear4bit.forward (nn/modules.py) repacks
    its weight for a fast CPU kernel at the first no-grad forward in eval mode (the Trainer's validation), and
    that repacking (functional.py, _convert_weight_packed_for_cpu) rounds the block scales (absmax) to bf16;
    saving a checkpoint (state_dict) undoes the packing but quantises the rounded scales again
    (_convert_weight_packed_for_cpu_inverse). So every validation + checkpoint changes the frozen base weights
    slightly, and a run resumed from a checkpoint (weights loaded afresh) trains on other base weights than
    the run that went on. Keeping the weights in their loaded format makes training and resuming exact.
    Found by the attribute (Linear4bit's own switch), so this module never imports bitsandbytes itself."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def prepare_for_4bit_training(model):
    """peft's recipe for training adapters on a 4-bit model: base weights frozen, and every weight that is not
    4-bit (norms, and also embed_tokens and lm_head) cast to fp32; peft 0.21 has no option to skip the cast. On
    Llama 3 8B that is +2.1 GB over bf16 (2 x 128,256 x 4,096 x 2 bytes); results record it in dtype_by_part.
    The 4-bit weights stay exactly as loaded (keep_4bit_weights_unchanged). Checkpointing is left to the Trainer, as for
    LoRA (training.checkpointing_arguments, non-reentrant, so no input gradients are needed): peft would turn it
    on through gradient_checkpointing_enable, deprecated in transformers 5.23."""
    keep_4bit_weights_unchanged(model)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def load_adapter(model, folder):
    """A saved adapter on its base model, for evaluation (weights frozen)."""
    return PeftModel.from_pretrained(model, str(folder), is_trainable=False)
