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
    import adalora_pl.cli as cli

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


def test_report_only_reads_finished_runs_and_names_the_missing(tmp_path, monkeypatch):
    import adalora_pl.cli as cli

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
        run = {"method": method, "task": "cola", "seed": seed, "metric": metric, "params": 100, "steps": 20,
               "seconds": 90.0 * seed,
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
    assert payload["runs"].splitlines()[2:] == ["| cola | adalora | 1 | 30.00 | 20 | 1.5 |  |",
                                                "| cola | adalora | 2 | 34.00 | 20 | 3.0 |  |",
                                                "| cola | lora | 1 | 20.00 | 20 | 1.5 |  |"]

    stale = json.loads(reproduce.result_path("lora", "cola", 1, args).read_text())
    stale["settings"] = [*stale["settings"], "--model.learning_rate", "0.5"]
    reproduce.result_path("lora", "cola", 1, args).write_text(json.dumps(stale))
    with pytest.raises(SystemExit, match="was made with other settings"):
        reproduce.main(argv)


@pytest.mark.slow
def test_a_run_cut_off_midway_resumes_from_its_last_checkpoint(tmp_path, real_data, monkeypatch, capsys):
    from adalora_pl.callback import AdaLoRACallback

    # 16 rows in batches of 4 for 4 epochs: 16 steps, a validation (and last.ckpt) after steps 4, 8, 12, 16
    argv = ["--smoke", "--tasks", "cola", "--methods", "adalora", "--data-dir", str(real_data / "glue"),
            "--results-dir", str(tmp_path / "results"), "--trainer-args", "--data.batch_size", "4",
            "--trainer.max_epochs", "4"]  # --smoke's one epoch, overridden: trainer args come last
    whole = reproduce.main([*argv[:-5], "--out", str(tmp_path / "whole"), "--results-dir",
                            str(tmp_path / "whole_results"), *argv[-5:]])["results"][0]
    assert whole["steps"] == 16 and [s for s, _ in whole["curve"]] == [3, 7, 11, 15]

    cut = [*argv[:-5], "--out", str(tmp_path / "out"), *argv[-5:]]
    real_batch_end = AdaLoRACallback.on_train_batch_end

    def machine_goes_away(self, trainer, *args):
        if trainer.global_step == 10:
            raise RuntimeError("the session ended")
        return real_batch_end(self, trainer, *args)

    monkeypatch.setattr(AdaLoRACallback, "on_train_batch_end", machine_goes_away)
    with pytest.raises(RuntimeError, match="the session ended"):
        reproduce.main(cut)
    monkeypatch.setattr(AdaLoRACallback, "on_train_batch_end", real_batch_end)
    run_dir = tmp_path / "out" / "adalora_cola_1"
    assert not (tmp_path / "results").exists()
    assert (run_dir / "lightning_logs/version_0/checkpoints/last.ckpt").is_file()

    resumed = reproduce.main(cut)["results"][0]
    assert "resuming adalora_cola_1 from step 8" in capsys.readouterr().out
    # the whole schedule ran once: same step count, one validation point per epoch (two from each attempt)
    assert resumed["resumed_from_step"] == 8 and resumed["steps"] == whole["steps"]
    assert [s for s, _ in resumed["curve"]] == [s for s, _ in whole["curve"]]
    assert resumed["curve"][:2] == whole["curve"][:2]  # before the cut the two runs are the same run
    # the second attempt trained and validated only after the checkpoint (it did not start over)
    assert [s for s, _ in reproduce.read_curve(run_dir / "lightning_logs/version_1", "val/mcc")] == [11, 15]
    attempt = json.loads((run_dir / "attempt_1.json").read_text())
    assert attempt["from_step"] == 8 and attempt["seconds_before"] > 0
    assert resumed["seconds"] > attempt["seconds_before"]

    # a folder made with other settings is moved aside, not resumed
    (tmp_path / "results" / "cola-adalora-1.json").unlink()
    reproduce.main([*cut, "--data.max_seq_length", "24"])
    assert (tmp_path / "out" / "adalora_cola_1.stale-1" / "attempt_1.json").is_file()
    assert sorted(p.name for p in run_dir.glob("attempt_*.json")) == ["attempt_0.json"]
