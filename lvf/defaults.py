"""Each training script's defaults, in one place: its flags take them (lvf.lora, lvf.full), and the memory plan,
the study, bench/ and the tests read them here.

A typed, frozen object per script rather than the experiment file as the source: `python finetune.py` runs, and
--help shows every default, without any file; the plan and bench/ read them without parsing a command line; and
a name or type mistake here fails at import and under ruff, where a YAML value is checked only when a script
parses it. experiments/llama3-8b-dolly.yaml therefore names the write-up's experiment and repeats none of them.
The flags every script shares keep their defaults in lvf.settings. No torch here: report.py may read it too.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class LoraDefaults:
    """finetune.py's, where they differ from the shared flags': the write-up's adapters (r=16, alpha 32, dropout
    0.05 on q/k/v/o) at its learning rate."""

    learning_rate: float = 2e-4
    batch_size: int = 4
    grad_accum: int = 1
    lora_r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"
    use_dora: bool = False
    use_rslora: bool = False
    init_lora_weights: str = "true"


@dataclass(frozen=True)
class FullDefaults:
    """full_finetune.py's, where they differ from the shared flags'. 4 examples a step in one micro-batch: the
    optimizer step in backward (lvf.full) cannot accumulate gradients."""

    learning_rate: float = 1e-5
    batch_size: int = 4
    grad_accum: int = 1
    # fp32 master weights, bf16 compute (autocast, on by default on CUDA): in bf16 weights most AdamW updates at
    # lr 1e-5 are smaller than half a bf16 step of the weight and round away (README: memory per option).
    dtype: str = "float32"


LORA = LoraDefaults()
FULL = FullDefaults()
