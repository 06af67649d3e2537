"""The memory plan: what a training run will hold on each GPU, computed before anything loads.

Computed from the model's shapes (a model on the meta device, or its config) and the run's dtypes, optimizer,
batch and checkpointing; nothing is measured here. Weights, gradients and optimizer states are exact byte counts
of what the libraries allocate (bitsandbytes' 8-bit blocks and NF4 constants included); autocast copies and
activations are estimates, on the conservative side.

A step does not hold everything at once, so the plan walks the moments of a step and reports the largest:

- end of forward: the loss is computed; autocast's cache holds a bf16 copy of every trainable fp32 linear weight;
  the logits are live; gradients exist only when accumulated over micro-batches;
- backward at the logits: the loss's gradient over the vocabulary;
- backward through the layers: all gradients (or, stepping in backward, the largest one); with checkpointing one
  decoder layer is recomputed at a time;
- end of backward (FSDP): the root unit's (embeddings, lm_head) gathered weights and unsharded gradients;
- optimizer step: weights, gradients and states, plus what the optimizer allocates while it steps (PyTorch's
  foreach AdamW: one temporary as large as one state; fused AdamW and bitsandbytes step tensor by tensor).

Under FSDP (FULL_SHARD, bf16 mixed precision) weights, gradients and states are divided by the number of GPUs,
compute runs on gathered bf16 copies (no autocast copies), and the gathered root unit and two decoder layers
(with their unsharded gradients) come on top. DDP adds one copy of the gradients (its buckets).

Activations (an estimate for Llama-style decoders; T = micro-batch x max length rounded up to 8, h hidden size,
h_kv key/value width, i intermediate size, L layers, V vocabulary; a = bytes of the compute dtype, 2 under bf16;
r = bytes of the residual stream, the embedding's dtype; c = 5 copies of the normalised input kept for the
matmuls when the residual stream is fp32 and compute bf16 (q, k, v, gate and up each keep their own cast), else
2), in bytes:

    per layer and token   A = 2(4 + r)h + a(c·h + 5h + 2h_kv + 4i)  [+ LoRA dropout: (a + 1) x adapted inputs]
    checkpoints           L·r·h·T with gradient checkpointing (each layer's input), else L·A·T
    recomputed layer      A·T + 2·r·h·T (the layer's activations and the gradient flowing through it; without
                          checkpointing only the gradient, 2·r·h·T)
    logits                end of forward (a + 4 + 4)·V·T under bf16 (the logits, their fp32 copy for the loss,
                          the saved log-softmax), 8·V·T in fp32; in backward 12·V·T (log-softmax, the loss's
                          gradient and the logits' gradient)

The logits term assumes every position is scored; the kit projects only scored positions (responses), so real
runs hold less there.
"""

import dataclasses
import math
import os
import sys

import torch

GIB = 2**30
GB = 10**9
FORMULA = ("A = 2(4+r)h + a(c·h + 5h + 2h_kv + 4i) per layer and token; activations = checkpoints "
           "(L·r·h·T with checkpointing, else L·A·T) + recomputed layer (A·T + 2r·h·T) + logits "
           "((a+8)·V·T at the end of forward under bf16, 8·V·T in fp32; 12·V·T in backward); "
           "T = micro-batch x max length (docs/performance.md)")
BNB_8BIT_MIN_SIZE = 4096  # bitsandbytes' min_8bit_size: smaller tensors keep fp32 states
BNB_8BIT_BLOCK = 256  # bitsandbytes' 8-bit optimizer block: one fp32 absmax per block, per state
BNB_PAGED_MIN_SIZE = 10**5  # bitsandbytes pages a state buffer only from this many elements
NF4_BLOCK, NF4_NESTED_BLOCK = 64, 256  # NF4 blocks, and the blocks of their 8-bit absmax (double quantisation)
NF4_PER_TENSOR = 16 * 4 + 4 + 256 * 4  # each tensor's fp32 16-entry code, fp32 offset and its nested absmax's code
BNB_QMAP_BYTES = 256 * 4  # each of an 8-bit optimizer's two quantisation maps (shared by all parameters)


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model, read from a model on the meta device (no weights)."""

    parameters: int  # all parameters (a tied weight once)
    trainable: int
    embedding: int  # input embeddings (nn.Embedding)
    linear: int  # weights of nn.Linear modules other than adapters, the output layer included
    output: int  # the output layer's weight (lm_head), tied or not
    output_tied: bool
    largest: int  # the largest single parameter
    largest_linear: int  # the largest nn.Linear weight below the output layer (QLoRA dequantises one at a time)
    quantized_tensors: int  # how many linear weights QLoRA would quantise (all but the output layer)
    nf4_bytes: int  # those weights in NF4 with double quantisation, each tensor's constants included
    adapters: int  # LoRA parameters (lora_A, lora_B)
    small_trainable: int  # trainable, not embeddings, in tensors under bitsandbytes' min_8bit_size (fp32 states)
    blocks_8bit: int  # 256-blocks of the other trainable tensors, embeddings apart (one fp32 absmax per state each)
    embedding_blocks_8bit: int  # 256-blocks of the trainable embeddings
    pageable_trainable: int  # trainable, not embeddings, in tensors bitsandbytes pages (at least 10^5 elements)
    adapter_inputs: int  # summed input width of the adapted modules whose LoRA has dropout
    adapter_rank_sum: int  # summed rank over adapted modules (lora_A's output width)
    layers: int
    hidden: int
    kv_width: int
    intermediate: int
    vocab: int

    @classmethod
    def from_model(cls, model):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = base.config.get_text_config()
        unique = {id(p): p for p in base.parameters()}
        adapter_ids = {id(p) for name, p in base.named_parameters() if "lora_" in name}
        embedding_ids = {id(m.weight) for m in base.modules() if isinstance(m, torch.nn.Embedding)}
        output_layer = base.get_output_embeddings()
        output_id = id(output_layer.weight) if output_layer is not None else None
        linear = {id(m.weight): m.weight for m in base.modules()
                  if isinstance(m, torch.nn.Linear) and id(m.weight) not in adapter_ids}
        inner = [w.numel() for key, w in linear.items() if key != output_id]
        adapter_inputs = adapter_ranks = 0
        for module in base.modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                adapter_ranks += module.lora_A["default"].out_features
                if not isinstance(module.lora_dropout["default"], torch.nn.Identity):
                    adapter_inputs += module.lora_A["default"].in_features
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            parameters=sum(p.numel() for p in unique.values()),
            trainable=sum(p.numel() for p in unique.values() if p.requires_grad),
            embedding=sum(unique[key].numel() for key in embedding_ids if key in unique),
            linear=sum(w.numel() for w in linear.values()),
            output=output_layer.weight.numel() if output_layer is not None else 0,
            output_tied=output_id in embedding_ids,
            largest=max(p.numel() for p in unique.values()),
            largest_linear=max(inner, default=0),
            quantized_tensors=len(inner),
            nf4_bytes=sum(nf4_tensor_bytes(numel) for numel in inner),
            adapters=sum(unique[key].numel() for key in adapter_ids),
            small_trainable=sum(p.numel() for key, p in unique.items() if p.requires_grad
                                and key not in embedding_ids and p.numel() < BNB_8BIT_MIN_SIZE),
            blocks_8bit=sum(math.ceil(p.numel() / BNB_8BIT_BLOCK) for key, p in unique.items() if p.requires_grad
                            and key not in embedding_ids and p.numel() >= BNB_8BIT_MIN_SIZE),
            embedding_blocks_8bit=sum(math.ceil(unique[key].numel() / BNB_8BIT_BLOCK) for key in embedding_ids
                                      if key in unique and unique[key].requires_grad),
            pageable_trainable=sum(p.numel() for key, p in unique.items() if p.requires_grad
                                   and key not in embedding_ids and p.numel() >= BNB_PAGED_MIN_SIZE),
            adapter_inputs=adapter_inputs,
            adapter_rank_sum=adapter_ranks,
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            kv_width=getattr(config, "num_key_value_heads", heads) * head_dim,
            intermediate=getattr(config, "intermediate_size", 4 * config.hidden_size),
            vocab=config.vocab_size,
        )


@dataclasses.dataclass(frozen=True)
class Setup:
    """How a run trains: method, dtypes, optimizer, batch, checkpointing and sharding."""

    method: str  # "lora", "qlora" or "full"
    weight_dtype: torch.dtype = torch.bfloat16  # the (base) weights while training; QLoRA: the non-4-bit ones are fp32
    optimizer: str = "adamw_torch"  # the Trainer's optim name
    bf16_autocast: bool = True
    gradient_checkpointing: bool = True
    micro_batch: int = 1
    max_length: int = 1024
    grad_accum: int = 1
    step_in_backward: bool = False  # the optimizer steps each parameter as its gradient arrives, then frees it
    embedding_states_fp32: bool = True  # the Trainer gives nn.Embedding 32-bit bitsandbytes states
    world_size: int = 1
    fsdp: bool = False  # FSDP FULL_SHARD with bf16 mixed precision (configs/fsdp_full_8b.yaml)
    cuda: bool = True  # bitsandbytes pages states only on CUDA


def dtype_bytes(dtype):
    return torch.empty((), dtype=dtype).element_size()


def nf4_tensor_bytes(numel):
    """One weight in NF4 with double quantisation (bitsandbytes 0.50): half a byte per weight, a uint8 absmax per
    64-block, an fp32 absmax per 256 of those, and the tensor's own codes (16 and 256 fp32 entries) and offset."""
    blocks = math.ceil(numel / NF4_BLOCK)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK) + NF4_PER_TENSOR


def optimizer_plan(shape, setup, trainable_bytes_per):
    """(state bytes, paged part of them, temporary bytes while stepping) for the trainable parameters."""
    name = setup.optimizer
    trainable = shape.trainable if setup.method == "full" else shape.adapters
    if "8bit" in name:
        # uint8 states and one fp32 absmax per 256-block of each, plus the two shared 256-entry fp32 maps; fp32
        # states for tensors under min_8bit_size, and for embeddings when the Trainer overrides them to 32 bits
        embedding = shape.embedding if setup.method == "full" else 0
        small = shape.small_trainable + (embedding if setup.embedding_states_fp32 else 0)
        blocks = shape.blocks_8bit + (0 if setup.embedding_states_fp32 else shape.embedding_blocks_8bit)
        states = 8 * small + 2 * (trainable - small) + 2 * 4 * blocks + 2 * BNB_QMAP_BYTES
        paged = 0
        if "paged" in name and setup.cuda:  # the states themselves are paged, their absmax blocks are not
            paged = 2 * shape.pageable_trainable + (8 if setup.embedding_states_fp32 else 2) * embedding
        return states, paged, 0
    if "32bit" in name:  # bitsandbytes 32-bit AdamW: fp32 states whatever the weights
        return 8 * trainable, (8 * trainable if "paged" in name and setup.cuda else 0), 0
    if name.startswith("adamw_torch") or name in ("adamw_hf", "adamw"):
        state = 2 * trainable * trainable_bytes_per
        fused = "fused" in name or setup.step_in_backward
        return state, 0, 0 if fused else trainable * trainable_bytes_per  # foreach: one state-sized temporary
    return None, 0, None


def shard(value, setup):
    return None if value is None else math.ceil(value / setup.world_size) if setup.fsdp else value


def plan_memory(shape, setup, device_total_bytes=None, device_name=None):
    """The plan for one GPU (one process): a JSON-ready dict, every part in bytes; see the module's docstring."""
    full = setup.method == "full"
    w = dtype_bytes(setup.weight_dtype)
    trainable = shape.trainable if full else shape.adapters
    grad_bytes_per = w if full else 4  # peft keeps adapters in fp32
    # --- weights
    if setup.method == "qlora":
        quantized = shape.linear - shape.output
        frozen = shape.parameters - shape.adapters - quantized
        weights = shape.nf4_bytes + 4 * frozen + 4 * shape.adapters
    elif setup.method == "lora":
        weights = w * (shape.parameters - shape.adapters) + 4 * shape.adapters
    else:
        weights = w * shape.parameters
    gradients_full = grad_bytes_per * trainable
    states, paged, step_temporary = optimizer_plan(shape, setup, grad_bytes_per)
    if setup.step_in_backward:  # a gradient lives only until its parameter is stepped
        gradients_full = grad_bytes_per * (shape.largest if full else trainable)
    ddp_buckets = gradients_full if setup.world_size > 1 and not setup.fsdp else 0
    weights, gradients_full, states, paged = (shard(v, setup) for v in (weights, gradients_full, states, paged))
    step_temporary = shard(step_temporary, setup)
    # --- dtypes of what flows through the layers
    residual = 2 if setup.fsdp else (4 if setup.method == "qlora" else w)
    compute = 2 if (setup.bf16_autocast or setup.fsdp or w == 2) else 4
    copies_per_input = 5 if (residual == 4 and compute == 2) else 2
    # --- autocast copies (bf16 casts of fp32 weights, kept by autocast's cache or for backward)
    linear_per_layer = (shape.linear - shape.output) // max(shape.layers, 1)
    fp32_linears = setup.bf16_autocast and not setup.fsdp and (w == 4 or setup.method == "qlora")
    output_copy = 2 * shape.output if fp32_linears else 0
    if setup.method == "qlora":  # the frozen fp32 lm_head is cast at each use; one 4-bit weight dequantised at a time
        copies_forward = copies_backward = output_copy + 2 * shape.largest_linear
    elif fp32_linears and full:  # autocast caches a copy of every trainable fp32 weight it casts, until forward ends
        copies_forward = 2 * shape.linear
        copies_backward = output_copy + (2 * linear_per_layer if setup.gradient_checkpointing else 2 * shape.linear)
    elif fp32_linears:  # frozen fp32 base: cast at each use, kept for backward per layer
        copies_forward = output_copy + 2 * linear_per_layer * (1 if setup.gradient_checkpointing else shape.layers)
        copies_backward = copies_forward
    else:
        copies_forward = copies_backward = 0
    adapter_copies = 2 * shape.adapters if setup.bf16_autocast and setup.method != "full" else 0
    copies_forward += adapter_copies
    copies_backward += adapter_copies
    # --- FSDP: bf16 copies of the units it gathers (the root, embeddings and lm_head, stays gathered from forward
    # through backward; two decoder layers at a time with backward prefetch), and their unsharded gradients
    if setup.fsdp:
        root = shape.parameters - (shape.linear - shape.output) - 2 * shape.layers * shape.hidden
        layer_unit = linear_per_layer + 2 * shape.hidden
        gathered_forward = 2 * root + 2 * 2 * layer_unit
        gathered_backward = 2 * root + 2 * 2 * layer_unit + 2 * 2 * layer_unit  # + unsharded bf16 gradients
        gathered_end = 2 * root + 2 * root  # the root's parameters and its unsharded gradients, last
    else:
        gathered_forward = gathered_backward = gathered_end = 0
    # --- activations
    tokens = setup.micro_batch * 8 * math.ceil(setup.max_length / 8)
    h, L = shape.hidden, shape.layers
    per_token_layer = (2 * (4 + residual) * h
                       + compute * (copies_per_input * h + 5 * h + 2 * shape.kv_width + 4 * shape.intermediate))
    if setup.method != "full":
        per_token_layer += ((compute + 1) * shape.adapter_inputs + compute * shape.adapter_rank_sum) // max(L, 1)
    if setup.gradient_checkpointing:
        checkpoints = L * residual * h * tokens
        layer_in_backward = per_token_layer * tokens + 2 * residual * h * tokens
    else:
        checkpoints = L * per_token_layer * tokens
        layer_in_backward = 2 * residual * h * tokens
    logits_forward = (compute + (4 if compute != 4 else 0) + 4) * shape.vocab * tokens
    logits_backward = 12 * shape.vocab * tokens
    held_gradients = gradients_full if setup.grad_accum > 1 and not setup.step_in_backward else 0

    def moment(gradients, copies, gathered, activations, temporary=0):
        parts = {"weights": weights, "gradients": gradients + ddp_buckets, "optimizer_states": states,
                 "optimizer_temporary": temporary, "autocast_copies": copies, "gathered_weights": gathered,
                 "activations": activations}
        return {**parts, "total": None if states is None else sum(parts.values())}

    moments = {
        "end of forward": moment(held_gradients, copies_forward, gathered_forward, checkpoints + logits_forward),
        "backward at the logits": moment(held_gradients, copies_backward, gathered_forward,
                                         checkpoints + logits_backward),
        "backward through the layers": moment(gradients_full, copies_backward - output_copy, gathered_backward,
                                              checkpoints + layer_in_backward),
    }
    if setup.fsdp:
        moments["end of backward"] = moment(gradients_full, 0, gathered_end, 0)
    moments["optimizer step"] = moment(0 if setup.step_in_backward else gradients_full, 0, 0, 0, step_temporary or 0)
    if states is None:
        peak_at, peak = None, dict.fromkeys(moments["optimizer step"])
    else:
        peak_at = max(moments, key=lambda name: moments[name]["total"])
        peak = moments[peak_at]
    fits = None if device_total_bytes is None or peak["total"] is None else peak["total"] <= device_total_bytes
    return {
        **peak,
        "peak_at": peak_at,
        "paged_optimizer_states": paged,
        "moments": moments,
        "setup": {**{key: value for key, value in dataclasses.asdict(setup).items() if key != "weight_dtype"},
                  "weight_dtype": str(setup.weight_dtype).removeprefix("torch.")},
        "activations_formula": FORMULA,
        "computed": "from the model's shapes and dtypes, not measured; autocast copies and activations are "
                    "conservative estimates" + ("" if states is not None else
                                                f"; optimizer {setup.optimizer!r} is not planned"),
        "device_name": device_name,
        "device_total_bytes": device_total_bytes,
        "fits": fits,
        "suggestions": [],
    }


# --------------------------------------------------------------------------- what would fit


def candidate_changes(setup):
    """(flags, changed setup) pairs a user can try, each one change to the command line away."""
    changes = []
    if setup.micro_batch > 1:
        smaller = max(1, setup.micro_batch // 2)
        if setup.step_in_backward:  # cannot accumulate: fewer examples per step
            changes.append((f"--batch-size {smaller}", dataclasses.replace(setup, micro_batch=smaller)))
        else:
            accum = setup.grad_accum * setup.micro_batch // smaller
            changes.append((f"--batch-size {smaller} --grad-accum {accum}",
                            dataclasses.replace(setup, micro_batch=smaller, grad_accum=accum)))
    if setup.max_length > 512:
        changes.append(("--max-length 512", dataclasses.replace(setup, max_length=512)))
    if not setup.gradient_checkpointing:
        changes.append(("--gradient-checkpointing on", dataclasses.replace(setup, gradient_checkpointing=True)))
    if setup.method == "lora":
        changes.append(("--quantize 4bit", dataclasses.replace(setup, method="qlora")))
    if setup.method == "full":
        single = not setup.fsdp and setup.world_size == 1
        if single and not setup.step_in_backward:  # full_finetune.py's --optim-in-backward: one micro-batch a step
            batch = setup.micro_batch * setup.grad_accum
            flags = "" if setup.grad_accum == 1 else f"--batch-size {batch} --grad-accum 1 "
            flags += "--optim-in-backward on"
            changes.append((flags, dataclasses.replace(setup, step_in_backward=True, micro_batch=batch, grad_accum=1)))
        if setup.weight_dtype != torch.bfloat16:
            changes.append(("--dtype bfloat16", dataclasses.replace(setup, weight_dtype=torch.bfloat16)))
        if setup.optimizer == "adamw_torch":
            changes.append(("--optim adamw_torch_fused", dataclasses.replace(setup, optimizer="adamw_torch_fused")))
        if "8bit" not in setup.optimizer and single:
            changes.append(("--optim paged_adamw_8bit", dataclasses.replace(setup, optimizer="paged_adamw_8bit")))
        if single:
            for gpus in (2, 4, 8):
                changes.append((f"accelerate launch --config_file configs/fsdp_full_8b.yaml --num_processes {gpus} "
                                "full_finetune.py",
                                dataclasses.replace(setup, fsdp=True, world_size=gpus, optimizer="adamw_torch",
                                                    step_in_backward=False)))
    return changes


def suggestions(shape, setup, device_total_bytes, limit=4):
    """Flag changes (one, else two combined) under which the plan fits the device, smallest change first."""
    fitting = []
    singles = candidate_changes(setup)
    for flags, changed in singles:
        total = plan_memory(shape, changed)["total"]
        sharded_already = changed.fsdp and any(other.startswith("accelerate") for other, _ in fitting)
        if total is not None and total <= device_total_bytes and not sharded_already:  # the fewest GPUs that fit
            fitting.append((flags, total))
    if not fitting:
        for index, (flags, changed) in enumerate(singles):
            for more_flags, _ in singles[index + 1:]:
                combined = dict(candidate_changes(changed)).get(more_flags)
                total = None if combined is None else plan_memory(shape, combined)["total"]
                if total is not None and total <= device_total_bytes and "accelerate" not in flags + more_flags:
                    fitting.append((f"{flags} {more_flags}", total))
    return fitting[:limit]


# --------------------------------------------------------------------------- entry points and formatting


def setup_for_run(settings, runtime, method, step_in_backward=False):
    """The Setup of a script's run, from its Settings and Runtime (see finetune.py and full_finetune.py). The
    optimizer steps in backward when step_in_backward is given or the runtime says so (`optimizer_in_backward`)."""
    step_in_backward = step_in_backward or bool(getattr(runtime, "optimizer_in_backward", False))
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    checkpointing = runtime.gradient_checkpointing or os.environ.get("FSDP_ACTIVATION_CHECKPOINTING") == "true"
    return Setup(method=method, weight_dtype=runtime.dtype, optimizer=runtime.optimizer or "adamw_torch",
                 bf16_autocast=runtime.bf16_autocast, gradient_checkpointing=checkpointing,
                 micro_batch=settings.batch_size, max_length=settings.max_length, grad_accum=settings.grad_accum,
                 step_in_backward=step_in_backward, world_size=runtime.world_size, fsdp=fsdp,
                 cuda=runtime.device == "cuda")


def cuda_device():
    """(total bytes, name) of this process's GPU, or (None, None) without CUDA."""
    if not torch.cuda.is_available():
        return None, None
    index = int(os.environ.get("LOCAL_RANK", "0"))
    properties = torch.cuda.get_device_properties(index)
    return properties.total_memory, properties.name


def plan_for_run(settings, runtime, method, model, step_in_backward=False):
    """The planned_memory record of a script's run: `model` is the model on the meta device as the run builds it
    (with its adapters for LoRA and QLoRA; models.meta_model of the config otherwise), or the loaded model.
    Compared against this process's GPU when CUDA is present, with the flags that would fit when it is not."""
    shape = ModelShape.from_model(model)
    setup = setup_for_run(settings, runtime, method, step_in_backward)
    total_bytes, name = cuda_device() if runtime.device == "cuda" else (None, None)
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    planned = plan_memory(shape, setup, None if deepspeed else total_bytes, name)
    if deepspeed:  # ZeRO-3's partitioning is not modelled: say so rather than compare the wrong figures
        planned["computed"] += "; DeepSpeed's partitioning is not planned: these are one unsharded process's figures"
    if planned["fits"] is False:
        planned["suggestions"] = [flags for flags, _ in suggestions(shape, setup, total_bytes)]
    return planned


def announce_plan(settings, runtime, method, model, step_in_backward=False):
    """What a script calls at a dry run and at the start of a real run, before the weights load: computes the
    plan, prints its line (and the warning when it exceeds the GPU) on the main process, returns the record."""
    from lvf.results import is_main_process

    planned = plan_for_run(settings, runtime, method, model, step_in_backward)
    if is_main_process():
        report_plan(planned)
    return planned


GPU_PLAN_BYTES = 80 * 10**9  # the GPU a dry run without one plans for: an 80 GB A100 or H100


def announce_gpu_plan(settings, runtime, method, model, resolve_runtime):
    """On a machine without CUDA where the user did not ask for the CPU, a dry run also prints the plan of these
    flags on one 80 GB GPU, resolved by the method's own resolve_runtime(settings, device) (lvf.lora's or
    lvf.full's): what the run would need where it is meant to run. Returns that plan, or None."""
    if runtime.device != "cpu" or getattr(settings, "device", "auto") != "auto":
        return None
    _, on_gpu = resolve_runtime(settings, device="cuda")
    shape, setup = ModelShape.from_model(model), setup_for_run(settings, on_gpu, method)
    planned = plan_memory(shape, setup, GPU_PLAN_BYTES, "an 80 GB GPU")
    from lvf.precision import scored_in
    from lvf.results import is_main_process

    if is_main_process():  # and how the run would be scored there, in the words of every script's dry run
        print(f"on one 80 GB CUDA GPU these flags would plan: {format_plan(planned)}; {scored_in(on_gpu)}",
              file=sys.stderr)
    return planned


def gib(value):
    return "?" if value is None else f"{value / GIB:.1f}"


PART_NAMES = {"weights": "weights", "gradients": "gradients", "optimizer_states": "optimizer states",
              "optimizer_temporary": "optimizer step's temporary", "autocast_copies": "autocast copies",
              "gathered_weights": "FSDP gathered weights", "activations": "activations"}


def format_plan(planned):
    """One line in GiB: 'planned memory per GPU (computed, not measured; peak: end of forward): 29.9 weights + ...
    = 95.4 GiB of 79.6 GiB (NVIDIA H100 80GB HBM3); 17.9 GiB of the states paged'."""
    shown = [f"{gib(planned[key])} {label}" for key, label in PART_NAMES.items()
             if planned.get(key) or key in ("weights", "activations")]
    where = f"; peak: {planned['peak_at']}" if planned.get("peak_at") else ""
    device = ""
    if planned.get("device_total_bytes") is not None:
        device = f" of {gib(planned['device_total_bytes'])} GiB ({planned['device_name']})"
    paged = planned.get("paged_optimizer_states")
    paged_note = f"; {gib(paged)} GiB of the states paged" if paged else ""
    return (f"planned memory per GPU (computed, not measured{where}): " + " + ".join(shown)
            + f" = {gib(planned['total'])} GiB{device}{paged_note}")


def warning_line(planned):
    """None when the plan fits or no GPU is known; else a warning that names flags that would fit."""
    if planned.get("fits") is not False:
        return None
    line = (f"warning: the planned {gib(planned['total'])} GiB exceeds this GPU's "
            f"{gib(planned['device_total_bytes'])} GiB")
    if planned["suggestions"]:
        return line + "; planned to fit: " + " | ".join(planned["suggestions"])
    return line + "; no single flag change is planned to fit (see docs/performance.md)"


def report_plan(planned, stream=None):
    """Prints the plan's line, and the warning when it does not fit (main process only is the caller's job)."""
    stream = stream or sys.stderr
    print(format_plan(planned), file=stream, flush=True)
    warning = warning_line(planned)
    if warning is not None:
        print(warning, file=stream, flush=True)


# --------------------------------------------------------------------------- several GPUs, for docs/multi-gpu.md
