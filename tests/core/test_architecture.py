"""Imports run one way: the method's core <- its Lightning glue <- the task recipes; the DataModules use only the
task registries and the loading checks, never the method (README, "Project layout").

Every import statement of the source files is read with ``ast``, those inside functions too (a lazy import is still
a dependency), relative imports resolved, and ``importlib.import_module("constant")`` counted as an import. Then, at
run time, a fresh interpreter imports a module and ``sys.modules`` tells what that really loaded (package
``__init__`` files and everything imported on the way included).
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.builders import REPO_ROOT

PACKAGE = REPO_ROOT / "adalora_pl"
DATAMODULES = REPO_ROOT / "datamodules"
CORE_FILES = ("layers.py", "fused_add.py", "importance.py", "schedule.py", "allocator.py", "injection.py",
              "gradient_start.py")
CORE_MODULES = tuple(f"adalora_pl.{name.removesuffix('.py')}" for name in CORE_FILES)

Rule = Callable[[str], bool]


def under(*prefixes: str) -> Rule:
    """True for a module that is one of ``prefixes`` or inside one of them (``lightning`` covers ``lightning.pytorch``,
    not ``lightning_utilities``)."""
    return lambda name: any(name == p or name.startswith(p + ".") for p in prefixes)


CORE_MAY_NOT_IMPORT = under(
    "lightning", "pytorch_lightning", "adalora_pl.tasks", "adalora_pl.io", "adalora_pl.baselines",
    "adalora_pl.callback", "adalora_pl.module", "datamodules",
)
PACKAGE_MAY_NOT_IMPORT = under("datamodules")
TASK_MODULE = re.compile(r"adalora_pl\.tasks\.\w+_module(\..+)?")


def datamodules_may_not_import(name: str) -> bool:
    """The core, the Lightning glue and the task LightningModules; the task registries (``adalora_pl.tasks.glue``,
    ``adalora_pl.tasks.squad``) and the loading checks (``adalora_pl.io.pretrained``) are allowed."""
    glue = under(*CORE_MODULES, "adalora_pl.callback", "adalora_pl.module")
    return glue(name) or TASK_MODULE.fullmatch(name) is not None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> Iterator[tuple[int, str, tuple[str, ...]]]:
    """(line, module, names) for every import in ``source``, the text of ``module``: ``from a.b import c, d`` gives
    ``(line, "a.b", ("c", "d"))`` (``c`` may be a submodule: ``from adalora_pl import callback``), ``import a.b``
    gives ``(line, "a.b", ())``."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module
            yield node.lineno, base, tuple(alias.name for alias in node.names if alias.name != "*")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value, ()


def forbidden_imports(source: str, module: str, label: str, rule: Rule, is_package: bool = False) -> list[str]:
    """``label:line imports name`` for every import of ``source`` that ``rule`` forbids: the module, or else
    those of the names imported from it that name a forbidden submodule."""
    found = []
    for line, name, members in sorted(imported_modules(source, module, is_package)):
        if rule(name):
            found.append(f"{label}:{line} imports {name}")
        else:
            found += [f"{label}:{line} imports {name}.{m}" for m in members if rule(f"{name}.{m}")]
    return found


def violations(files: list[Path], rule: Rule) -> list[str]:
    assert files, "no files to check: did the layout move?"
    found = []
    for path in files:
        label = str(path.relative_to(REPO_ROOT))
        found += forbidden_imports(path.read_text(encoding="utf-8"), module_name(path), label, rule,
                                   is_package=path.name == "__init__.py")
    return found


def test_core_files_exist():
    """The rules below check these files by name: renaming one must not turn its check into a silent pass."""
    missing = [name for name in CORE_FILES if not (PACKAGE / name).is_file()]
    assert not missing, f"core files not found in adalora_pl/: {missing} (update CORE_FILES)"


def test_core_imports_no_lightning_and_nothing_above_it():
    found = violations([PACKAGE / name for name in CORE_FILES], CORE_MAY_NOT_IMPORT)
    assert not found, "the core (no Lightning) imports Lightning or a layer above it:\n" + "\n".join(found)


def test_the_package_does_not_import_the_datamodules():
    found = violations(sorted(PACKAGE.rglob("*.py")), PACKAGE_MAY_NOT_IMPORT)
    assert not found, "adalora_pl imports the datamodules:\n" + "\n".join(found)


def test_datamodules_import_only_the_task_registries_and_loading_checks():
    found = violations(sorted(DATAMODULES.rglob("*.py")), datamodules_may_not_import)
    assert not found, "a DataModule imports the method or a task's LightningModule:\n" + "\n".join(found)


SYNTHETIC_CORE = '''
"""A core file that has gone wrong."""
import torch
from torch import nn

from adalora_pl.layers import SVDLinear


def late():
    import lightning.pytorch as pl  # inside a function: still a dependency

    return pl


class Holder:
    def method(self):
        from ..callback import AdaLoRACallback  # relative, two levels up from adalora_pl.sub.core
        from . import module
        from adalora_pl import io

        return AdaLoRACallback, module, io


def dynamic():
    import importlib

    return importlib.import_module("datamodules.glue")
'''


def test_the_checker_reports_forbidden_imports_wherever_they_are():
    """The checker itself can fail: a synthetic file with forbidden imports at top level, inside functions and
    methods, relative and dynamic ones, is reported with file, line and module; the allowed ones are not."""
    found = forbidden_imports(SYNTHETIC_CORE, "adalora_pl.sub.core", "adalora_pl/sub/core.py", CORE_MAY_NOT_IMPORT)
    assert found == [
        "adalora_pl/sub/core.py:10 imports lightning.pytorch",
        "adalora_pl/sub/core.py:17 imports adalora_pl.callback",
        "adalora_pl/sub/core.py:19 imports adalora_pl.io",
        "adalora_pl/sub/core.py:27 imports datamodules.glue",
    ], found
    # ``from . import module`` in adalora_pl.sub names adalora_pl.sub.module, not the glue's adalora_pl.module
    assert not any("sub.module" in line for line in found)


@pytest.mark.parametrize(
    ("source", "reported"),
    [
        ("from adalora_pl.tasks.glue import GlueTask", False),
        ("from adalora_pl.tasks.squad import squad_metrics", False),
        ("from adalora_pl.io.pretrained import LoadError", False),
        ("from datamodules._base import TokenizedDataModule", False),
        ("from adalora_pl.tasks.glue_module import GLUEClassifier", True),
        ("from adalora_pl.tasks import qa_module", True),
        ("def f():\n    from adalora_pl.tasks.summarization_module import Seq2SeqSummarizer", True),
        ("from adalora_pl.injection import find_adapters", True),
        ("import adalora_pl.fused_add", True),
        ("from adalora_pl.module import AdapterModule", True),
        ("from adalora_pl import callback", True),
    ],
)
def test_the_datamodule_rule_allows_registries_and_refuses_the_method(source, reported):
    found = forbidden_imports(source, "datamodules.example", "datamodules/example.py", datamodules_may_not_import)
    assert bool(found) == reported, found


# ---------------------------------------------------------------------------------------- at run time
# The rules above read each file alone; what an import really loads also depends on the package __init__ files and
# on every module imported on the way. These tests import modules in a fresh interpreter and read sys.modules.
# The package __init__ files export lazily (adalora_pl/_lazy.py), so a package costs what its used submodules cost.
RUNTIME_CORE = (*CORE_MODULES, "adalora_pl.config", "adalora_pl.errors")
# Beyond the core, the files that read, write and convert adapters (and the baselines' layers they need to): an
# export needs no Trainer.
RUNTIME_NO_LIGHTNING = (*RUNTIME_CORE, "adalora_pl.baselines.prune_lora", "adalora_pl.baselines.registry",
                        "adalora_pl.io.adapter", "adalora_pl.io.peft", "adalora_pl.io.lora", "adalora_pl.io.surgery")
LAZY_PACKAGES = ("adalora_pl", "adalora_pl.io", "adalora_pl.baselines", "adalora_pl.tasks", "datamodules")
DATAMODULE_MODULES = tuple(module_name(path) for path in sorted(DATAMODULES.glob("[!_]*.py")))
LIGHTNING = under("lightning", "pytorch_lightning")
# What a DataModule may load of adalora_pl: the packages (lazy), the errors, the loading checks and the task
# registries; nothing of the method (layers, allocator, callback), its adapter files or the task LightningModules.
DATAMODULES_MAY_LOAD = frozenset({
    "adalora_pl", "adalora_pl._lazy", "adalora_pl.errors", "adalora_pl.io", "adalora_pl.io.pretrained",
    "adalora_pl.tasks", "adalora_pl.tasks.glue", "adalora_pl.tasks.squad",
})
IMPORT_ONE_BY_ONE = """
import importlib, json, sys
added, seen = {}, set(sys.modules)
for name in NAMES:
    importlib.import_module(name)
    added[name] = sorted(set(sys.modules) - seen)
    seen = set(sys.modules)
print(json.dumps(added))
"""


def loaded_by(*modules: str) -> dict[str, list[str]]:
    """A fresh interpreter (in the repo root) imports ``modules`` one after the other: the modules each import added
    to ``sys.modules`` (a module two of them need is counted for the first)."""
    code = f"NAMES = {list(modules)!r}\n{IMPORT_ONE_BY_ONE}"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:  # pytest.fail, not an assert: the error is the import's, not a finding of the rule
        pytest.fail(f"importing {modules} failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def offending(added: dict[str, list[str]], rule: Rule) -> dict[str, list[str]]:
    return {module: found[:5] for module, names in added.items() if (found := [n for n in names if rule(n)])}


def test_the_run_time_probe_sees_what_an_import_loads():
    """The probe can fail: torch and transformers alone load no Lightning (so the failures below come from this
    repository's imports, not the environment's), and the probe sees Lightning where it is imported."""
    added = loaded_by("torch", "transformers.modeling_utils", "adalora_pl.callback")
    assert list(offending(added, LIGHTNING)) == ["adalora_pl.callback"], offending(added, LIGHTNING)
    assert "adalora_pl.allocator" in added["adalora_pl.callback"]


def test_importing_a_package_loads_none_of_its_submodules():
    """The package __init__ files name their exports and import nothing (not even torch) until one is used."""
    added = loaded_by(*LAZY_PACKAGES)
    found = offending(added, lambda name: name not in (*LAZY_PACKAGES, "adalora_pl._lazy") and (
        under("adalora_pl", "datamodules", "torch", "lightning")(name)))
    assert not found, f"importing a package loads modules it does not need yet: {found}"


def test_importing_the_core_modules_does_not_load_lightning():
    """The core (layers, allocator, schedule, importance, config, errors...) and the adapter files (save, load,
    PEFT, LoRA, merge), with every module they import on the way and the package __init__ files, load no
    Lightning."""
    added = loaded_by(*RUNTIME_NO_LIGHTNING)
    assert set(RUNTIME_NO_LIGHTNING) <= {name for names in added.values() for name in names}  # really imported here
    found = offending(added, LIGHTNING)
    assert not found, f"the core loads Lightning at run time: {found}"


def test_importing_the_datamodules_does_not_load_the_method():
    """``import datamodules.glue`` (and every other DataModule) loads the loading checks and the task registries of
    adalora_pl, not the adapter code (callback, allocator, layers, adapter files, baselines)."""
    assert DATAMODULE_MODULES and "datamodules.glue" in DATAMODULE_MODULES
    added = loaded_by(*DATAMODULE_MODULES)
    found = offending(added, lambda name: under("adalora_pl")(name) and name not in DATAMODULES_MAY_LOAD)
    assert not found, f"importing a DataModule loads the method: {found}"


@pytest.mark.parametrize("package", ["adalora_pl", "adalora_pl.io", "adalora_pl.baselines"])
def test_every_lazy_export_resolves_to_its_submodules_object(package):
    """Each name of ``__all__`` is the object its submodule defines, ``dir()`` lists it, and a name that is not
    exported raises AttributeError (the fallback that lets ``from adalora_pl import fused_add`` import a submodule)."""
    module = importlib.import_module(package)
    exports = module._EXPORTS
    assert module.__all__ == sorted(name for names in exports.values() for name in names)
    for source, names in exports.items():
        for name in names:
            assert getattr(module, name) is getattr(importlib.import_module(source), name), (package, name)
    assert set(module.__all__) <= set(dir(module))
    with pytest.raises(AttributeError, match="has no attribute 'not_exported'"):
        module.not_exported  # noqa: B018


def test_the_top_level_exports_keep_every_name_and_add_the_config():
    """What ``from adalora_pl import X`` supported before the exports went lazy still works, and the settings object
    and its error are exported too; a submodule still imports by name."""
    before = {
        "AdaLoRACallback", "DEFAULT_TRAINABLE_MODULES", "IMPORTANCE_VARIANTS", "TARGET_MODULE_PRESETS",
        "BudgetSchedule", "LoRALinear", "MaskEvent", "RankAllocator", "SVDLinear", "budget_at", "compact_adapters",
        "count_adapter_parameters", "export_lora", "export_peft", "import_peft", "load_adapter", "merge_adapters",
        "rank_table", "save_adapter", "save_budget_curve", "save_rank_heatmap", "find_adapters", "inject_adapters",
        "mask_threshold", "orthogonal_regularizer", "set_trainable_modules", "triplet_scores",
    }
    import adalora_pl

    # and the opt-in options' helpers (README, "Faster-starting options"), the kernel switch (README, "Speed")
    options = {"adapter_param_groups", "read_rank_pattern", "base_weight_gradients", "start_from_gradients"}
    assert before | {"AdaLoRAConfig", "ConfigError", "set_kernel"} | options == set(adalora_pl.__all__)
    from adalora_pl import AdaLoRAConfig, ConfigError, fused_add
    from adalora_pl.config import AdaLoRAConfig as config_class
    from adalora_pl.errors import ConfigError as error_class

    assert (AdaLoRAConfig, ConfigError) == (config_class, error_class)
    assert fused_add is importlib.import_module("adalora_pl.fused_add")


def test_lazy_exports_refuses_a_name_of_two_submodules():
    from adalora_pl._lazy import lazy_exports

    with pytest.raises(ValueError, match="'X' is exported from both a.b and a.c"):
        lazy_exports("a", {"a.b": ("X",), "a.c": ("X", "Y")})
