"""report.py on fixture results: table contents, paired bootstrap verdicts, --check, the PNG."""

import json

import numpy as np
import pytest

import report

README = "# Title\n\n<!-- results-table:start -->\nold\n<!-- results-table:end -->\n\nafter\n"


def fake_run(method, nll_scale, seed=0, examples=80, **extra):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(10, 60, size=examples)
    nll = tokens * rng.uniform(1.5, 2.5, size=examples) * nll_scale
    per_example = [{"id": f"id{i}", "nll_sum": float(n), "tokens": int(t)} for i, (n, t) in
                   enumerate(zip(nll, tokens, strict=True))]
    loss = float(nll.sum() / tokens.sum())
    run = {
        "method": method, "model": "smollm2-135m", "dataset": "data/demo.jsonl", "eval_file": None,
        "perplexity": float(np.exp(loss)), "perplexity_ci95": [float(np.exp(loss)) * 0.9, float(np.exp(loss)) * 1.1],
        "eval_loss": loss, "eval_tokens": int(tokens.sum()), "eval_examples": examples,
        "seed_style_perplexity": 1234.5, "trainable_params": None, "total_params": 134_515_008,
        "trainable_percent": None, "peak_memory_bytes": 3 * 2**30, "memory_kind": "cpu_peak_rss",
        "train_seconds": None, "train_tokens_per_second": None, "artifact_bytes": None, "device": "cpu",
        "created_at": "2026-11-28T12:00:00+00:00", "git_commit": "abcdef1234", "dry_run": False,
        "per_example": per_example,
    }
    run.update(extra)
    return run


@pytest.fixture
def results_dir(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    training = {"train_seconds": 300.0, "train_tokens_per_second": 150.0, "train_peak_memory_bytes": 2 * 2**30,
                "phase_memory_kind": "cpu_peak_rss_since_reset"}
    full_breakdown = {"weights_by_dtype": {"float32": 2**29}, "gradients": 2**29, "optimizer_states": 2**30,
                      "other": 0}
    runs = [
        fake_run("base", 1.0),
        fake_run("lora", 0.7, trainable_params=1_843_200, trainable_percent=1.35, artifact_bytes=7 * 2**20,
                 **training),
        fake_run("full", 0.7, trainable_params=134_515_008, trainable_percent=100.0, artifact_bytes=513 * 2**20,
                 train_memory_breakdown=full_breakdown, **training),
    ]
    for run in runs:
        (folder / f"{run['method']}.json").write_text(json.dumps(run))
    (folder / "dry.json").write_text(json.dumps({**runs[1], "method": "lora", "dry_run": True,
                                                 "perplexity": None}))
    return folder


def test_table_comparisons_check_and_plot(tmp_path, results_dir):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    argv = ["--results-dir", str(results_dir), "--readme", str(readme)]
    assert report.main([*argv, "--check"]) == 1  # "old" is stale
    assert report.main(argv) == 0
    text = readme.read_text()
    assert text.startswith("# Title") and text.endswith("after\n") and "\nold\n" not in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[2].startswith("| Zero-shot (base) |") and rows[4].startswith("| Full fine-tuning |")
    assert "1.84 M (1.35%)" in text and "7.0 MiB" in text and "513.0 MiB" in text and "5.0 min" in text
    assert "| 1,234 |" in text  # the write-up's metric column
    # LoRA and full have identical per-example NLL: the difference is 0 and not significant.
    lora_vs_full = next(line for line in rows if line.startswith("| LoRA − Full fine-tuning"))
    assert "+0.000" in lora_vs_full and "not significant" in lora_vs_full
    # Both tuned runs scale NLL by 0.7: clearly lower than the base model.
    lora_vs_base = next(line for line in rows if line.startswith("| LoRA − Zero-shot"))
    assert "LoRA is lower (significant)" in lora_vs_base
    assert "| 2.0 GiB = 512.0 MiB + 512.0 MiB + 1.0 GiB + 0 B |" in rows[4]  # full: training peak, its parts
    assert "| 2.0 GiB |" in rows[3]  # LoRA without a breakdown: the peak alone
    assert report.main([*argv, "--check"]) == 0
    for name in ("comparison.png", "memory-breakdown.png"):
        png = results_dir / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_check_fails_when_a_result_changes(tmp_path, results_dir):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    argv = ["--results-dir", str(results_dir), "--readme", str(readme)]
    report.main(argv)
    changed = json.loads((results_dir / "full.json").read_text())
    changed["peak_memory_bytes"] *= 2
    (results_dir / "full.json").write_text(json.dumps(changed))
    assert report.main([*argv, "--check"]) == 1


def test_paired_comparison_uses_shared_examples_only(results_dir):
    runs = report.load_results(results_dir)
    runs["full"]["per_example"] = runs["full"]["per_example"][:50]
    found = {(a, b): result for a, b, result in report.comparisons(runs, seed=42, resamples=500)}
    assert found[("lora", "full")]["examples"] == 50
    assert found[("lora", "base")]["examples"] == 80
