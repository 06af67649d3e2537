"""LoRA adapters through peft: the configuration, adding them to a model, and peft's 4-bit preparation."""

from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

from lvf.errors import UsageError


def lora_config(rank, alpha, dropout, targets):
    """targets: comma-separated module names, or peft's "all-linear" (every linear layer but the output one)."""
    names = [name.strip() for name in targets.split(",") if name.strip()]
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules="all-linear" if names == ["all-linear"] else names,
                      bias="none", task_type="CAUSAL_LM")


def add_adapters(model, config, targets_flag):
    try:
        return get_peft_model(model, config)
    except ValueError as error:  # e.g. --lora-targets that name no module of this model
        raise UsageError(f"--lora-targets {targets_flag}: {error}".splitlines()[0]) from error


def prepare_for_4bit_training(model, gradient_checkpointing):
    """peft's recipe for training adapters on a 4-bit model: input gradients on, and every weight that is not
    4-bit (norms, and also embed_tokens and lm_head) cast to fp32; peft 0.21 has no option to skip the cast. On
    Llama 3 8B that is +2.1 GB over bf16 (2 x 128,256 x 4,096 x 2 bytes); results record it in dtype_by_part."""
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})


def load_adapter(model, folder):
    """A saved adapter on its base model, for evaluation (weights frozen)."""
    return PeftModel.from_pretrained(model, str(folder), is_trainable=False)
