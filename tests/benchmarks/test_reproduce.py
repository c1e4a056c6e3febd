"""benchmarks/reproduce.py and glue_minilm.py in smoke mode (tiny model, a few steps), and the test statistic."""

from __future__ import annotations

import json
import sys

import pytest

from tests.builders import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import reproduce  # noqa: E402


def test_sign_flip_test_exact_values():
    # all 8 sign patterns of (1, 1, 1): only +++ and --- reach |sum| = 3
    assert reproduce.sign_flip_test([1.0, 1.0, 1.0]) == pytest.approx(2 / 8)
    # (2, -1): |sum| = 1; patterns give 1, 3, -3, -1 -> all four reach 1
    assert reproduce.sign_flip_test([2.0, -1.0]) == pytest.approx(1.0)
    assert 0 < reproduce.sign_flip_test([0.5] * 20) < 0.01  # Monte Carlo branch


def test_table_layout_mean_std_and_average():
    results = [
        {"method": "lora", "task": "cola", "seed": 1, "metric": 60.0, "params": 1_327_104},
        {"method": "lora", "task": "cola", "seed": 2, "metric": 62.0, "params": 1_327_104},
        {"method": "lora", "task": "rte", "seed": 1, "metric": 80.0, "params": 1_327_104},
        {"method": "lora", "task": "rte", "seed": 2, "metric": 80.0, "params": 1_327_104},
        {"method": "adalora", "task": "cola", "seed": 1, "metric": 70.0, "params": 1_000_000},
        {"method": "adalora", "task": "rte", "seed": 1, "metric": 90.0, "params": 1_000_000},
    ]
    lines = reproduce.table(results, ["lora", "adalora"], ["cola", "rte"]).splitlines()
    assert lines[0] == "| Method | #Params | cola | rte | Avg. |"
    # sample std of (60, 62) is sqrt(2) = 1.41; the average is over task means
    assert lines[2] == "| lora | 1.327M | 61.00±1.41 | 80.00±0.00 | 70.50 |"
    # one seed: no spread shown, and the cell says it has fewer seeds than lora's
    assert lines[3] == "| adalora | 1.000M | 70.00 (n=1) | 90.00 (n=1) | 80.00 |"


def test_table_marks_partial_cells_and_missing_tasks():
    results = [
        {"method": "adalora", "task": "cola", "seed": 1, "metric": 20.0, "params": 40_000},
        {"method": "adalora", "task": "cola", "seed": 2, "metric": 30.0, "params": 40_000},
        {"method": "adalora", "task": "stsb", "seed": 1, "metric": 80.0, "params": 30_000},
        {"method": "lora", "task": "cola", "seed": 1, "metric": 10.0, "params": 41_472},
    ]
    lines = reproduce.table(results, ["adalora", "lora"], ["cola", "stsb"]).splitlines()
    # (20, 30): mean 25, sample std 7.07; STS-B has one of the two seeds the fullest cell has;
    # #Params averages the tasks (40,000 and 30,000), not the three runs
    assert lines[2] == "| adalora | 0.035M | 25.00±7.07 | 80.00 (n=1) | 52.50 |"
    assert lines[3] == "| lora | 0.041M | 10.00 (n=1) | - | - |"  # no average over a missing task


def test_an_undefined_correlation_counts_as_zero():
    """Constant predictions make Pearson NaN (torchmetrics); table, paired test and curves count it as 0."""
    nan = float("nan")
    results = [
        {"method": "adalora", "task": "stsb", "seed": 1, "metric": 86.0, "params": 1,
         "curve": [[10, 80.0], [20, 86.0]]},
        {"method": "adalora", "task": "stsb", "seed": 2, "metric": 84.0, "params": 1,
         "curve": [[10, 70.0], [20, 84.0]]},
        {"method": "lora", "task": "stsb", "seed": 1, "metric": nan, "params": 1, "curve": [[10, 60.0], [20, nan]]},
        {"method": "lora", "task": "stsb", "seed": 2, "metric": 6.0, "params": 1, "curve": [[10, 50.0], [20, 6.0]]},
    ]
    lines = reproduce.table(results, ["adalora", "lora"], ["stsb"]).splitlines()
    assert lines[3] == "| lora | 0.000M | 3.00±4.24 | 3.00 |"  # (0, 6): mean 3, sample std 4.24
    assert reproduce.significance(results, "adalora", "lora").startswith(
        "adalora - lora: mean difference +82.00 points over 2 (task, seed) pairs")  # (86 - 0 + 84 - 6) / 2
    assert reproduce.mean_curves(results, "stsb")["lora"] == [(10, 55.0), (20, 3.0)]
    assert reproduce.catch_up_step(reproduce.mean_curves(results, "stsb"), "adalora", "lora") == 10


@pytest.mark.slow
def test_reproduce_smoke_writes_table_and_json(tmp_path, real_data):
    out = tmp_path / "out"
    payload = reproduce.main(["--smoke", "--tasks", "cola", "--methods", "adalora", "lora", "houlsby",
                              "--data-dir", str(real_data / "glue"), "--out", str(out)])
    runs = payload["results"]
    assert [(r["method"], r["task"]) for r in runs] == [("adalora", "cola"), ("lora", "cola"), ("houlsby", "cola")]
    lora = next(r for r in runs if r["method"] == "lora")
    # tiny BERT, LoRA at r = target_r = 8 on 2 layers x (four 32x32, 32->64, 64->32)
    assert lora["params"] == 2 * 8 * (4 * 64 + 96 + 96)
    assert "| adalora |" in payload["table"] and "| houlsby |" in payload["table"]
    assert "sign-flip permutation test" in payload["significance"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["results"] == runs
    assert (out / "results.md").read_text().startswith("| Method | #Params | cola | Avg. |")
