"""The long grid's bookkeeping: one result file per finished run, a rerun skips them (resume), curves and the
catch-up step."""

from __future__ import annotations

import json
import sys

import pytest

from tests.builders import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import reproduce  # noqa: E402


def test_mean_curves_and_catch_up_step():
    results = [
        {"method": "adalora", "task": "cola", "seed": 1, "curve": [[100, 10.0], [200, 30.0], [300, 50.0]]},
        {"method": "adalora", "task": "cola", "seed": 2, "curve": [[100, 20.0], [200, 40.0], [300, 60.0]]},
        {"method": "lora", "task": "cola", "seed": 1, "curve": [[100, 30.0], [200, 35.0], [300, 40.0]]},
        {"method": "lora", "task": "cola", "seed": 2, "curve": [[100, 30.0], [200, 35.0]]},  # stopped early
    ]
    curves = reproduce.mean_curves(results, "cola")
    assert curves == {"adalora": [(100, 15.0), (200, 35.0), (300, 55.0)], "lora": [(100, 30.0), (200, 35.0)]}
    assert reproduce.catch_up_step(curves) == 200  # 35 >= 35 from step 200 on
    assert reproduce.catch_up_step({"adalora": [(1, 1.0)], "lora": [(1, 2.0)]}) is None


@pytest.mark.slow
def test_interrupted_grid_resumes_without_rerunning_finished_runs(tmp_path, real_data, monkeypatch):
    import cli

    calls = []
    real_main = cli.main

    def counting_main(args):
        calls.append(args[args.index("--model.method") + 1])
        if len(calls) == 2 and interrupt:
            raise KeyboardInterrupt  # the machine went away during the second run
        return real_main(args)

    monkeypatch.setattr(cli, "main", counting_main)
    argv = ["--smoke", "--tasks", "cola", "--methods", "adalora", "lora", "--data-dir", str(real_data / "glue"),
            "--out", str(tmp_path / "out"), "--results-dir", str(tmp_path / "results"), "--plot",
            str(tmp_path / "curves.png")]
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        reproduce.main(argv)
    assert calls == ["adalora", "lora"] and sorted(p.name for p in (tmp_path / "results").iterdir()) == [
        "cola-adalora-1.json"]
    first = json.loads((tmp_path / "results" / "cola-adalora-1.json").read_text())
    assert first["curve"] and first["settings"][0] == "backbone=out/tiny_backbone"

    interrupt, calls[:] = False, []
    payload = reproduce.main(argv)
    assert calls == ["lora"]  # adalora was read back, not trained again
    assert [r["method"] for r in payload["results"]] == ["adalora", "lora"]
    assert payload["results"][0] == first
    assert "| adalora |" in payload["table"] and (tmp_path / "curves.png").stat().st_size > 0

    changed = [*argv, "--lr", "0.5"]
    with pytest.raises(SystemExit, match="was made with other settings"):
        reproduce.main(changed)


def test_table_marks_partial_cells_and_missing_tasks():
    results = [
        {"method": "adalora", "task": "cola", "seed": 1, "metric": 20.0, "params": 40_000},
        {"method": "adalora", "task": "cola", "seed": 2, "metric": 30.0, "params": 40_000},
        {"method": "adalora", "task": "stsb", "seed": 1, "metric": 80.0, "params": 30_000},
        {"method": "lora", "task": "cola", "seed": 1, "metric": 10.0, "params": 41_472},
    ]
    lines = reproduce.table(results, ["adalora", "lora"], ["cola", "stsb"]).splitlines()
    # (20, 30): mean 25, sample std 7.07; STS-B has one of the two seeds the fullest cell has
    assert lines[2] == "| adalora | 0.037M | 25.00±7.07 | 80.00 (n=1) | 52.50 |"
    assert lines[3] == "| lora | 0.041M | 10.00 (n=1) | - | - |"  # no average over a missing task


def test_report_only_reads_finished_runs_and_names_the_missing(tmp_path, monkeypatch):
    import cli

    def no_training(args):
        raise AssertionError("--report-only must not train")

    monkeypatch.setattr(cli, "main", no_training)
    results_dir = tmp_path / "results"
    argv = ["--smoke", "--tasks", "cola", "--methods", "adalora", "lora", "--seeds", "1", "2", "--out",
            str(tmp_path / "out"), "--results-dir", str(results_dir), "--report-only"]
    with pytest.raises(SystemExit, match="no finished runs"):
        reproduce.main(argv)

    args = reproduce.parse_args(argv)
    results_dir.mkdir()
    for method, seed, metric in [("adalora", 1, 30.0), ("lora", 1, 20.0), ("adalora", 2, 34.0)]:
        run = {"method": method, "task": "cola", "seed": seed, "metric": metric, "params": 100,
               "curve": [[10, metric - 5], [20, metric]], "settings": reproduce.planned_settings(method, "cola", seed,
                                                                                              args)}
        reproduce.result_path(method, "cola", seed, args).write_text(json.dumps(run))
    payload = reproduce.main(argv)
    assert payload["table"].splitlines()[2:] == ["| adalora | 0.000M | 32.00±2.83 | 32.00 |",
                                                 "| lora | 0.000M | 20.00 (n=1) | 20.00 |"]
    lines = payload["significance"].splitlines()
    assert lines[0].startswith("adalora - lora: mean difference +10.00 points over 1 (task, seed) pairs")
    assert "cola: AdaLoRA's mean curve stays at or above lora's from step 10" in lines
    assert "not finished yet (1): cola-lora-2" in lines

    stale = json.loads(reproduce.result_path("lora", "cola", 1, args).read_text())
    stale["settings"] = [*stale["settings"], "--model.learning_rate", "0.5"]
    reproduce.result_path("lora", "cola", 1, args).write_text(json.dumps(stale))
    with pytest.raises(SystemExit, match="was made with other settings"):
        reproduce.main(argv)
