"""``benchmarks/llm_xsum.py --smoke`` runs end to end on a tiny random llama and writes its data, predictions and
JSON (no quality or timing asserts: the weights are random).

A subprocess, as for step_time.py: the step-time part pins glibc's malloc thresholds for its whole process.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.builders import REPO_ROOT

pytest.importorskip("peft")

SCRIPT = REPO_ROOT / "benchmarks" / "llm_xsum.py"


@pytest.mark.slow
def test_llm_xsum_smoke_writes_data_results_and_step_times(tmp_path, real_data):
    out, result = tmp_path / "out", tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--json", str(result), "--data-dir",
         str(real_data)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| adalora |" in proc.stdout and "ours / PEFT" in proc.stdout  # the printed tables

    # (a) instruction files of the smoke rows, ids from XSum, prompts cut to fit.
    rows = {name: [json.loads(line) for line in (out / "data" / f"{name}.jsonl").read_text().splitlines()]
            for name in ("train", "eval")}
    assert len(rows["train"]) == 8 and len(rows["eval"]) == 4
    assert not {r["id"] for r in rows["train"]} & {r["id"] for r in rows["eval"]}
    for row in rows["train"] + rows["eval"]:
        assert row["instruction"] and row["input"] and row["output"]

    data = json.loads(result.read_text())
    methods = data["methods"]
    assert list(methods) == ["untuned", "lora", "adalora"]
    for name, r in methods.items():
        for key in ("val/loss", "val/perplexity", "val/rouge1", "val/rouge2", "val/rougeL"):
            assert math.isfinite(r[key]), (name, key)
        predictions = (out / name / "predictions_val_epoch0.jsonl").read_text().splitlines()
        assert len(predictions) == 4, name
    # (c) AdaLoRA pruned to its budget (target_r 2 of init_r 4, 14 layers); LoRA at r = target_r from the start.
    adalora, lora = methods["adalora"], methods["lora"]
    assert adalora["steps"] == lora["steps"] == 4
    assert adalora["total_rank"] == adalora["budget"] == 2 * 14 < adalora["initial_rank"]
    assert lora["total_rank"] == 2 * 14 and lora["params"] == lora["trainable_params"]
    assert adalora["params"] < adalora["trainable_params"]  # kept-rank #Params after pruning
    # (d) step time: finite ratios and a memory number per variant.
    step = data["step_time"]
    for key in ("ratio_wall", "ratio_cpu", "peak_mem_ratio"):
        assert isinstance(step[key], float) and math.isfinite(step[key]) and step[key] > 0, key
    assert set(step["variants"]) == {"frozen", "adalora", "adalora_fused", "peft_adalora"}
    variants = step["variants"]
    assert variants["adalora"]["trainable_params"] == variants["peft_adalora"]["trainable_params"]
    assert variants["adalora_fused"]["trainable_params"] == variants["adalora"]["trainable_params"]
    assert variants["frozen"]["trainable_params"] == 0  # the floor trains nothing: its head is the tied embedding
    for key, spread in step["ratio_spread"].items():  # each ratio over the rounds: min <= q1 <= median <= q3 <= max
        assert spread["min"] <= spread["q1"] <= spread["median"] <= spread["q3"] <= spread["max"], key
    assert "adalora_fused_vs_frozen:" in proc.stdout


@pytest.mark.slow
def test_llm_xsum_smoke_quantized_compares_nf4_with_the_float32_base_and_peft(tmp_path, real_data):
    """``--quantization nf4``: AdaLoRA fitted on the float32 and on the nf4 base with the same steps and evaluated
    alike; the step-time part times ours on both bases and PEFT on the same nf4 base, side by side."""
    pytest.importorskip("bitsandbytes")
    out, result = tmp_path / "out", tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--quantization", "nf4", "--out", str(out), "--json", str(result),
         "--data-dir", str(real_data)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| adalora_nf4 |" in proc.stdout and "ours on nf4 / PEFT on the nf4 base" in proc.stdout

    data = json.loads(result.read_text())
    methods = data["methods"]
    assert list(methods) == ["adalora", "adalora_nf4"]  # the default parts with --quantization
    plain, nf4 = methods["adalora"], methods["adalora_nf4"]
    assert (plain["quantization"], nf4["quantization"]) == ("none", "nf4")
    assert plain["steps"] == nf4["steps"] == 4  # perplexity and ROUGE after the same steps
    assert nf4["total_rank"] == nf4["budget"] == plain["budget"] == 2 * 14
    for r in (plain, nf4):
        for key in ("val/loss", "val/perplexity", "val/rouge1", "val/rougeL"):
            assert math.isfinite(r[key]), key
    assert 0 < nf4["base_param_bytes"] < plain["base_param_bytes"]
    assert len((out / "adalora_nf4" / "predictions_val_epoch0.jsonl").read_text().splitlines()) == 4

    step = data["step_time"]
    variants = step["variants"]
    assert set(variants) == {"adalora", "adalora_nf4", "peft_adalora_nf4"}
    for key in ("ratio_wall_vs_fp32", "ratio_cpu_vs_fp32", "peak_mem_ratio_vs_fp32", "ratio_wall_vs_peft",
                "ratio_cpu_vs_peft", "peak_mem_ratio_vs_peft"):
        assert isinstance(step[key], float) and math.isfinite(step[key]) and step[key] > 0, key
    # The same nf4 weights under both implementations, so the same base bytes; half the float32 base or less.
    assert step["same_quantized_base"] is True
    assert variants["adalora_nf4"]["base_param_bytes"] == variants["peft_adalora_nf4"]["base_param_bytes"]
    assert step["base_bytes_ratio_vs_fp32"] < 0.6
    assert variants["adalora"]["trainable_params"] == variants["adalora_nf4"]["trainable_params"]
