"""The command that ships with the package: ``adalora-pl`` (``adalora_pl.cli``), its recipes as package data, a bare
``--config`` name resolved to a shipped recipe, ``adalora-pl recipes``, and the built wheel, whose console script
runs from outside the checkout."""

from __future__ import annotations

import configparser
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from adalora_pl.cli import (
    RECIPES_DIR,
    main,
    program_name,
    recipe_description,
    recipe_names,
    resolve_config,
    resolve_recipes,
)
from tests.builders import REPO_ROOT, write_cola

CONFIGS = REPO_ROOT / "configs"
SHIPPED = sorted(p.stem for p in CONFIGS.glob("*.yaml"))


def exit_code(args: list[str], prog: str | None = None) -> int | str | None:
    """The status main(args) exits with (argparse and the one-line errors raise SystemExit)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args, prog=prog)
    return exit_info.value.code


# ---------------------------------------------------------------------------------------- one copy of each recipe
def test_configs_is_the_packaged_recipes_folder():
    """The checkout's configs/ is the package's recipes folder itself (a symlink), not a second copy to drift."""
    assert CONFIGS.is_symlink()
    assert CONFIGS.resolve() == RECIPES_DIR.resolve() == (REPO_ROOT / "adalora_pl" / "recipes").resolve()
    assert recipe_names() == SHIPPED and len(SHIPPED) >= 14
    assert {"cola", "stsb", "squad_v2", "xsum", "smollm2_xsum"} <= set(SHIPPED)


def test_no_recipe_points_at_the_checkouts_configs_folder():
    """The recipes travel without the checkout: a command line in their comments uses the recipe's name, and a path
    to configs/ only as the checkout's form of the same command."""
    for path in RECIPES_DIR.glob("*.yaml"):
        for line in path.read_text(encoding="utf-8").splitlines():
            if "configs/" in line:
                assert "in a checkout" in line, (path.name, line)


# ---------------------------------------------------------------------------------------- bare names
def test_a_bare_name_is_the_shipped_recipe_and_a_path_stays_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cola = str(RECIPES_DIR / "cola.yaml")
    assert resolve_config("cola") == cola
    assert resolve_config("smollm2_xsum") == str(RECIPES_DIR / "smollm2_xsum.yaml")
    # a path separator, a .yaml ending or inline YAML: LightningCLI's own reading, unchanged
    for value in ("configs/cola.yaml", "./cola", "cola.yaml", "cola.yml", str(RECIPES_DIR / "stsb.yaml"),
                  "{trainer: {max_steps: 2}}", "trainer: {max_steps: 2}"):
        assert resolve_config(value) == value
    # an existing file wins over the recipe of the same name; a folder (the task's data, say) does not
    (tmp_path / "cola").write_text("trainer: {max_steps: 2}\n")
    assert resolve_config("cola") == "cola"
    (tmp_path / "stsb").mkdir()
    assert resolve_config("stsb") == str(RECIPES_DIR / "stsb.yaml")
    # every spelling of the option, before and after the subcommand; other values untouched
    argv = ["--config", "rte", "fit", "--config", "cola", "--config=stsb", "-c", "mrpc", "-c=sst2",
            "--model.backbone", "cola", "--data.task_name=cola"]
    assert resolve_recipes(argv) == [
        "--config", str(RECIPES_DIR / "rte.yaml"), "fit", "--config", "cola",
        f"--config={RECIPES_DIR / 'stsb.yaml'}", "-c", str(RECIPES_DIR / "mrpc.yaml"),
        f"-c={RECIPES_DIR / 'sst2.yaml'}", "--model.backbone", "cola", "--data.task_name=cola",
    ]


def test_fit_by_recipe_name_prints_the_config_of_the_recipe_file(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout: no configs/ to fall back on
    assert exit_code(["fit", "--config", "stsb", "--print_config"]) == 0
    by_name = capsys.readouterr().out
    assert exit_code(["fit", "--config", str(CONFIGS / "stsb.yaml"), "--print_config"]) == 0
    by_path = capsys.readouterr().out
    assert by_name == by_path
    printed = yaml.safe_load(by_name)
    assert printed["data"]["init_args"]["task_name"] == "stsb"
    assert printed["model"]["init_args"]["init_r"] == yaml.safe_load((CONFIGS / "stsb.yaml").read_text())[
        "model"]["init_args"]["init_r"]


@pytest.mark.parametrize(("prog", "args"), [
    (None, ["fit", "--config", "colla"]),
    ("adalora-pl", ["validate", "--config=colla", "--trainer.max_steps", "2"]),
])
def test_an_unknown_recipe_name_is_one_line_naming_the_recipes(capsys, tmp_path, monkeypatch, prog, args):
    monkeypatch.chdir(tmp_path)
    assert exit_code(args, prog) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"{prog or 'cli.py'} {args[0]}: error: --config colla: no such file, nor a shipped recipe; "
                   f"the recipes are {', '.join(SHIPPED)} (or give a path to a YAML file)"]


# ---------------------------------------------------------------------------------------- `recipes`, prog
def test_recipes_lists_every_shipped_recipe_on_one_line(capsys):
    assert main(["recipes"]) is None
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == SHIPPED
    described = dict(line.split(None, 1) for line in lines)
    assert described["cola"] == "CoLA with AdaLoRA on DeBERTaV3-base"
    assert described["xsum"] == "XSum with AdaLoRA on BART-large"
    assert described["smollm2_xsum"] == "XSum as instruction tuning of SmolLM2-135M-Instruct"
    for name, text in described.items():
        # a summary, not a header line cut in the middle of a parenthesis or a sentence
        assert text == recipe_description(CONFIGS / f"{name}.yaml") and 10 < len(text) <= 90, (name, text)
        assert text.count("(") == text.count(")") and not text.endswith((",", ":", ";")), (name, text)


def test_recipes_help_names_the_folder_and_refuses_arguments(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # argparse would break the long path at its width
    assert exit_code(["recipes", "--help"], "adalora-pl") == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("usage: adalora-pl recipes") and str(RECIPES_DIR) in out
    assert exit_code(["recipes", "cola"]) == 2
    assert "cli.py recipes: error: unrecognized arguments: cola" in capsys.readouterr().err


def test_the_messages_name_the_command_as_typed(capsys):
    assert program_name("/home/me/venv/bin/adalora-pl") == "adalora-pl"
    assert program_name("adalora-pl.exe") == "adalora-pl"
    assert program_name("cli.py") == program_name("/work/checkout/cli.py") == "cli.py"
    assert program_name("") == "cli.py"
    assert exit_code(["--help"], "adalora-pl") == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("usage: adalora-pl ")
    assert "(adalora-pl export --help)" in out and "(adalora-pl fit --config cola)" in out
    assert exit_code(["export", "--ckpt_path", "x.ckpt", "--format", "adapter"], "adalora-pl") == 2
    assert "adalora-pl export: error: the following arguments are required: --output" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- the built wheel
def build_wheel(out: Path) -> Path:
    """A wheel of a copy of the checkout's sources (so the build writes no build/ or egg-info into the checkout)."""
    source = out / "source"
    source.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, source / name)
    for name in ("adalora_pl", "datamodules"):
        shutil.copytree(REPO_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out / "dist"), str(source)]
    # The venv's setuptools when it has one recent enough (no download); else pip fetches the build requirement.
    setuptools = importlib.util.find_spec("setuptools")
    if setuptools is not None:
        from importlib.metadata import version

        if int(version("setuptools").split(".")[0]) >= 77:
            command.insert(4, "--no-build-isolation")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (out / "dist").glob("adalora_pl-*.whl")
    return wheel


def console_script(wheel: zipfile.ZipFile, folder: Path) -> Path:
    """The ``adalora-pl`` script pip writes for the wheel's entry point (its template: the function's return value
    goes to sys.exit)."""
    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    parser.read_string(wheel.read(entry_points).decode())
    target = parser["console_scripts"]["adalora-pl"]
    module, function = target.split(":")
    script = folder / "adalora-pl"
    script.write_text(
        f"import re\nimport sys\nfrom {module} import {function}\n"
        "if __name__ == '__main__':\n"
        "    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
        f"    sys.exit({function}())\n"
    )
    return script


@pytest.mark.slow
def test_the_wheel_ships_the_recipes_and_a_command_that_runs_outside_the_checkout(tmp_path, tiny_backbone):
    wheel_path = build_wheel(tmp_path / "build")
    with zipfile.ZipFile(wheel_path) as wheel:
        names = set(wheel.namelist())
        for path in sorted(CONFIGS.glob("*.yaml")):
            packaged = f"adalora_pl/recipes/{path.name}"
            assert packaged in names, packaged
            assert wheel.read(packaged) == path.read_bytes(), packaged
        assert not any(n.startswith("configs/") or n == "cli.py" for n in names)
        site, bin_dir, elsewhere = tmp_path / "site", tmp_path / "bin", tmp_path / "elsewhere"
        wheel.extractall(site)
        bin_dir.mkdir()
        elsewhere.mkdir()
        script = console_script(wheel, bin_dir)
    assert sorted(p.stem for p in (site / "adalora_pl" / "recipes").glob("*.yaml")) == SHIPPED

    # The unpacked wheel comes first on the path (the venv's editable install only after it), and the command runs
    # in a folder with no configs/ and no cli.py.
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONWARNINGS": "ignore", "COLUMNS": "1000"}

    def adalora_pl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), *args], cwd=elsewhere, env=env, capture_output=True,
                              text=True, timeout=600)

    # (each run imports torch and Lightning: the listing itself is checked in-process above)
    listing = adalora_pl("recipes", "--help")
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.startswith("usage: adalora-pl recipes")
    assert f"List the recipes shipped in {site / 'adalora_pl' / 'recipes'}:" in listing.stdout  # the wheel's copy

    unknown = adalora_pl("fit", "--config", "colla")
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines()[-1].startswith(
        "adalora-pl fit: error: --config colla: no such file, nor a shipped recipe; the recipes are cnndm, cola,")

    # A fit from the recipe's name ends with status 0 (the script passes the entry point's return value to sys.exit)
    data = write_cola(tmp_path / "CoLA", rows=16)
    fit = adalora_pl("fit", "--config", "cola", "--model.backbone", tiny_backbone, "--data.data_dir", str(data),
                     "--trainer.max_steps", "2", "--model.tinit", "0.1", "--model.tfinal", "0.3",
                     "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
                     "--trainer.default_root_dir", str(tmp_path / "run"), "--data.batch_size", "8")
    assert fit.returncode == 0, fit.stdout[-2000:] + fit.stderr[-4000:]
    assert re.search(r"AdaLoRA schedule: b0=\d+ -> bT=\d+ triplets", fit.stdout + fit.stderr)
    (ckpt,) = (tmp_path / "run").glob("lightning_logs/version_*/checkpoints/last.ckpt")
    exported = adalora_pl("export", "--ckpt_path", str(ckpt), "--format", "adapter", "--output",
                          str(tmp_path / "adapter"))
    assert exported.returncode == 0, exported.stderr[-4000:]
    assert any((tmp_path / "adapter").glob("*.safetensors"))
