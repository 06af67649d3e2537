"""The Python pieces of bench/gpu_smoke.sh, the GPU smoke run of the real scripts (see that file).

    python bench/gpu_smoke.py prepare .gpu-smoke          # here, with the registries: wheels + tokenizer to carry
    python bench/gpu_smoke.py build-model --output DIR    # a random Llama (~480M parameters), saved like a Hub model
    python bench/gpu_smoke.py check OUT                   # the results JSONs in one table; exit 1 if one is missing
"""

import argparse
import json
import math
import subprocess
import sys
import zipfile
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
REQUIREMENTS = PROJECT_DIR / "bench" / "requirements-gpu-smoke.txt"
RUNS = ("base", "lora", "qlora", "full")
# Llama 3's shape scaled down: GQA 16/4 heads, the 128,256-token vocabulary, untied embeddings: ~480M parameters.
SMOKE_CONFIG = dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=16, num_attention_heads=16,
                    num_key_value_heads=4, max_position_embeddings=2048)
# Tiny, but 4-bit quantisation needs rows of at least one 64-value block (bitsandbytes' CPU path).
TINY_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=2048)
# torch 2.11's CUDA builds are 12.6, 12.8 and 13.0: keep those libraries (and the CPU one) of bitsandbytes' wheel.
KEEP_BITSANDBYTES_LIBRARIES = ("cpu", "cuda126", "cuda128", "cuda130", "cuda132")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="download the wheels and save the tokenizer to carry")
    prepare.add_argument("folder", type=Path)
    build = commands.add_parser("build-model", help="a random Llama with the Llama 3 tokenizer, saved locally")
    build.add_argument("--output", type=Path, required=True)
    build.add_argument("--tokenizer", type=Path, default=None,
                       help="a saved tokenizer folder (default: built from the llama-models package)")
    build.add_argument("--tiny", action="store_true", help="a tiny model, for the CPU dry run")
    check = commands.add_parser("check", help="the results JSONs, in one table")
    check.add_argument("folder", type=Path)
    return parser.parse_args(argv)


def llama3_tokenizer(folder, build_into):
    """The saved tokenizer in folder, or else the real Llama 3 tokenizer built (and saved) into build_into from
    Meta's llama-models package, which `make test`'s setup installs (a GPU machine without network may lack it)."""
    if folder is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    from lvf.llama3_tokenizer import build_llama3_tokenizer  # deferred: needs llama-models, only without a folder

    return build_llama3_tokenizer(build_into)


def versions():
    """What the runs will import, in one line; bitsandbytes may be missing (QLoRA and the paged optimizer then fail)."""
    import accelerate
    import peft
    import torch
    import transformers

    try:
        import bitsandbytes

        bnb = bitsandbytes.__version__
    except Exception as error:  # noqa: BLE001 - any failure to import means the same for the runs
        bnb = f"does not import ({type(error).__name__}): QLoRA and the paged optimizer will fail"
    return (f"[gpu_smoke] torch {torch.__version__} cuda {torch.version.cuda} {torch.cuda.is_available()} | "
            f"transformers {transformers.__version__} | peft {peft.__version__} | accelerate {accelerate.__version__} "
            f"| bitsandbytes {bnb}")


def build_model(output, tokenizer_folder, tiny):
    # torch and transformers are imported here, by the one command that needs them: `check` reads JSON files and
    # `prepare` downloads wheels, each without seconds of imports. The versions line comes first, in the same
    # process (another would import them all again).
    print(versions(), flush=True)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lvf import models

    tokenizer = llama3_tokenizer(tokenizer_folder, output)
    config = LlamaConfig(**(TINY_CONFIG if tiny else SMOKE_CONFIG), vocab_size=128256, bos_token_id=128000,
                         eos_token_id=128009, rope_theta=500000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    print(f"[gpu_smoke] {models.count_parameters(model)[1]:,} parameters saved in {output}")


def slim_wheel(wheel, keep):
    """Rewrites a bitsandbytes wheel without the native libraries not named in keep (and their RECORD lines)."""
    slim = wheel.with_name(wheel.name + ".slim")
    dropped = set()
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            name = Path(item.filename).name
            if name.startswith("libbitsandbytes_") and not any(f"_{k}." in name for k in keep):
                dropped.add(item.filename)
        for item in source.infolist():
            if item.filename in dropped:
                continue
            data = source.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                lines = [line for line in data.decode().splitlines() if line.split(",")[0] not in dropped]
                data = ("\n".join(lines) + "\n").encode()
            target.writestr(item, data)
    slim.replace(wheel)
    return sorted(dropped)


def prepare(folder):
    wheels = folder / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--dest",
                    str(wheels), "-r", str(REQUIREMENTS)], check=True)
    for wheel in wheels.glob("bitsandbytes-*.whl"):
        print(f"[gpu_smoke] {wheel.name}: dropped {len(slim_wheel(wheel, KEEP_BITSANDBYTES_LIBRARIES))} libraries")
    llama3_tokenizer(None, folder / "tokenizer")
    size = sum(item.stat().st_size for item in folder.rglob("*") if item.is_file())
    print(f"[gpu_smoke] {folder}: {size / 2**20:.1f} MiB to carry")


def check(folder):
    """One row per run; a missing or non-finite result fails the smoke run."""
    print("| run | perplexity | trainable | dtype | optimizer | tokens/s | peak memory GiB | seconds |")
    print("| --- | ---: | ---: | --- | --- | ---: | ---: | ---: |")
    failed = []
    for run in RUNS:
        path = folder / f"{run}.json"
        if not path.is_file():
            failed.append(run)
            print(f"| {run} | missing | | | | | | |")
            continue
        result = json.loads(path.read_text())
        perplexity = result.get("perplexity")
        if perplexity is None or not math.isfinite(perplexity):
            failed.append(run)
        runtime = result.get("runtime") or {}
        rate, memory = result.get("train_tokens_per_second"), result.get("peak_memory_bytes")
        print(f"| {run} | {perplexity} | {result.get('trainable_params')} | {result.get('dtype')} | "
              f"{runtime.get('optimizer')} | {'' if rate is None else f'{rate:,.0f}'} | "
              f"{'' if memory is None else f'{memory / 2**30:.2f}'} | {result.get('train_seconds')} |")
    print(f"[gpu_smoke] {len(RUNS) - len(failed)}/{len(RUNS)} runs wrote a finite perplexity"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def main(argv=None):
    args = parse_args(argv)
    if args.command == "prepare":
        return prepare(args.folder)
    if args.command == "build-model":
        return build_model(args.output, args.tokenizer, args.tiny)
    return check(args.folder)


if __name__ == "__main__":
    sys.exit(main())
