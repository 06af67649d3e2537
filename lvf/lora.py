"""LoRA and QLoRA as finetune.py runs them: its defaults and flags, its adapters, and the runtime it resolves (the
frozen base in bf16 under autocast). The script is the recipe; the study, bench/ and the memory plan read the
method here, never from the script."""

import dataclasses

import torch

from lvf import adapters, defaults, models, settings

OPTIMIZER = "adamw_torch"  # the adapters are small: plain AdamW, on every device


def parse_args(argv=None, about=None):
    """finetune.py's Settings from argv (about: its --help description; the study and the bench parse without)."""
    parser = settings.evaluation_parser(about, "lora")
    settings.add_training_flags(parser, "lora", learning_rate=defaults.LORA.learning_rate,
                                batch_size=defaults.LORA.batch_size, grad_accum=defaults.LORA.grad_accum)
    group = parser.add_argument_group("LoRA")
    group.add_argument("--lora-r", type=settings.positive_int, default=defaults.LORA.lora_r, help="LoRA rank")
    group.add_argument("--lora-alpha", type=settings.positive_float, default=defaults.LORA.lora_alpha,
                       help="LoRA alpha (scale alpha/r)")
    group.add_argument("--lora-dropout", type=settings.dropout_rate, default=defaults.LORA.lora_dropout,
                       help="dropout on the LoRA input")
    group.add_argument("--lora-targets", default=defaults.LORA.lora_targets,
                       help="comma-separated module names that get adapters, or all-linear (peft: every linear "
                            "layer but the output layer)")
    group.add_argument("--quantize", choices=["none", "4bit"], default="none",
                       help="4bit: QLoRA (NF4, double quantisation, bf16 compute; needs bitsandbytes)")
    group.add_argument("--use-dora", action="store_true", default=defaults.LORA.use_dora,
                       help="DoRA (peft): also trains a magnitude per output feature of each adapted module")
    group.add_argument("--use-rslora", action="store_true", default=defaults.LORA.use_rslora,
                       help="rank-stabilised LoRA (peft): scale alpha/sqrt(r) instead of alpha/r")
    group.add_argument("--init-lora-weights", choices=adapters.INIT_CHOICES, default=defaults.LORA.init_lora_weights,
                       help="peft's adapter init: true (A random, B zero), gaussian (A normal with sd 1/r), pissa "
                            "(A, B from the weight's top-r singular vectors, subtracted from the weight), olora "
                            "(from a QR decomposition, likewise); pissa and olora not with --quantize 4bit")
    args = settings.parse(parser, argv, sections=("shared", "training", "finetune"))
    if args.quantize == "4bit" and args.init_lora_weights in adapters.INITS_FROM_THE_WEIGHTS:
        # peft's PiSSA refuses 4-bit weights; OLoRA would factor the dequantised weights, and a QLoRA adapter is
        # scored again on its base loaded unquantised, where the init would find other factors.
        parser.error(f"--init-lora-weights {args.init_lora_weights} changes the base weights it starts from; it "
                     "cannot be combined with --quantize 4bit")
    return args


def lora_config(args):
    return adapters.lora_config(args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets,
                                use_dora=args.use_dora, use_rslora=args.use_rslora,
                                init_lora_weights=args.init_lora_weights)


def default_lora_config():
    """The adapters finetune.py adds when no LoRA flag is given."""
    return lora_config(defaults.LORA)


def resolve_runtime(args, device=None):
    """With --dtype auto and bf16 autocast on, the frozen base is held in bf16 while training, as on CUDA
    (where auto means bf16 anyway): it is never updated, and under autocast its matmuls run in bf16 either way.
    On a CPU the auto dtype is fp32, and there autocast re-cast every frozen weight to bf16 at each step and
    kept the copies for backward, and the residual stream stayed fp32 (bench/throughput.py measures the
    difference). The adapters stay fp32 (peft); QLoRA keeps its own dtypes. Evaluation then scores the adapters
    on the base in its own evaluation dtype (eval_dtype), as evaluate_base_model.py scores the base."""
    method = "qlora" if args.quantize == "4bit" else "lora"
    runtime = settings.training_runtime(args, method, optimizer=OPTIMIZER,
                                        optimizer_reason="the adapters are small: plain AdamW on every device",
                                        device=device)
    if args.dtype == "auto" and runtime.bf16_autocast and args.quantize == "none" and runtime.dtype != torch.bfloat16:
        runtime = dataclasses.replace(runtime, dtype=torch.bfloat16)
    return method, runtime


def add_adapters(model, args):
    model = adapters.add_adapters(model, lora_config(args), args.lora_targets)
    # The saved adapter (final and checkpoints) names its base as the user did: a preset or Hub id, not the
    # cache folder a preset resolves to.
    model.peft_config["default"].base_model_name_or_path = args.model
    return model


def meta_model(args):
    """The model as this run builds it, adapters included, on the meta device: for counts and the memory plan.
    peft would build the adapters of a meta base on the CPU and draw their initial values there (seconds for Llama 3
    8B's all-linear rank 256, and the draws the run's own adapters must get): they are built on the meta device too,
    under a forked random state all the same."""
    base = models.meta_model(models.model_config(args.model, args.trust_remote_code))
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return add_adapters(base, args)
