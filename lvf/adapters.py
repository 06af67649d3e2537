"""LoRA adapters through peft: the configuration, adding them to a model, and peft's 4-bit preparation."""

from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

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
    """peft's recipe for training adapters on a 4-bit model: norms in fp32, input gradients on."""
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})
