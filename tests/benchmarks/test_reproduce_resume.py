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
