"""The --dry-run pre-flight: each README GPU command's plan checked on this machine (no CUDA), and each check's
problem line naming its fix."""

import importlib.util
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import httpx2
import pytest
from huggingface_hub.errors import GatedRepoError
from test_readme_commands import expanded_lines, script_invocations

import common
import evaluate_base_model
import finetune
import full_finetune
from lvf import errors, full, lora, models, preflight, settings

PROJECT_DIR = Path(__file__).resolve().parents[1]
SCRIPTS = {"finetune.py": finetune, "full_finetune.py": full_finetune, "evaluate_base_model.py": evaluate_base_model}
GPU = ("--config", "experiments/llama3-8b-dolly.yaml")
EXPECTED_GPU_COMMANDS = {("finetune.py", GPU), ("finetune.py", (*GPU, "--quantize", "4bit")),
                         ("full_finetune.py", GPU), ("evaluate_base_model.py", GPU)}
NO_CUDA = "no CUDA GPU: this run would"
DiskUsage = namedtuple("DiskUsage", "total used free")
VirtualMemory = namedtuple("VirtualMemory", "total available")


def readme_gpu_commands():
    """The README's runs of the default experiment (Llama 3 8B on Dolly): the three scripts without --model,
    --dataset or --eval-file, --dry-run dropped (the pre-flight adds it)."""
    found = set()
    for _, command in expanded_lines((PROJECT_DIR / "README.md").read_text(encoding="utf-8")):
        for script, arguments in script_invocations(command):
            if script in SCRIPTS and not {"--model", "--dataset", "--eval-file"} & set(arguments):
                found.add((script, tuple(argument for argument in arguments if argument != "--dry-run")))
    return sorted(found)


def dry_run_findings(script, arguments):
    """What the script's --dry-run checks: its own parser and runtime, the parameters counted on the meta device."""
    module = SCRIPTS[script]
    args = module.parse_args([*arguments, "--dry-run"])
    if module is evaluate_base_model:
        method, runtime = "base", settings.evaluation_runtime(args, "base")
        model = models.meta_model(models.model_config(args.model))
    else:
        method, runtime = (lora if module is finetune else full).resolve_runtime(args)
        model = lora.meta_model(args) if module is finetune else models.meta_model(models.model_config(args.model))
    trainable, total = models.count_parameters(model)
    return preflight.preflight(args, runtime, method, params=total - trainable if module is finetune else total,
                               trainable=trainable)


def problems(findings):
    return [finding.text for finding in findings if finding.level == "problem"]


@pytest.fixture
def downloaded(tmp_path, monkeypatch):
    """A user's machine that has everything but a GPU: online, the model and data in the Hub cache, a Hub login,
    disk to spare. (The check itself reads nothing from the network.)"""
    cache = tmp_path / "hub"
    for folder in ("models--meta-llama--Meta-Llama-3-8B-Instruct", "datasets--databricks--databricks-dolly-15k",
                   "datasets--Salesforce--wikitext", "datasets--Rowan--hellaswag", "datasets--allenai--ai2_arc",
                   "datasets--allenai--winogrande"):  # the last three: the GPU experiment's --benchmarks
        (cache / folder).mkdir(parents=True)
    monkeypatch.setattr(common, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(preflight, "get_token", lambda: "hf_" + "x" * 30)
    monkeypatch.setattr(preflight, "is_offline_mode", lambda: False)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: DiskUsage(10**13, 0, 10**13))
    monkeypatch.setattr(preflight.psutil, "virtual_memory", lambda: VirtualMemory(10**12, 10**12))
    return cache


def test_the_readme_shows_the_four_gpu_commands():
    assert EXPECTED_GPU_COMMANDS <= set(readme_gpu_commands())


@pytest.mark.skipif(preflight.torch.cuda.is_available(), reason="checks the pre-flight of a machine without CUDA")
@pytest.mark.parametrize("script, arguments", readme_gpu_commands(), ids=lambda item: " ".join(item) or "-")
def test_a_gpu_command_without_cuda_is_blocked_by_one_line_and_runs_with_device_cpu(script, arguments, downloaded,
                                                                                      capsys):
    findings = dry_run_findings(script, arguments)
    blocking = problems(findings)
    assert len(blocking) == 1 and blocking[0].startswith(NO_CUDA) and "--device cpu" in blocking[0]
    assert preflight.exit_status(findings) == preflight.BLOCKED_EXIT_STATUS != 0
    preflight.print_findings(findings)
    printed = capsys.readouterr().out
    assert f"PROBLEM  {NO_CUDA}" in printed and "pre-flight: 1 problem blocks this run" in printed
    # What the run would use is printed from its runtime, whatever the problems.
    assert any(finding.text.startswith("dtype: weights in ") for finding in findings)
    if script != "evaluate_base_model.py":
        optimizer = next(finding.text for finding in findings if finding.text.startswith("optimizer: "))
        assert "Why: " in optimizer

    on_cpu = dry_run_findings(script, [*arguments, "--device", "cpu"])
    assert problems(on_cpu) == [] and preflight.exit_status(on_cpu) == 0
    assert preflight.info("device: the CPU (--device cpu)") in on_cpu


def test_device_cuda_without_a_gpu_is_one_line(monkeypatch):
    monkeypatch.setattr(settings.torch.cuda, "is_available", lambda: False)
    with pytest.raises(errors.UsageError, match="--device cuda: no CUDA GPU is visible.*use --device cpu"):
        settings.evaluation_runtime(evaluate_base_model.parse_args(["--device", "cuda"]), "base")


def hide(monkeypatch, *packages):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name in packages else real(name, *rest))


def test_without_bitsandbytes_full_fine_tuning_says_which_optimizer_and_why(monkeypatch):
    monkeypatch.setattr(settings, "resolve_device", lambda: "cuda")
    _, with_it = full.resolve_runtime(full_finetune.parse_args(["--dry-run"]))
    assert with_it.optimizer == "paged_adamw_8bit" and "bitsandbytes" in with_it.optimizer_reason
    hide(monkeypatch, "bitsandbytes")
    _, runtime = full.resolve_runtime(full_finetune.parse_args([]))
    assert runtime.optimizer == "adamw_torch"
    assert "without bitsandbytes" in runtime.optimizer_reason and "pip install bitsandbytes" in runtime.optimizer_reason
    assert runtime.record()["optimizer_reason"] == runtime.optimizer_reason  # recorded in the results
    assert preflight.optimizer_line(runtime) == f"optimizer: adamw_torch. Why: {runtime.optimizer_reason}"
    args = full_finetune.parse_args(["--dry-run"])
    params = 8_030_261_248
    found = problems(preflight.package_findings(args, runtime, "full", params=params))
    assert len(found) == 1
    assert found[0] == ("bitsandbytes missing: paged 8-bit AdamW needs it: pip install bitsandbytes, or pass "
                        f"--optim adamw_torch to train with plain AdamW ({16 * params / 1e9:.1f} GB for this model)")
    # Chosen knowingly, plain AdamW is no problem.
    _, chosen = full.resolve_runtime(full_finetune.parse_args(["--optim", "adamw_torch", "--dry-run"]))
    assert chosen.optimizer_reason == "--optim" and problems(preflight.package_findings(args, chosen, "full")) == []


def test_packages_the_plan_names_are_problems_when_missing(monkeypatch):
    hide(monkeypatch, "bitsandbytes", "flash_attn", "datasets")
    qlora = finetune.parse_args(["--quantize", "4bit", "--attn-implementation", "flash_attention_2", "--dry-run"])
    method, runtime = lora.resolve_runtime(qlora)
    found = problems(preflight.package_findings(qlora, runtime, method))
    assert found[0].startswith("bitsandbytes missing: --quantize 4bit") and "pip install bitsandbytes" in found[0]
    assert found[1].startswith("flash-attn missing") and "--attn-implementation sdpa" in found[1]
    assert found[2].startswith("--attn-implementation flash_attention_2 computes in bfloat16 or float16 only: this "
                               "run would be scored in float32")  # on this CPU (lvf.precision)
    assert found[3].startswith("datasets missing: --dataset databricks/databricks-dolly-15k and --general-file "
                               "wikitext-2") and "pip install datasets" in found[3]
    full_args = full_finetune.parse_args(["--optim", "paged_adamw_8bit", "--dry-run"])
    _, runtime = full.resolve_runtime(full_args)
    assert problems(preflight.package_findings(full_args, runtime, "full"))[0].startswith(
        "bitsandbytes missing: --optim paged_adamw_8bit needs it")


def test_a_gated_model_needs_a_hub_token(downloaded, monkeypatch):
    args = evaluate_base_model.parse_args(["--dry-run"])
    assert problems(preflight.hub_findings(args, args.model)) == []
    monkeypatch.setattr(preflight, "get_token", lambda: None)
    found = problems(preflight.hub_findings(args, args.model))
    assert len(found) == 1 and found[0].startswith("no Hub token: meta-llama/Meta-Llama-3-8B-Instruct is gated")
    assert "hf auth login" in found[0]
    local = evaluate_base_model.parse_args(["--model", "smollm2-135m", "--dry-run"])
    if preflight.hub_model_id("smollm2-135m") is None:  # the preset ships its weights: no Hub, no token
        assert preflight.hub_findings(local, local.model) == []


def test_offline_data_and_general_text_name_their_flags(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "HF_HUB_CACHE", str(tmp_path))  # nothing cached; the tests run with HF_HUB_OFFLINE=1
    args = evaluate_base_model.parse_args(["--dry-run"])
    found = problems(preflight.data_findings(args, "base"))
    assert found[0].startswith("--dataset databricks/databricks-dolly-15k is not in the Hub cache")
    assert "the general text that measures forgetting" in found[1]
    assert "--general-file FILE" in found[1] and "--general-file ''" in found[1]
    demo = evaluate_base_model.parse_args(["--dataset", "data/demo.jsonl", "--general-file", "python-docs"])
    assert problems(preflight.data_findings(demo, "base")) == []


def test_planned_writes_follow_the_documented_rule(downloaded, tmp_path):
    params, trainable = 8_030_261_248, 13_631_488
    lora_args = finetune.parse_args(["--output-dir", str(tmp_path / "lora"), "--dry-run"])
    _, runtime = lora.resolve_runtime(lora_args)
    [checkpoints] = preflight.planned_writes("lora", params + trainable, trainable, lora_args, runtime)  # model cached
    per_checkpoint = 4 * trainable + 2 * 4 * trainable  # fp32 adapters and AdamW's two fp32 moments
    assert checkpoints.bytes == preflight.CHECKPOINTS_AT_ONCE * per_checkpoint + 4 * trainable
    full_args = full_finetune.parse_args(["--model", "not-cached/model", "--output-dir", str(tmp_path / "full"),
                                          "--optim", "paged_adamw_8bit"])
    _, runtime = full.resolve_runtime(full_args)
    download, checkpoints = preflight.planned_writes("full", params, params, full_args, runtime)
    assert download.bytes == 2 * params and download.folder == Path(downloaded)
    assert checkpoints.bytes == preflight.CHECKPOINTS_AT_ONCE * (4 + 2) * params + 4 * params


def test_too_little_disk_names_the_folder_and_the_flag(tmp_path, monkeypatch):
    output_dir = tmp_path / "not" / "yet" / "there"
    writes = [preflight.Write("3 checkpoints and the final model", output_dir, 5 * 10**9)]
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: DiskUsage(10**10, 9 * 10**9, 10**9))
    [finding] = preflight.disk_findings(writes)
    assert finding.level == "problem"
    assert finding.text.startswith(f"disk: {tmp_path.resolve()} has 1.0 GB free; the run writes about 5.0 GB")
    assert finding.text.endswith("pass --output-dir on a larger disk")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: DiskUsage(10**11, 0, 10**11))
    assert preflight.disk_findings(writes)[0].level == "ok"


def test_the_memory_plan_against_the_gpu(tmp_path):
    args = full_finetune.parse_args(["--dry-run", "--device", "cpu"])
    _, runtime = full.resolve_runtime(args)
    [over] = preflight.memory_findings(runtime, "full", {"total": 90 * 10**9, "device_total_bytes": 80 * 10**9})
    assert over.level == "problem" and "90.0 GB, the GPU has 80.0 GB" in over.text and "FSDP" in over.text
    [fits] = preflight.memory_findings(runtime, "full", {"total": 70 * 10**9, "device_total_bytes": 80 * 10**9})
    assert fits.level == "ok"


def test_report_and_exit_code_prints_and_returns_the_status(downloaded, tmp_path, capsys):
    args = full_finetune.parse_args(["--model", "smollm2-135m", "--dataset", "data/demo.jsonl", "--general-file",
                                     "python-docs", "--device", "cpu", "--output-dir", str(tmp_path / "out"),
                                     "--dry-run"])
    _, runtime = full.resolve_runtime(args)
    assert preflight.report_and_exit_code(args, runtime, "full", params=10**6, trainable=10**6) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "pre-flight: nothing blocks this run"
    blocked = full_finetune.parse_args(["--model", "smollm2-135m", "--dataset", "missing.jsonl", "--device", "cpu",
                                        "--general-file", "", "--dry-run"])
    _, runtime = full.resolve_runtime(blocked)
    assert preflight.report_and_exit_code(blocked, runtime, "full") == preflight.BLOCKED_EXIT_STATUS
    printed = capsys.readouterr().out
    assert "PROBLEM  --dataset missing.jsonl: file not found" in printed
    assert "disk: not estimated" in printed


def test_on_cuda_the_gpu_is_named_and_the_memory_plan_compared_with_it(monkeypatch):
    """torch.cuda's answers stood in for (this machine has no GPU): the lines a CUDA machine gets."""
    cuda = preflight.torch.cuda
    Properties = namedtuple("Properties", "total_memory")
    monkeypatch.setattr(cuda, "current_device", lambda: 0)
    monkeypatch.setattr(cuda, "device_count", lambda: 2)
    monkeypatch.setattr(cuda, "get_device_name", lambda index: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(cuda, "get_device_properties", lambda index: Properties(80 * 2**30))
    monkeypatch.setattr(settings, "resolve_device", lambda: "cuda")
    args = full_finetune.parse_args(["--dry-run"])
    _, runtime = full.resolve_runtime(args)
    [gpu] = preflight.device_findings(args, runtime, "full")
    assert gpu.level == "ok" and gpu.text.startswith("CUDA GPU: NVIDIA H100 80GB HBM3, 80.0 GiB (2 visible")
    [over] = preflight.memory_findings(runtime, "full", {"total": 90 * 10**9})  # the GPU's size read from torch
    assert over.level == "problem" and f"the GPU has {80 * 2**30 / 1e9:.1f} GB" in over.text


def cuda_machine(monkeypatch, name, capability, bf16, driver=(13, 0), build="13.0",
                 arch_list=("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")):
    """torch.cuda's answers and the driver's stood in for: a GPU of this capability under torch's CUDA build
    (PyPI's torch 2.13.0 is CUDA 13.0, built for sm_75 to sm_120)."""
    cuda = preflight.torch.cuda
    monkeypatch.setattr(preflight.torch.version, "cuda", build)
    monkeypatch.setattr(preflight, "driver_cuda_version", lambda: driver)
    monkeypatch.setattr(cuda, "current_device", lambda: 0)
    monkeypatch.setattr(cuda, "get_device_name", lambda index=None: name)
    monkeypatch.setattr(cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(cuda, "get_arch_list", lambda: list(arch_list))
    monkeypatch.setattr(cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    monkeypatch.setattr(settings, "resolve_device", lambda: "cuda")


def gpu_problems(script, arguments=()):
    module = SCRIPTS[script]
    args = module.parse_args([*arguments, "--dry-run"])
    if module is evaluate_base_model:
        method, runtime = "base", settings.evaluation_runtime(args, "base")
    else:
        method, runtime = (lora if module is finetune else full).resolve_runtime(args)
    return problems(preflight.gpu_findings(args, runtime, method))


def test_an_h100_under_torchs_cuda_13_build_passes(monkeypatch):
    cuda_machine(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0), bf16=True)
    for script in SCRIPTS:
        assert gpu_problems(script) == []
    args = finetune.parse_args(["--dry-run"])
    method, runtime = lora.resolve_runtime(args)
    found = preflight.gpu_findings(args, runtime, method)
    assert preflight.ok("NVIDIA driver: runs CUDA up to 13.0 (torch's build: CUDA 13.0)") in found
    assert preflight.ok("GPU kernels: torch's CUDA 13.0 build runs on the NVIDIA H100 80GB HBM3 (sm_90)") in found


def test_a_v100_is_refused_by_a_cuda_13_build_with_the_build_that_runs_on_it(monkeypatch):
    cuda_machine(monkeypatch, "Tesla V100-SXM2-32GB", (7, 0), bf16=False)
    [kernels, *_] = gpu_problems("finetune.py")
    assert kernels.startswith("GPU kernels: the Tesla V100-SXM2-32GB is sm_70; torch ")
    version = preflight.torch.__version__.split("+")[0]
    # torch's own table of its release's builds: the CUDA 12.6 one still has sm_70 kernels.
    assert f"pip install torch=={version} --index-url https://download.pytorch.org/whl/cu126" in kernels
    # An sm_86 card runs sm_80 machine code; PTX (compute_XY) runs on anything newer.
    cuda_machine(monkeypatch, "NVIDIA RTX A6000", (8, 6), bf16=True, arch_list=("sm_80", "sm_90"))
    assert gpu_problems("finetune.py") == []
    cuda_machine(monkeypatch, "NVIDIA RTX A6000", (8, 6), bf16=True, arch_list=("sm_90", "compute_80"))
    assert gpu_problems("finetune.py") == []


def test_a_driver_older_than_torchs_cuda_build_is_a_problem_naming_the_fix(monkeypatch):
    cuda_machine(monkeypatch, "NVIDIA A100-SXM4-80GB", (8, 0), bf16=True, driver=(12, 8))
    [driver] = gpu_problems("full_finetune.py")
    assert driver.startswith("NVIDIA driver: it runs CUDA up to 12.8; torch ")
    assert "install an NVIDIA driver for CUDA 13.0 or newer, or pip install torch==" in driver
    assert driver.endswith("https://download.pytorch.org/whl/cu126")  # the newest build this driver runs
    # Such a driver leaves torch without a GPU (is_available() is False): the driver line still says why.
    monkeypatch.setattr(settings, "resolve_device", lambda: "cpu")
    assert gpu_problems("full_finetune.py") == [driver]
    assert gpu_problems("full_finetune.py", ["--device", "cpu"]) == []  # the CPU, asked for knowingly


def test_a_t4_has_no_bf16_and_each_script_names_the_flags_that_turn_it_off(monkeypatch):
    cuda_machine(monkeypatch, "Tesla T4", (7, 5), bf16=False)
    [lora] = gpu_problems("finetune.py")
    assert lora.startswith("bf16: the Tesla T4 (sm_75) has no native bf16, which this run uses: pass "
                           "--bf16-autocast off --dtype float32 ")
    [full] = gpu_problems("full_finetune.py")  # fp32 weights already; bf16 autocast is the CUDA default
    assert "pass --bf16-autocast off --eval-dtype float32 (" in full  # scored in bf16 on CUDA by default
    [base] = gpu_problems("evaluate_base_model.py")
    assert "pass --eval-dtype float32 (" in base
    [qlora] = gpu_problems("finetune.py", ["--quantize", "4bit"])
    assert "no native bf16, which this run uses: leave out --quantize 4bit (QLoRA computes in bf16) and pass " in qlora
    fp32_throughout = ["--bf16-autocast", "off", "--dtype", "float32", "--eval-dtype", "float32"]
    assert gpu_problems("finetune.py", fp32_throughout) == []


def test_host_memory_for_loading_is_computed_from_the_parameters_and_compared_with_psutil(monkeypatch):
    params = models.count_parameters(models.meta_model(models.model_config(models.DEFAULT_MODEL)))[1]
    monkeypatch.setattr(preflight.psutil, "virtual_memory", lambda: VirtualMemory(64 * 10**9, 20 * 10**9))
    monkeypatch.setattr(settings, "resolve_device", lambda: "cuda")
    args = full_finetune.parse_args(["--dry-run"])
    _, runtime = full.resolve_runtime(args)
    [full_load] = preflight.host_memory_findings(runtime, "full", params)
    assert full_load.level == "problem"
    assert full_load.text.startswith(
        f"host memory: loading the weights in float32 takes about {4 * params / 1e9:.1f} GB "
                                f"of RAM ({params:,} parameters, read on the CPU before they move to the GPU); "
                                "20.0 GB is available")
    _, lora_runtime = lora.resolve_runtime(finetune.parse_args(["--dry-run"]))
    assert preflight.host_memory_findings(lora_runtime, "lora", params)[0].level == "ok"  # bf16: 16.1 GB
    assert preflight.host_memory_findings(lora_runtime, "qlora", params) == []  # quantised straight onto the GPU
    # A real run stops at its start with the same line (stood-in GPU checks pass).
    monkeypatch.setattr(preflight, "gpu_findings", lambda *args: [])
    with pytest.raises(errors.UsageError, match=r"^host memory: loading the weights in float32 takes about 32\.1 GB"):
        preflight.stop_if_blocked(args, runtime, "full")


def gated(message="Access to model meta-llama/Meta-Llama-3-8B-Instruct is restricted"):
    request = httpx2.Request("GET", "https://huggingface.co/api/models/meta-llama/Meta-Llama-3-8B-Instruct/auth-check")
    return GatedRepoError(message, response=httpx2.Response(403, request=request))


def test_a_gated_model_whose_licence_this_token_has_not_accepted_is_a_problem(downloaded, monkeypatch, tmp_path):
    """repo_info answers for a gated repository whether or not the licence was accepted: auth_check says."""
    monkeypatch.setattr(common, "HF_HUB_CACHE", str(tmp_path / "empty"))  # not cached: the run would download it
    monkeypatch.setattr(common, "is_offline_mode", lambda: False)
    monkeypatch.setattr(common, "get_token", preflight.get_token)  # the fixture's login
    monkeypatch.setattr(common.HfApi, "repo_info", lambda self, *args, **kwargs: SimpleNamespace(gated="manual"))

    def refused(self, repo_id, repo_type=None, token=None, write=False):
        raise gated()

    monkeypatch.setattr(common.HfApi, "auth_check", refused)
    args = evaluate_base_model.parse_args(["--dry-run"])
    [found] = problems(preflight.hub_findings(args, args.model))
    assert found.startswith("model meta-llama/Meta-Llama-3-8B-Instruct is gated and this Hub token has no access "
                            "to it: accept its licence on https://huggingface.co/meta-llama/Meta-Llama-3-8B-Instruct")
    with pytest.raises(errors.UsageError, match="is gated and this Hub token has no access"):
        common.ensure_hub_reachable(args.model)  # the real run's check, before the tokenizer downloads
    monkeypatch.setattr(common.HfApi, "auth_check", lambda self, *args, **kwargs: None)
    granted = preflight.hub_findings(args, args.model)
    assert problems(granted) == []
    assert preflight.ok(f"Hub access to {args.model}: it can be downloaded (asked of the Hub)") in granted
    # Offline the Hub is not asked: a note says so.
    monkeypatch.setattr(preflight, "is_offline_mode", lambda: True)
    assert preflight.info(f"Hub access to {args.model}: not asked of the Hub (HF_HUB_OFFLINE=1)") in (
        preflight.hub_findings(args, args.model))


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_a_real_run_stops_at_its_start_on_what_the_pre_flight_finds(script, monkeypatch, tmp_path):
    """The GPU checks run before any data or weights load: a stood-in problem stops the run in one line."""
    monkeypatch.setattr(preflight, "gpu_findings", lambda *args: [preflight.problem("bf16: stood in")])
    monkeypatch.setattr(preflight, "host_memory_findings", lambda *args: [])
    monkeypatch.setattr(preflight.common, "load_splits", lambda *args, **kwargs: pytest.fail("data loaded"))
    arguments = ["--config", "experiments/demo-cpu.yaml", "--output", str(tmp_path / "out.json")]
    if script != "evaluate_base_model.py":
        arguments += ["--output-dir", str(tmp_path / "run")]
    with pytest.raises(errors.UsageError, match="^bf16: stood in$"):
        SCRIPTS[script].main(arguments)
