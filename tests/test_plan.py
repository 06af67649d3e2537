"""The memory plan (lvf.plan): computed before anything loads. The 8B plans' weights, gradients and optimizer
states are pinned to what the exact parameter counts imply; on a tiny model the plan's exact parts equal what a
real step holds on the CPU; a plan above the GPU names flags that fit."""

import dataclasses
import math
import re

import pytest
import torch
from conftest import PROJECT_DIR, tiny_llama_config
from test_memory import trained_breakdown
from transformers import LlamaForCausalLM

import finetune
import full_finetune
from lvf import docs_blocks, docs_tables, full, lora, models, plan

GIB = 2**30
N = 8_030_261_248  # Llama-3-8B's parameters
A = 13_631_488  # LoRA r=16 on q/k/v/o
E = 525_336_576  # the embedding, and lm_head: 128,256 x 4,096 each
NORMS = 65 * 4_096  # two per layer and the final one
LINEAR = N - E - NORMS  # every linear weight, lm_head included
QUANTIZED = LINEAR - E  # what QLoRA quantises: 224 matrices
AFTER_BACKWARD = dict(step_in_backward=False, micro_batch=2, grad_accum=2)  # the scheme (a): gradients held
PAGED_8BIT_STATES = 8 * E + 2 * (N - E) + 2 * 4 * (N - E) // 256 + 2 * 256 * 4  # embedding in fp32 (the Trainer)


@pytest.fixture(scope="module")
def full_shape():
    return plan.ModelShape.from_model(models.meta_model(models.model_config(models.DEFAULT_MODEL)))


@pytest.fixture(scope="module")
def lora_shape():
    meta = models.meta_model(models.model_config(models.DEFAULT_MODEL))
    return plan.ModelShape.from_model(lora.add_adapters(meta, finetune.parse_args([])))


def cuda_defaults(method, **changes):
    """The scripts' defaults as they resolve on one CUDA GPU (bf16 autocast and gradient
    checkpointing on; full fine-tuning steps paged 8-bit AdamW in backward, batch 4)."""
    if method == "full":
        values = dict(weight_dtype=torch.float32, optimizer="paged_adamw_8bit", micro_batch=4, grad_accum=1,
                      step_in_backward=True)
    else:
        values = dict(weight_dtype=torch.bfloat16, optimizer="adamw_torch", micro_batch=4, grad_accum=1)
    return plan.Setup(method=method, **{**values, **changes})


def test_the_shapes_are_llama_3_8b(full_shape, lora_shape):
    assert (full_shape.parameters, full_shape.embedding, full_shape.output, full_shape.linear) == (N, E, E, LINEAR)
    assert full_shape.largest == E and full_shape.quantized_tensors == 224
    assert (lora_shape.parameters, lora_shape.trainable, lora_shape.adapters) == (N + A, A, A)


def test_8b_lora_and_qlora_plans_from_the_counts(lora_shape):
    lora = plan.plan_memory(lora_shape, cuda_defaults("lora"))
    assert lora["weights"] == 2 * N + 4 * A  # bf16 base, fp32 adapters
    step = lora["moments"]["optimizer step"]
    assert (step["gradients"], step["optimizer_states"], step["optimizer_temporary"]) == (4 * A, 8 * A, 4 * A)

    qlora = plan.plan_memory(lora_shape, cuda_defaults("qlora"))
    # NF4: half a byte, a uint8 absmax per 64, an fp32 absmax per 64 x 256, and per matrix its two codes (16 and
    # 256 fp32 entries) and offset; embedding, lm_head and norms in fp32 (prepare_model_for_kbit_training).
    nf4 = QUANTIZED // 2 + QUANTIZED // 64 + 4 * QUANTIZED // (64 * 256) + 224 * (64 + 1024 + 4)
    assert qlora["weights"] == nf4 + 4 * (N - QUANTIZED) + 4 * A
    assert qlora["moments"]["optimizer step"]["optimizer_states"] == 8 * A
    assert lora["total"] < 25 * GIB and qlora["total"] < lora["total"]


def test_8b_full_plans_from_the_counts_for_each_precision_scheme(full_shape):
    # (a) fp32 master weights and gradients, paged 8-bit AdamW stepped after backward; at batch 2 x accumulation 2
    # the first micro-batch's gradients are held while the second's forward fills autocast's cache with bf16 copies.
    default = plan.plan_memory(full_shape, cuda_defaults("full", **AFTER_BACKWARD))
    assert (default["weights"], default["gradients"]) == (4 * N, 4 * N)
    assert default["optimizer_states"] == PAGED_8BIT_STATES
    assert default["paged_optimizer_states"] == 8 * E + 2 * (N - E - NORMS)  # the absmax blocks are not paged
    assert default["autocast_copies"] == 2 * LINEAR and default["peak_at"] == "end of forward"
    # (b) bf16 weights and gradients, 8-bit AdamW
    bf16 = plan.plan_memory(full_shape, cuda_defaults("full", **AFTER_BACKWARD, weight_dtype=torch.bfloat16,
                                                      optimizer="adamw_bnb_8bit"))
    assert (bf16["weights"], bf16["gradients"], bf16["optimizer_states"]) == (2 * N, 2 * N, PAGED_8BIT_STATES)
    assert bf16["autocast_copies"] == 0 and bf16["paged_optimizer_states"] == 0
    # (c) plain AdamW: states in the weights' dtype, and foreach's temporary the size of one state at the step
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        adamw = plan.plan_memory(full_shape, cuda_defaults("full", **AFTER_BACKWARD, weight_dtype=dtype,
                                                           optimizer="adamw_torch"))
        step = adamw["moments"]["optimizer step"]
        assert (step["gradients"], step["optimizer_states"], step["optimizer_temporary"]) == (
            size * N, 2 * size * N, size * N)
        assert adamw["peak_at"] == "optimizer step" and adamw["total"] == step["total"]
    # (d) the optimizer steps in backward: fp32 master weights, one gradient at a time (the largest: 4 E bytes)
    in_backward = plan.plan_memory(full_shape, cuda_defaults("full"))  # full_finetune.py's default on a GPU
    assert in_backward["moments"]["backward through the layers"]["gradients"] == 4 * E
    assert in_backward["weights"] == 4 * N and in_backward["optimizer_states"] == PAGED_8BIT_STATES


def test_full_fine_tuning_stepping_in_backward_at_batch_4_x_1024_plans_at_most_70_gib(full_shape):
    for embedding_states_fp32 in (True, False):
        setup = cuda_defaults("full", step_in_backward=True, micro_batch=4, grad_accum=1, max_length=1024,
                              gradient_checkpointing=True, embedding_states_fp32=embedding_states_fp32)
        assert plan.plan_memory(full_shape, setup)["total"] <= 70 * GIB


def test_activations_follow_the_formula(full_shape):
    """The estimate's terms, from the docstring's formula with Llama-3-8B's shapes, for a full run of 2 x 1,024."""
    planned = plan.plan_memory(full_shape, cuda_defaults("full", **AFTER_BACKWARD))
    tokens, h, kv, i, L, V = 2 * 1024, 4096, 1024, 14336, 32, 128256
    checkpoints = L * 4 * h * tokens  # each layer's fp32 input
    assert planned["moments"]["end of forward"]["activations"] == checkpoints + (2 + 4 + 4) * V * tokens
    per_layer = 2 * (4 + 4) * h + 2 * (5 * h + 5 * h + 2 * kv + 4 * i)  # fp32 residual, bf16 compute, c = 5
    assert planned["moments"]["backward through the layers"]["activations"] == (
        checkpoints + per_layer * tokens + 2 * 4 * h * tokens)


def cuda_runtime(module, args, method):
    """The runtime the method (module: lvf.lora or lvf.full) resolves on CUDA, resolved here on the CPU: CUDA's auto
    dtype, autocast, checkpointing and optimizer, and (full fine-tuning) whether it steps in backward on a GPU."""
    _, runtime = module.resolve_runtime(args)
    optimizer = runtime.optimizer
    if method == "full" and args.optim == "auto":
        optimizer = full.default_optimizer("cuda")
    dtype = torch.bfloat16 if args.dtype == "auto" else runtime.dtype
    runtime = dataclasses.replace(runtime, device="cuda", dtype=dtype, bf16_autocast=True,
                                  gradient_checkpointing=True, optimizer=optimizer, eval_dtype=None)
    if method == "full":
        runtime = dataclasses.replace(runtime, optimizer_in_backward=full.use_optimizer_in_backward(args, runtime))
    return runtime


def test_a_plan_above_the_gpu_warns_and_names_flags_that_fit(monkeypatch, full_shape, capsys):
    stand_in_gpu = 80 * 10**9
    monkeypatch.setattr(plan, "cuda_device", lambda: (stand_in_gpu, "stand-in 80 GB GPU"))
    meta = models.meta_model(models.model_config(models.DEFAULT_MODEL))
    argv = ["--optim-in-backward", "off"]  # fp32 gradients for every weight
    args = full_finetune.parse_args(argv)
    planned = plan.announce_plan(args, cuda_runtime(full, args, "full"), "full", meta)  # what scripts call
    printed = capsys.readouterr().err
    assert planned["fits"] is False and planned["device_total_bytes"] == stand_in_gpu
    assert planned["total"] == plan.plan_memory(full_shape, cuda_defaults("full", step_in_backward=False))["total"]
    assert "--optim-in-backward on" in planned["suggestions"]
    assert f"= {planned['total'] / GIB:.1f} GiB of {stand_in_gpu / GIB:.1f} GiB (stand-in 80 GB GPU)" in printed
    assert "warning: the planned" in printed and planned["suggestions"]
    single_gpu = [flags for flags in planned["suggestions"] if not flags.startswith("accelerate")]
    assert single_gpu
    for flags in single_gpu:  # each suggestion, run through the script's own flags, is planned to fit
        assert flags in printed
        changed = full_finetune.parse_args([*argv, *flags.split()])  # the user's command line, then the change
        again = plan.plan_for_run(changed, cuda_runtime(full, changed, "full"), "full", meta)
        assert again["fits"] is True, flags


def test_lora_on_a_small_gpu_is_pointed_to_qlora(monkeypatch):
    monkeypatch.setattr(plan, "cuda_device", lambda: (20 * GIB, "stand-in 20 GiB GPU"))
    args = finetune.parse_args([])
    meta = lora.add_adapters(models.meta_model(models.model_config(models.DEFAULT_MODEL)), args)
    planned = plan.plan_for_run(args, cuda_runtime(lora, args, "lora"), "lora", meta)
    assert planned["fits"] is False and "--quantize 4bit" in planned["suggestions"]


def tiny_shape_and_model(**overrides):
    torch.manual_seed(0)
    config = tiny_llama_config(hidden_size=64, intermediate_size=128, num_key_value_heads=4, **overrides)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    return plan.ModelShape.from_model(models.meta_model(config)), model


def test_the_plans_exact_parts_are_what_a_step_holds_with_8bit_adamw_on_the_cpu(llama3_tokenizer, tmp_path):
    """Weights, gradients and bitsandbytes' 8-bit AdamW states (the Trainer's fp32 override for embeddings, fp32
    states for tensors under 4,096 elements, one absmax per 256-block) as counted by the training breakdown."""
    shape, model = tiny_shape_and_model()
    measured = trained_breakdown(model, "adamw_bnb_8bit", 1, llama3_tokenizer, tmp_path).breakdown(None)
    planned = plan.plan_memory(shape, plan.Setup("full", torch.float32, "adamw_bnb_8bit", cuda=False))
    step = planned["moments"]["optimizer step"]
    assert measured["weights_by_dtype"] == {"float32": planned["weights"]}
    assert measured["gradients"] == step["gradients"]
    assert measured["optimizer_states"] == step["optimizer_states"]
    assert shape.blocks_8bit > 0 and shape.small_trainable > 0  # both kinds of state were exercised


def test_the_qlora_plans_weights_are_what_bitsandbytes_holds(tiny_llama_64_dir):
    from lvf import adapters

    model = models.load_model(str(tiny_llama_64_dir), torch.bfloat16, "cpu",
                              quantization_config=models.four_bit_config("cuda"))
    model = lora.add_adapters(adapters.prepare_for_4bit_training(model), finetune.parse_args([]))
    held = {}
    for parameter in model.parameters():
        state = getattr(parameter, "quant_state", None)
        tensors = [parameter] if state is None else [parameter, state.absmax, state.code, state.offset,
                                                     state.state2.absmax, state.state2.code]
        for tensor in tensors:
            held[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    config = models.model_config(str(tiny_llama_64_dir))
    meta = lora.add_adapters(models.meta_model(config), finetune.parse_args([]))
    planned = plan.plan_memory(plan.ModelShape.from_model(meta), cuda_defaults("qlora"))
    assert planned["weights"] == sum(held.values())


def test_the_multi_gpu_doc_shows_what_the_code_computes(full_shape):
    text = (PROJECT_DIR / "docs" / "multi-gpu.md").read_text()
    block = docs_blocks.block_lines(text, docs_tables.MULTI_GPU_BLOCK)
    assert block is not None, "docs/multi-gpu.md lacks the plan's table"
    assert block == docs_tables.multi_gpu_table(full_shape)


def test_a_plan_is_json_ready_and_its_parts_add_up(full_shape):
    import json

    planned = plan.plan_memory(full_shape, cuda_defaults("full"), device_total_bytes=141 * 10**9, device_name="H200")
    assert json.loads(json.dumps(planned)) == planned
    parts = sum(planned[key] for key in plan.PART_NAMES)
    assert parts == planned["total"] and planned["fits"] is True and planned["suggestions"] == []
    shown_parts = plan.format_plan(planned).split("): ", 1)[1].split(" = ")[0]
    assert math.isclose(sum(float(x) for x in re.findall(r"([\d.]+) [a-z]", shown_parts)), planned["total"] / GIB,
                        abs_tol=0.3)


def test_the_performance_doc_shows_what_the_code_computes(full_shape, lora_shape):
    text = (PROJECT_DIR / "docs" / "performance.md").read_text()
    block = docs_blocks.block_lines(text, docs_tables.SINGLE_GPU_BLOCK)
    assert block is not None, "docs/performance.md lacks the plan's table"
    assert block == docs_tables.single_gpu_table(full_shape, lora_shape)


def test_the_default_on_an_80_gb_gpu_steps_in_backward_and_fits(monkeypatch, full_shape):
    """full_finetune.py's runtime on a GPU steps in backward (runtime.optimizer_in_backward): the plan follows it,
    and fits an 80 GB GPU; --optim-in-backward off steps after backward, and is planned so."""
    args = full_finetune.parse_args([])
    monkeypatch.setattr(plan, "cuda_device", lambda: (80 * 10**9, "stand-in 80 GB GPU"))
    default = cuda_runtime(full, args, "full")
    meta = models.meta_model(models.model_config(models.DEFAULT_MODEL))
    assert default.optimizer_in_backward and plan.setup_for_run(args, default, "full").step_in_backward
    assert plan.plan_for_run(args, default, "full", meta)["fits"] is True
    after = full_finetune.parse_args(["--optim-in-backward", "off"])
    after_backward = cuda_runtime(full, after, "full")
    assert not after_backward.optimizer_in_backward and not plan.setup_for_run(after, after_backward,
                                                                               "full").step_in_backward


def test_the_readme_needs_table_follows_the_plan(full_shape, lora_shape):
    """Each run's memory plan and smallest GPU in the README's "What each run needs" table, computed."""
    rows = {}
    for line in (PROJECT_DIR / "README.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in ("zero-shot", "LoRA", "QLoRA (`--quantize 4bit`)", "full fine-tuning"):
            rows[cells[0]] = (cells[1], cells[2])
    assert rows == docs_tables.readme_needs(full_shape, lora_shape)
    # The words follow the comparison the pre-flight makes: bytes of the plan against the GPU's bytes.
    assert docs_tables.smallest_gpu_words(22.0 * 2**30) == "a 24 GB GPU or larger"
    assert docs_tables.smallest_gpu_words(24 * 10**9 + 1) == "a 32 GB GPU or larger"
    assert docs_tables.smallest_gpu_words(68.9 * 2**30) == "an 80 GB GPU or larger"


def test_the_full_fine_tuning_breakdown_in_the_performance_doc_is_the_plans(full_shape):
    text = (PROJECT_DIR / "docs" / "performance.md").read_text()
    block = docs_blocks.block_lines(text, docs_tables.FULL_PLAN_BLOCK)
    assert block is not None, "docs/performance.md lacks the breakdown of full fine-tuning's plan"
    assert block == docs_tables.full_default_table(full_shape)


def plan_figures(full_shape, lora_shape):
    """Every part and total the plan computes for the docs' runs, in GiB as the docs write them."""
    figures = set()
    for _, setup in docs_tables.single_gpu_rows():
        planned = plan.plan_memory(full_shape if setup.method == "full" else lora_shape, setup)
        for moment in planned["moments"].values():
            figures |= {plan.gib(value) for value in moment.values() if value is not None}
        figures.add(plan.gib(planned["paged_optimizer_states"]))
    return figures | {needs.split(" GiB")[0] for needs, _ in docs_tables.readme_needs(full_shape, lora_shape).values()}


def test_planned_figures_in_the_docs_prose_are_computed_by_the_plan(full_shape, lora_shape):
    """A sentence that speaks of a plan and gives a figure in GiB gives one lvf.plan computes: a figure typed by
    hand, such as 66.0 GiB for full fine-tuning from before the embedding's fp32 states were counted, fails here."""
    typed, computed = [], plan_figures(full_shape, lora_shape)
    for name in ("README.md", "docs/performance.md", "docs/cpu-results.md"):
        for sentence in re.split(r"(?<=[.:;])\s", (PROJECT_DIR / name).read_text()):
            if "plan" in sentence and "|" not in sentence:
                typed += [(name, figure) for figure in re.findall(r"(\d+\.\d) GiB", sentence)
                          if figure not in computed]
    assert typed == []
