"""The harness of the short-budget study (issue #25): the option rows and the two-stage ``lora_from_pattern`` of
benchmarks/reproduce.py, ``--preset short``, ``--tag`` / ``--lr-ratio-b`` / ``--method-lr``, the report's paired
tests, the update-size probe of each option (update_scale.py) and llm_xsum.py's option rows. Tiny grids on a tiny
BERT (``--smoke``) and tiny CoLA files: no real data, no MiniLM wheel."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.builders import REPO_ROOT, write_cola

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import reproduce  # noqa: E402
import update_scale  # noqa: E402


@pytest.fixture
def glue(tmp_path) -> Path:
    """A tiny CoLA (48 rows: 16 after --smoke's cut, 4 steps at batch 4)."""
    write_cola(tmp_path / "glue" / "CoLA", rows=48)
    return tmp_path / "glue"


@pytest.fixture
def fits(monkeypatch) -> list:
    """The LightningCLI object of every fit the grid runs (to look at the trained modules)."""
    import adalora_pl.cli as cli

    made = []
    real_main = cli.main

    def keeping_main(args):
        made.append(real_main(args))
        return made[-1]

    monkeypatch.setattr(cli, "main", keeping_main)
    return made


def tiny_grid(tmp_path: Path, glue: Path, *extra: str, results: bool = True) -> list[str]:
    """``--smoke`` on the tiny CoLA, 4 optimizer steps (so AdaLoRA's pattern is its own, not the start's)."""
    argv = ["--smoke", "--tasks", "cola", "--data-dir", str(glue), "--out", str(tmp_path / "out"), *extra]
    if results:
        argv += ["--results-dir", str(tmp_path / "results")]
    return [*argv, "--trainer-args", "--data.batch_size", "4"]


# ------------------------------------------------------------------------------------------------ the rows' options
def test_method_args_of_each_option_row():
    base = ["--model.method", "adalora", "--model.init_r", "12", "--model.target_r", "8"]
    args = {m: reproduce.method_args(m, 12, 8, 32, 32.0) for m in reproduce.OPTION_METHODS}
    assert args == {
        "adalora_lr_plus": [*base, "--model.lr_ratio_b", "4"],
        "adalora_rslora": [*base, "--model.scaling", "alpha_over_sqrt_r"],
        "adalora_weight_svd": [*base, "--model.adapter_init", "weight_svd"],
        "adalora_gradient_svd": [*base, "--model.adapter_init", "gradient_svd"],
        "adalora_combo": [*base, "--model.lr_ratio_b", "4", "--model.scaling", "alpha_over_sqrt_r",
                          "--model.adapter_init", "weight_svd"],
    }
    # another ratio, lora_E's ratio when given, a combination in one order whatever the order given
    assert reproduce.method_args("adalora_lr_plus", 12, 8, 32, lr_ratio_b=2.5, lr_ratio_e=8)[-4:] == [
        "--model.lr_ratio_b", "2.5", "--model.lr_ratio_e", "8"]
    assert reproduce.method_args("adalora_combo", 12, 8, 32, combo=["weight_svd", "lr_plus"])[6:] == [
        "--model.lr_ratio_b", "4", "--model.adapter_init", "weight_svd"]
    with pytest.raises(ValueError, match="unknown AdaLoRA options"):
        reproduce.option_fields(["lora_plus"])
    # the two-stage row: LoRA with scaled LoRA's alpha (alpha * target_r / init_r); the pattern comes at run time
    assert reproduce.method_args("lora_from_pattern", 12, 8, 32, 32.0) == reproduce.method_args(
        "lora_scaled", 12, 8, 32, 32.0) == ["--model.method", "lora", "--model.init_r", "8", "--model.lora_alpha",
                                            "21.3333"]
    for method in (*reproduce.OPTION_METHODS, reproduce.PATTERN_METHOD):
        assert method in reproduce.METHODS and method in reproduce.ADALORA_VARIANTS
    # every option's CLI field is one of AdaLoRAConfig's (the CLI would refuse a misspelt one only at run time)
    from dataclasses import fields

    from adalora_pl import AdaLoRAConfig

    names = {f.name for f in fields(AdaLoRAConfig)}
    for options in (reproduce.DEFAULT_COMBO, ["gradient_svd"]):
        assert set(reproduce.option_fields(options, lr_ratio_e=2.0)) <= names
    assert reproduce.option_fields(["gradient_svd", "rslora"]) == {"scaling": "alpha_over_sqrt_r",
                                                                   "adapter_init": "gradient_svd"}
    with pytest.raises(ValueError, match=r"options \['weight_svd', 'gradient_svd'\] are two starts"):
        reproduce.option_fields(["weight_svd", "gradient_svd"])
    with pytest.raises(SystemExit):  # the parser says so, naming the allowed names
        reproduce.parse_args(["--preset", "short", "--combo", "weight_svd,gradient_svd"])
    assert reproduce.grid_order(["lora_from_pattern", "lora", "adalora"]) == ["lora", "adalora", "lora_from_pattern"]


def test_short_preset_picks_its_folder_and_defaults(tmp_path, named_backbones):
    minilm, _ = named_backbones
    args = reproduce.parse_args(["--preset", "short"])
    assert Path(args.results_dir) == REPO_ROOT / "benchmarks" / "results" / "short"
    assert Path(args.plot) == REPO_ROOT / "benchmarks" / "results" / "short" / "learning_curves.png"
    assert (args.tasks, args.seeds) == (["cola", "rte", "mrpc", "stsb"], [1, 2, 3])
    assert args.methods == ["adalora", "lora", "lora_scaled", "adalora_lr_plus", "adalora_rslora",
                            "adalora_weight_svd", "adalora_gradient_svd", "adalora_combo", "lora_from_pattern"]
    assert args.backbone == str(minilm) and args.backbone_suffix == ""
    # the default 189-step grid: 2000 rows, 3 epochs, lr 1e-3, AdaLoRA 12 -> 8, the recorded lr_ratio_b
    plain = reproduce.settings("adalora", "cola", 2, args)
    assert reproduce.settings("adalora_lr_plus", "cola", 2, args) == [*plain[:8], "--model.lr_ratio_b", "4",
                                                                       *plain[8:]]
    assert plain == reproduce.settings("adalora", "cola", 2, reproduce.parse_args([]))  # the default grid's run
    assert plain[-2:] == ["--data.max_train_samples", "2000"] and "--model.learning_rate" in plain
    assert plain[plain.index("--trainer.max_epochs") + 1] == "3" and plain[plain.index("--model.init_r") + 1] == "12"

    # explicit values win; a tag names the files, folders and curves of a sweep
    own = reproduce.parse_args(["--preset", "short", "--results-dir", str(tmp_path), "--seeds", "1", "--methods",
                                "adalora", "--tag", "lr2e-3", "--learning-rate", "2e-3"])
    assert (own.results_dir, own.seeds, own.methods, own.lr) == (str(tmp_path), [1], ["adalora"], 2e-3)
    assert reproduce.result_path("adalora", "rte", 1, own) == tmp_path / "rte-adalora-1-lr2e-3.json"
    assert reproduce.run_dir_path("adalora", "rte", 1, own).name == "adalora_rte_1-lr2e-3"
    assert Path(own.plot).name == "learning_curves-lr2e-3.png"
    for bad in (["--paper"], ["--tag", "a/b"], ["--combo", "lr_plus,pissa"], ["--method-lr", "adalora"],
                ["--method-lr", "nope=1e-3"], ["--method-lr", "lora=-1"]):
        with pytest.raises(SystemExit):
            reproduce.parse_args(["--preset", "short", *bad])


def test_method_lr_and_the_committed_long_results_still_match(tmp_path, named_backbones):
    short = reproduce.parse_args(["--preset", "short", "--method-lr", "adalora_lr_plus=5e-4", "lora=2e-3"])
    assert short.method_lr == {"adalora_lr_plus": 5e-4, "lora": 2e-3}
    rate = {m: (s := reproduce.settings(m, "cola", 1, short))[s.index("--model.learning_rate") + 1]
            for m in ("adalora", "adalora_lr_plus", "lora")}
    assert rate == {"adalora": "0.001", "adalora_lr_plus": "0.0005", "lora": "0.002"}
    # the long preset keeps the configs' rates unless asked, so every committed long-grid result is still reused
    committed = sorted((REPO_ROOT / "benchmarks" / "results" / "long").glob("*-*-*.json"))
    assert committed
    for path in committed:
        result = json.loads(path.read_text())
        backbone = ["--backbone", "mpnet"] if path.stem.endswith("-mpnet") else []
        args = reproduce.parse_args(["--preset", "long", "--results-dir", str(tmp_path), *backbone])
        assert result["settings"] == reproduce.planned_settings(result["method"], result["task"], result["seed"],
                                                                args), path.name
    long = reproduce.parse_args(["--preset", "long", "--results-dir", str(tmp_path), "--method-lr", "lora=1e-4"])
    assert reproduce.settings("lora", "cola", 1, long)[-2:] == ["--model.learning_rate", "0.0001"]
    assert "--model.learning_rate" not in reproduce.settings("adalora", "cola", 1, long)


# ------------------------------------------------------------------------------------------------ runs
@pytest.mark.slow
def test_lora_from_pattern_trains_lora_at_exactly_the_ranks_of_the_adalora_pattern(tmp_path, glue, fits):
    # given before adalora on purpose: the grid runs adalora first, since the two-stage row needs its pattern
    payload = reproduce.main(tiny_grid(tmp_path, glue, "--methods", "lora_from_pattern", "adalora", "lora_scaled"))
    assert [r["method"] for r in payload["results"]] == ["adalora", "lora_from_pattern", "lora_scaled"]
    adalora_cli, pattern_cli, _ = fits
    results = tmp_path / "results"
    copy = results / "cola-adalora-1.rank_pattern.json"
    written = Path(adalora_cli.trainer.log_dir) / "rank_pattern.json"
    assert copy.read_text() == written.read_text()  # the adalora run's own file, kept beside its result
    modules = json.loads(copy.read_text())["modules"]
    pattern = {name.removeprefix("model."): info["rank"] for name, info in modules.items()}

    model = pattern_cli.model
    assert model.hparams.method == "lora" and model.adalora.rank_pattern == str(copy)
    trained = {name: int(layer.r) for name, layer in model.adapters.items()}
    assert trained == {name: rank for name, rank in pattern.items() if rank > 0}  # rank 0: left unadapted
    for name, layer in model.adapters.items():
        assert tuple(layer.lora_A.shape)[0] == tuple(layer.lora_B.shape)[1] == pattern[name]
    # the final budget of AdaLoRA (target_r 8 per module on average) and of lora_scaled at r = 8
    assert sum(pattern.values()) == 8 * len(modules) == sum(trained.values())
    assert len(set(pattern.values())) > 1  # a real allocation, not uniform ranks
    two_stage = payload["results"][1]
    assert two_stage["rank_pattern"]["ranks"] == {name: info["rank"] for name, info in modules.items()}
    assert two_stage["settings"][1] == "rank_pattern_of=adalora " + " ".join(payload["results"][0]["settings"][1:])
    # scaled LoRA's alpha (32 * 8 / 12 as the command line writes it): a module at rank k scales by alpha / k
    alpha = 21.3333
    assert all(layer.scaling == pytest.approx(alpha / layer.r) for layer in model.adapters.values())

    # the report pairs it with adalora and the same-budget LoRA rows
    tests = payload["significance"]
    for line in ("lora_from_pattern - adalora:", "lora_from_pattern - lora_scaled:", "adalora - lora_scaled:"):
        assert line in tests
    assert "| lora_from_pattern |" in payload["table"]

    # the pattern is found in --out too when there is no results folder (the file the fit wrote)
    args = reproduce.parse_args(tiny_grid(tmp_path, glue, results=False))
    assert reproduce.rank_pattern_file("cola", 1, args) == written
    # a rerun reads both back, without training
    fits.clear()
    again = reproduce.main(tiny_grid(tmp_path, glue, "--methods", "adalora", "lora_from_pattern"))
    assert fits == [] and again["results"][1] == two_stage


def test_lora_from_pattern_without_its_adalora_run_fails_saying_so(tmp_path, glue, fits):
    with pytest.raises(SystemExit, match="run adalora first"):
        reproduce.main(tiny_grid(tmp_path, glue, "--methods", "lora_from_pattern", "lora"))
    assert fits == [] and not (tmp_path / "results").exists()  # stopped before training anything
    assert not (tmp_path / "out" / "lora_from_pattern_cola_1").exists()
    # an adalora run of another grid (here: another tag) is not taken for this one's
    args = reproduce.parse_args(tiny_grid(tmp_path, glue, "--tag", "other"))
    folder = reproduce.run_dir_path("adalora", "cola", 1, args) / "lightning_logs" / "version_0"
    folder.mkdir(parents=True)
    (folder / "rank_pattern.json").write_text("{}")
    (folder.parents[1] / "settings.json").write_text(json.dumps(["another run"]))
    with pytest.raises(SystemExit, match="run adalora first"):
        reproduce.rank_pattern_file("cola", 1, args)
    # the update-size probe needs it too
    grid = reproduce.parse_args(["--preset", "short", "--tasks", "cola", "--seeds", "1", "--backbone",
                                 str(tmp_path / "out" / "tiny_backbone"), "--out", str(tmp_path / "out"),
                                 "--results-dir", str(tmp_path / "results")])
    with pytest.raises(SystemExit, match="run adalora first"):
        update_scale.probe("lora_from_pattern", "cola", 1, update_scale.argparse.Namespace(steps=1, every=1), grid)


@pytest.mark.slow
def test_lr_ratio_b_values_are_recorded_and_do_not_collide(tmp_path, glue, fits):
    for ratio in ("2", "8"):
        reproduce.main(tiny_grid(tmp_path, glue, "--methods", "adalora_lr_plus", "--lr-ratio-b", ratio, "--tag",
                                 f"lrb{ratio}"))
    stored = {r: json.loads((tmp_path / "results" / f"cola-adalora_lr_plus-1-lrb{r}.json").read_text())
              for r in ("2", "8")}
    for ratio, result in stored.items():
        settings = result["settings"]
        assert settings[settings.index("--model.lr_ratio_b") + 1] == ratio
    # what the optimizer did with them: lora_B's group at R times the adapters' learning rate
    for cli, ratio in zip(fits, (2.0, 8.0), strict=True):
        assert cli.model.hparams.lr_ratio_b == ratio
        groups = cli.trainer.optimizers[0].param_groups
        assert {round(g["initial_lr"] / 1e-3, 6) for g in groups} >= {1.0, ratio}
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("adalora")) == [
        "adalora_lr_plus_cola_1-lrb2", "adalora_lr_plus_cola_1-lrb8"]
    # the same tag with another ratio is refused, not reused
    with pytest.raises(SystemExit, match="was made with other settings"):
        reproduce.main(tiny_grid(tmp_path, glue, "--methods", "adalora_lr_plus", "--lr-ratio-b", "4", "--tag",
                                 "lrb2"))


def test_report_has_the_option_rows_and_their_paired_tests(tmp_path, monkeypatch):
    import adalora_pl.cli as cli

    def no_training(_args):
        raise AssertionError("--report-only must not train")

    monkeypatch.setattr(cli, "main", no_training)
    argv = ["--smoke", "--preset", "short", "--tasks", "cola", "--seeds", "1", "2", "--out", str(tmp_path / "out"),
            "--results-dir", str(tmp_path / "results"), "--report-only"]
    args = reproduce.parse_args(argv)
    assert args.methods == list(reproduce.SHORT_METHODS)
    (tmp_path / "results").mkdir()
    metric = {"adalora": 30.0, "lora": 40.0, "lora_scaled": 36.0, "adalora_lr_plus": 38.0, "adalora_rslora": 33.0,
              "adalora_weight_svd": 31.0, "adalora_gradient_svd": 35.0, "adalora_combo": 41.0,
              "lora_from_pattern": 37.0}
    for method, value in metric.items():
        for seed in (1, 2):
            run = {"method": method, "task": "cola", "seed": seed, "metric": value + seed, "params": 100,
                   "steps": 20, "seconds": 60.0, "curve": [[10, value], [20, value + seed]],
                   "settings": reproduce.planned_settings(method, "cola", seed, args)}
            reproduce.result_path(method, "cola", seed, args).write_text(json.dumps(run))
    payload = reproduce.main(argv)
    rows = payload["table"].splitlines()[2:]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == list(reproduce.SHORT_METHODS)
    assert rows[3] == "| adalora_lr_plus | 0.000M | 39.50±0.71 | 39.50 |"
    tests = payload["significance"].splitlines()
    expected = {"adalora - lora": -10, "adalora - lora_scaled": -6, "adalora_lr_plus - adalora": 8,
                "adalora_rslora - adalora": 3, "adalora_weight_svd - adalora": 1, "adalora_combo - adalora": 11,
                "lora_from_pattern - adalora": 7, "adalora_lr_plus - lora": -2, "adalora_combo - lora_scaled": 5,
                "adalora_weight_svd - lora_scaled": -5, "lora_from_pattern - lora": -3,
                "lora_from_pattern - lora_scaled": 1, "adalora_gradient_svd - adalora": 5,
                "adalora_gradient_svd - lora": -5}
    for pair, difference in expected.items():
        assert any(line.startswith(f"{pair}: mean difference {difference:+.2f} points over 2") for line in tests), pair
    # 2 LoRA peers + 6 variants against adalora + 6 rows against each of 2 same-budget peers; no lora_init_r row here
    assert sum("sign-flip" in line for line in tests) == 2 + 6 + 12
    assert not any("lora_init_r" in line for line in tests)


# ------------------------------------------------------------------------------------------------ update-size probe
@pytest.mark.slow
def test_update_scale_probes_the_short_grid_with_each_option(tmp_path, tiny_backbone):
    write_cola(tmp_path / "glue" / "CoLA", rows=48)
    out = tmp_path / "scale.json"
    payload = update_scale.main(["--preset", "short", "--task", "cola", "--steps", "2", "--every", "1", "--methods",
                                 "adalora", "adalora_weight_svd", "adalora_lr_plus", "--lr-ratio-b", "8",
                                 "--max-seq-length", "32", "--backbone", tiny_backbone, "--data-dir",
                                 str(tmp_path / "glue"), "--json", str(out)])
    assert json.loads(out.read_text()) == payload
    assert payload["preset"] == "short" and payload["grid_options"] == ["--lr-ratio-b", "8", "--max-seq-length", "32"]
    assert payload["table"].splitlines()[0] == "| step | adalora | adalora_weight_svd | adalora_lr_plus |"
    records = payload["records"]
    # the weight-SVD start counts what it learned, not the principal components it starts from (which are most of
    # W: a ratio near 1), so it is on the scale of the other rows after the same steps
    assert 0 < records["adalora_weight_svd"][-1]["relative_update"] < 0.1
    assert all(0 < r["relative_update"] < 0.1 for m in records for r in records[m])
    # the default JSON goes to the preset's folder; long still refuses a task it does not cover
    with pytest.raises(SystemExit):
        update_scale.main(["--preset", "long", "--task", "rte"])
    with pytest.raises(SystemExit):
        update_scale.main(["--preset", "short", "--seeds", "2"])  # the probe's own --seed, not the grid's


def test_relative_update_of_a_weight_svd_start_is_zero_before_training(tiny_backbone):
    import torch

    from adalora_pl.tasks.glue_module import GLUEClassifier

    module = GLUEClassifier(backbone=tiny_backbone, task_name="cola", method="adalora", init_r=4, target_r=2,
                            adapter_init="weight_svd")
    layer = next(iter(module.adapters.values()))
    assert update_scale.relative_update(layer) < 1e-6  # untrained: the product is the initial components
    assert float(layer.delta_weight().norm() / layer.base_layer.weight.norm()) > 0.1  # what a naive ratio shows
    with torch.no_grad():
        layer.lora_E.add_(0.01)
    assert update_scale.relative_update(layer) > 1e-4


# ------------------------------------------------------------------------------------------------ XSum rows
@pytest.mark.slow
def test_llm_xsum_option_rows_and_the_two_stage_row(tmp_path, real_data):
    from benchmarks import llm_xsum

    out, result = tmp_path / "out", tmp_path / "result.json"
    common = ["--smoke", "--out", str(out), "--json", str(result), "--data-dir", str(real_data)]
    with pytest.raises(SystemExit, match="run the adalora part first"):
        llm_xsum.main([*common, "--parts", "lora_from_pattern"])
    data = llm_xsum.main([*common, "--parts", "lora_scaled,adalora,lora_from_pattern", "--adalora-options",
                          "lr_plus,rslora,weight_svd,combo", "--combo", "rslora,lr_plus", "--lr-ratio-b", "8"])
    methods = data["methods"]
    assert list(methods) == ["lora_scaled", "adalora", "adalora_lr_plus", "adalora_rslora", "adalora_weight_svd",
                             "adalora_combo", "lora_from_pattern"]
    assert methods["adalora_lr_plus"]["settings"] == {"method": "adalora", "lr_ratio_b": 8.0}
    assert methods["adalora_combo"]["settings"] == {"method": "adalora", "lr_ratio_b": 8.0,
                                                    "scaling": "alpha_over_sqrt_r"}
    assert methods["adalora_weight_svd"]["settings"] == {"method": "adalora", "adapter_init": "weight_svd"}
    # smoke: init_r 4 -> target_r 2, alpha 32, 14 layers; every row at the same final budget
    assert methods["lora_scaled"]["settings"] == {"method": "lora", "init_r": 2, "lora_alpha": 16.0}
    pattern = json.loads((out / "adalora" / "rank_pattern.json").read_text())
    two_stage = methods["lora_from_pattern"]
    assert two_stage["settings"]["rank_pattern"] == str(out / "adalora" / "rank_pattern.json")
    assert two_stage["total_rank"] == pattern["total_rank"] == 2 * 14
    assert all(r["total_rank"] == 2 * 14 and r["steps"] == 4 for r in methods.values())
    # the option rows are added to the same JSON; another ratio is another run, refused
    with pytest.raises(SystemExit, match="other settings"):
        llm_xsum.main([*common, "--parts", "", "--adalora-options", "lr_plus", "--lr-ratio-b", "2"])
