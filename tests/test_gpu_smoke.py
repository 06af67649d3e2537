"""The Python pieces of bench/gpu_smoke.sh that can be checked on the CPU: the slimmed bitsandbytes wheel and
the table that decides whether the smoke run passed. (`bash bench/gpu_smoke.sh --cpu-dry` runs the whole
sequence on a tiny model.)"""

import importlib.util
import json
import os
import subprocess
import sys
import zipfile

import pytest
from test_gpu_check import check_tiny_report

import common

# bench/ is a folder of scripts, not a package: gpu_smoke.py is loaded from its file.
_spec = importlib.util.spec_from_file_location("gpu_smoke", common.PROJECT_DIR / "bench" / "gpu_smoke.py")
gpu_smoke = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_smoke)


def test_slim_wheel_keeps_only_the_listed_libraries_and_their_record_lines(tmp_path):
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    names = ["bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cpu.so",
             "bitsandbytes/libbitsandbytes_cuda118.so", "bitsandbytes/libbitsandbytes_cuda128.so",
             "bitsandbytes/libbitsandbytes_rocm64.so"]
    record = "bitsandbytes-0.50.2.dist-info/RECORD"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name in names:
            archive.writestr(name, b"x")
        archive.writestr(record, "".join(f"{name},sha256=abc,1\n" for name in [*names, record]))

    dropped = gpu_smoke.slim_wheel(wheel, ("cpu", "cuda128"))

    assert dropped == ["bitsandbytes/libbitsandbytes_cuda118.so", "bitsandbytes/libbitsandbytes_rocm64.so"]
    with zipfile.ZipFile(wheel) as archive:
        kept = set(archive.namelist())
        listed = {line.split(",")[0] for line in archive.read(record).decode().splitlines()}
    assert kept == set(names) - set(dropped) | {record}
    assert listed == kept  # pip checks every RECORD line against the files


def test_check_passes_only_when_every_run_wrote_a_finite_perplexity(tmp_path, capsys):
    for run in gpu_smoke.RUNS:
        (tmp_path / f"{run}.json").write_text(json.dumps({"perplexity": 12.5, "runtime": {"optimizer": None}}))
    assert gpu_smoke.check(tmp_path) == 0
    (tmp_path / "full.json").write_text(json.dumps({"perplexity": float("nan")}))
    assert gpu_smoke.check(tmp_path) == 1
    (tmp_path / "qlora.json").unlink()
    assert gpu_smoke.check(tmp_path) == 1
    assert "failed: qlora, full" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.subprocess
def test_cpu_dry_run_goes_through_every_step(tmp_path):
    """bash bench/gpu_smoke.sh --cpu-dry: the GPU run's sequence on a tiny model (about a minute on 2 cores)."""
    # As on a GPU machine without datasets (bench/requirements-gpu-smoke.txt leaves it out): every process of the
    # sequence starts with `import datasets` made to fail.
    hidden = tmp_path / "without-datasets"
    hidden.mkdir()
    (hidden / "sitecustomize.py").write_text("import sys\nsys.modules['datasets'] = None\n")
    python_path = os.pathsep.join(filter(None, [str(hidden), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": python_path}
    assert subprocess.run([sys.executable, "-c", "import datasets"], env=env, capture_output=True).returncode != 0
    result = subprocess.run(["bash", str(common.PROJECT_DIR / "bench" / "gpu_smoke.sh"), "--cpu-dry"],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "4/4 runs wrote a finite perplexity" in result.stdout
    out = tmp_path / "out"
    # The versions line, from build-model's process: bitsandbytes imports here (requirements-dev.txt).
    [versions] = [line for line in result.stdout.splitlines() if line.startswith("[gpu_smoke] torch ")]
    assert "| peft " in versions and "| bitsandbytes 0." in versions
    for name in (*gpu_smoke.RUNS, "gpu_check"):
        assert (out / f"{name}.json").is_file(), name
    # Its last step is bench/gpu_check.py --tiny under the pinned transformers (without datasets, with bitsandbytes).
    check_tiny_report(json.loads((out / "gpu_check.json").read_text()), "pinned")


def test_without_the_prepared_folder_it_says_in_one_line_what_to_run(tmp_path):
    """A fresh clone has no .gpu-smoke: the script stops at once, before any step, naming the command."""
    env = {**os.environ, "PREPARED": str(tmp_path / "missing"), "OUT": str(tmp_path / "out")}
    result = subprocess.run(["bash", str(common.PROJECT_DIR / "bench" / "gpu_smoke.sh")], capture_output=True,
                            text=True, env=env, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert f"python bench/gpu_smoke.py prepare {tmp_path / 'missing'}" in line
    assert "pip install --no-deps llama-models" in line and "--cpu-dry" in line
    assert not (tmp_path / "out").exists()  # nothing ran
