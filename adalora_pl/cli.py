"""The command line, ``adalora-pl`` (or ``python cli.py`` in a checkout): LightningCLI with the shipped recipes.

``adalora-pl fit --config cola`` trains with the recipe ``adalora_pl/recipes/cola.yaml``: a ``--config`` value that is
a bare name (no path separator, no ``.yaml``, not an existing file) names a shipped recipe; anything else is a path,
as LightningCLI reads it. ``adalora-pl recipes`` lists the recipes. The YAML names the LightningModule and the
DataModule (``class_path``) with their arguments; every argument can be overridden on the command line
(``--model.backbone``, ``--data.data_dir``, ...). ``adalora-pl fit --config cola --print_config`` prints the
complete, re-runnable config.

``adalora-pl export --ckpt_path CKPT --format {adapter,peft,lora,merged} --output DIR`` turns a fit checkpoint into
an adapter-only safetensors file, a PEFT AdaLoRA folder, a PEFT LoRA folder or a merged transformers model.

A wrong setting or input file (:class:`~adalora_pl.errors.ConfigError`, wherever it is raised: a module or DataModule
constructor, a DataModule's ``setup``, the module's ``setup`` or a callback during fit) ends the run with one line,
``<prog> <subcommand>: error: <message>``, and exit status 2. ``<prog>`` is the command as typed (``adalora-pl``,
``cli.py``). Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from adalora_pl.errors import ConfigError
from adalora_pl.io.checkpoint import is_distributed_checkpoint, output_folder_problem, torch_archive_problem

# The name in messages when main() is called from Python with its own ``args`` (tests, benchmarks): sys.argv[0] is
# then the caller's program, not this command.
DEFAULT_PROG = "cli.py"


def program_name(argv0: str | None = None) -> str:
    """The command as the user typed it, for messages: the file name of ``argv0`` (default ``sys.argv[0]``).

    ``python cli.py`` gives ``cli.py``, the console script ``adalora-pl`` (``adalora-pl.exe`` on Windows) gives
    ``adalora-pl``; an empty ``argv0`` (an embedded interpreter) gives :data:`DEFAULT_PROG`.
    """
    argv0 = sys.argv[0] if argv0 is None and sys.argv else argv0
    name = Path(argv0).name if argv0 else ""
    return name.removesuffix(".exe") or DEFAULT_PROG


def extra_help(prog: str) -> str:
    """The help's epilog: the subcommands dispatched before Lightning's parser, which therefore does not list them."""
    # Prose, as argparse reflows an epilog into one paragraph.
    return (
        "Also: `export` turns a fit checkpoint into adapter safetensors, a PEFT AdaLoRA or LoRA folder or a merged "
        f"model ({prog} export --help); `recipes` lists the shipped recipes, which --config takes by name "
        f"({prog} fit --config cola)."
    )


# ---------------------------------------------------------------------------------------- recipes
# The YAML recipes ship inside the package (package data); the checkout's configs/ is a link to this folder.
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
RECIPE_SUFFIX = ".yaml"
# A name as a recipe's file stem is written. Inline YAML or JSON (jsonargparse takes `--config '{...}'`) has braces,
# colons or spaces and is never taken for one.
_BARE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
CONFIG_FLAGS = ("--config", "-c")


def recipe_names() -> list[str]:
    """The names of the shipped recipes (file stems of ``adalora_pl/recipes/*.yaml``), sorted."""
    return sorted(path.stem for path in RECIPES_DIR.glob(f"*{RECIPE_SUFFIX}"))


def is_bare_name(value: str) -> bool:
    """Whether a ``--config`` value names a recipe rather than a file: no path separator, no ``.yaml``/``.yml``/
    ``.json`` ending, not an existing file, nor inline YAML."""
    if not _BARE_NAME.fullmatch(value) or value.lower().endswith((".yaml", ".yml", ".json")):
        return False
    # A folder of that name (`cola/`, the task's data) is no config: the recipe is still meant.
    return not Path(value).is_file()


def resolve_config(value: str) -> str:
    """The file a ``--config`` value stands for: a bare name's shipped recipe, any other value unchanged.

    Raises :class:`~adalora_pl.errors.ConfigError` for a bare name that is not a recipe, naming the known ones.
    """
    if not is_bare_name(value):
        return value
    path = RECIPES_DIR / f"{value}{RECIPE_SUFFIX}"
    if not path.is_file():
        raise ConfigError(f"--config {value}: no such file, nor a shipped recipe; the recipes are "
                          f"{', '.join(recipe_names())} (or give a path to a YAML file)")
    return str(path)


def resolve_recipes(argv: Sequence[str]) -> list[str]:
    """``argv`` with each ``--config``/``-c`` value (``--config X`` or ``--config=X``) passed through
    :func:`resolve_config`."""
    resolved: list[str] = []
    expects_config = False
    for arg in argv:
        if expects_config:
            arg, expects_config = resolve_config(arg), False
        elif arg in CONFIG_FLAGS:
            expects_config = True
        else:
            flag, sep, value = arg.partition("=")
            if sep and flag in CONFIG_FLAGS:
                arg = f"{flag}={resolve_config(value)}"
        resolved.append(arg)
    return resolved


def recipe_description(path: Path) -> str:
    """One line about a recipe: the first line of its header comment, up to its first comma, colon or semicolon
    outside parentheses, without a closing parenthetical aside (``CoLA with AdaLoRA on DeBERTaV3-base``)."""
    first = ""
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("#") and line.lstrip("#").strip():
                first = line.lstrip("#").strip()
                break
            if line.strip() and not line.startswith("#"):
                break  # no header comment
    depth, end = 0, len(first)
    for i, char in enumerate(first):
        depth += (char == "(") - (char == ")")
        if depth == 0 and char in ",;:" and first[i + 1:i + 2] in (" ", ""):
            end = i
            break
    text = first[:end].rstrip(" .")
    # "... with AdaLoRA (adalora_pl.tasks.causal_lm_module.CausalLMModule)": the aside is detail, not summary.
    if text.endswith(")") and text.rfind(" (") > 0:
        text = text[:text.rfind(" (")]
    return text or f"{path.stem} (no header comment)"


def recipes_main(args: list[str], prog: str = DEFAULT_PROG) -> None:
    """``<prog> recipes``: one line per shipped recipe, its name (what ``--config`` takes) and what it trains."""
    parser = argparse.ArgumentParser(
        prog=f"{prog} recipes",
        description=f"List the recipes shipped in {RECIPES_DIR}: `{prog} fit --config NAME` runs one, "
                    "and every setting can be overridden on the command line.")
    parser.parse_args(args)
    names = recipe_names()
    if not names:
        parser.exit(2, f"{prog} recipes: error: no recipes in {RECIPES_DIR}; the package was installed without its "
                       "package data (adalora_pl/recipes/*.yaml)\n")
    width = max(map(len, names), default=0)
    for name in names:
        print(f"{name:<{width}}  {recipe_description(RECIPES_DIR / f'{name}{RECIPE_SUFFIX}')}")


# ---------------------------------------------------------------------------------------- ckpt_path
# ckpt_path values Lightning resolves itself (ModelCheckpoint's files, SLURM's, the model registry's) or fetches
# (remote URLs); anything else must be a checkpoint file.
CKPT_SPECIAL = ("last", "best", "hpc")
CKPT_EXPECTED = (
    "expected a checkpoint written by `{prog} fit` (e.g. <log_dir>/checkpoints/last.ckpt: a torch zip archive "
    "with data.pkl) or one of last, best, hpc, registry[:name[:version]]"
)


def ckpt_path_problem(ckpt_path: str | None, prog: str = DEFAULT_PROG) -> str | None:
    """Why ``ckpt_path`` must not go to Lightning (which would unpickle it), or None when it may.

    Lightning's special values and remote URLs pass unchecked; a local path must be a torch zip checkpoint.
    """
    if ckpt_path is None:
        return None
    expected = CKPT_EXPECTED.format(prog=prog)
    value = str(ckpt_path)
    # The same test as lightning.pytorch.utilities.model_registry._is_registry (private).
    if value in CKPT_SPECIAL or value.lower() == "registry" or value.lower().startswith("registry:") or "://" in value:
        return None
    path = Path(value).expanduser()
    if not path.exists():
        return f"--ckpt_path {value}: file not found; {expected}"
    if path.is_dir():
        if is_distributed_checkpoint(path):  # ModelParallelStrategy's folder: Lightning loads it (weights only)
            return None
        return f"--ckpt_path {value}: is a folder, not a checkpoint file; {expected}"
    problem = torch_archive_problem(path)
    return f"--ckpt_path {value}: {problem}; {expected}" if problem else None


def _exit(prog: str, message: str) -> None:
    """Print ``prog: error: message`` on stderr and exit 2, as argparse does."""
    sys.stderr.write(f"{prog}: error: {message}\n")
    raise SystemExit(2)


def config_error(err: BaseException) -> ConfigError | None:
    """The ConfigError behind ``err``: ``err`` itself or one in its chain of causes and contexts, else None.

    jsonargparse wraps an error raised while building the model or the data (``raise ... from err``), and an error
    raised while another is handled carries that one as its ``__context__``: both are followed, causes first.
    """
    pending: list[BaseException | None] = [err]
    seen: set[int] = set()
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        if isinstance(current, ConfigError):
            return current
        seen.add(id(current))
        pending += [current.__cause__, current.__context__]
    return None


def one_line(message: str) -> str:
    """``message`` on one line (its lines joined by spaces), as the last line of the output must hold it all."""
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


# ---------------------------------------------------------------------------------------- optimizer blocks
# LightningCLI's own `optimizer:` / `lr_scheduler:` blocks replace the module's AdamW and linear schedule. Lightning
# builds them only after the backbone has loaded, and torch's refusal ("Invalid learning rate: -1.0") then names
# neither the key nor the file: they are built once on a stand-in parameter first.
OPTIMIZER_BLOCKS = ("optimizer", "lr_scheduler")


def _import_class(class_path: str) -> type:
    module_name, _, class_name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)


def _build(cls: type, target: Any, init_args: dict[str, Any]) -> tuple[Any, str | None]:
    """``(cls(target, **init_args), None)``, or ``(None, why)`` when it raises."""
    try:
        return cls(target, **init_args), None
    except Exception as err:  # whatever the class refuses, with its own words
        return None, one_line(str(err)) or type(err).__name__


def _culprit(cls: type, target: Any, init_args: dict[str, Any], reason: str) -> str | None:
    """The first of ``init_args`` whose reset to the class default changes the outcome: the one ``reason`` is about.

    Arguments without a default are never reset (leaving them out would be an error of its own).
    """
    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return None
    for key in init_args:
        parameter = parameters.get(key)
        if parameter is None or parameter.default is inspect.Parameter.empty:
            continue
        _, other = _build(cls, target, {k: v for k, v in init_args.items() if k != key})
        if other != reason:
            return key
    return None


def block_source(block: str, argv: Sequence[str], config_files: Sequence[Any], subcommand: str) -> str:
    """Where the ``block`` settings came from: the command line, or the last ``--config`` file that has them."""
    if any(arg == f"--{block}" or arg.startswith((f"--{block}.", f"--{block}=")) for arg in argv):
        return "on the command line"
    for path in reversed(list(config_files or ())):
        try:
            with open(os.fspath(path), encoding="utf-8") as handle:
                content = yaml.safe_load(handle) or {}
        except (OSError, yaml.YAMLError):
            continue
        if not isinstance(content, dict):
            continue
        nested = content.get(subcommand)  # a file given before the subcommand holds `fit: {optimizer: ...}`
        if block in content or (isinstance(nested, dict) and block in nested):
            return f"in {path}"
    return "in the config"


def optimizer_blocks_problem(config: Namespace, source_of: Any) -> str | None:
    """Why the ``optimizer`` / ``lr_scheduler`` blocks of a subcommand's config cannot be built, or None.

    Each is built once on a stand-in parameter (the scheduler on the configured optimizer, or on SGD when there is
    none). The message names the key (``optimizer.init_args.lr``), its value, where it was set (``source_of(block)``)
    and the class's own reason.
    """
    stand_in = torch.nn.Parameter(torch.zeros(1))
    optimizer: Any = torch.optim.SGD([stand_in], lr=0.1)
    for block in OPTIMIZER_BLOCKS:
        settings = config.get(block)
        if not isinstance(settings, Namespace) or not settings.get("class_path"):
            continue
        class_path = settings.class_path
        init_args = settings.init_args.as_dict() if isinstance(settings.get("init_args"), Namespace) else {}
        try:
            cls = _import_class(class_path)
        except (ImportError, AttributeError) as err:
            return f"{block}.class_path = {class_path!r} ({source_of(block)}) cannot be imported: {err}"
        target = [stand_in] if block == "optimizer" else optimizer
        built, reason = _build(cls, target, init_args)
        if reason is None:
            if block == "optimizer":
                optimizer = built
            continue
        key = _culprit(cls, target, init_args, reason)
        if key is None:
            return f"{block} ({source_of(block)}): {class_path} refuses init_args {init_args}: {reason}"
        return f"{block}.init_args.{key} = {init_args[key]!r} ({source_of(block)}): {class_path} refuses it: {reason}"
    return None


# ---------------------------------------------------------------------------------------- checkpoint settings
def _plain(value: Any) -> Any:
    """``value`` with tuples as lists and Namespaces as dicts, so that a YAML list equals a saved tuple."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _model_settings(model: Namespace) -> dict[str, Any]:
    """The keyword arguments a ``model`` config block builds its module with (``dict_kwargs`` win, as there)."""
    settings: dict[str, Any] = {"class_path": model.get("class_path")}
    for key in ("init_args", "dict_kwargs"):
        part = model.get(key)
        settings.update(_plain(part) if isinstance(part, (Namespace, dict)) else {})
    return settings


def changed_model_settings(given: Namespace, used: Namespace) -> list[str]:
    """``key=used (given: value)`` for each model setting where ``used`` differs from ``given``."""
    before, after = _model_settings(given), _model_settings(used)
    return [f"{key}={value!r} (given: {before[key]!r})" for key, value in after.items()
            if key in before and before[key] != value]


@rank_zero_only
def _note(prog: str, message: str) -> None:
    sys.stderr.write(f"{prog}: note: {message}\n")
    sys.stderr.flush()


class AdaLoRACLI(LightningCLI):
    """LightningCLI that links the tokenizer to ``--model.backbone``, checks ``--ckpt_path`` before loading it, says
    which model settings a checkpoint replaces, and checks ``optimizer:`` / ``lr_scheduler:`` blocks before the
    backbone loads.

    ``prog`` is the command's name in its own messages (``<prog> fit: error: ...``); the LightningCLI arguments are
    passed on unchanged.
    """

    def __init__(self, *args: Any, prog: str = DEFAULT_PROG, **kwargs: Any) -> None:
        self.prog = prog  # before super().__init__, which parses and runs
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        # The tokenizer is the backbone's own, unless the data section names another one.
        parser.link_arguments("model.init_args.backbone", "data.init_args.tokenizer")

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        self._argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, (dict, Namespace)) else []
        self._given_model = None
        # Right after parsing, Lightning torch.loads ckpt_path to read its hyperparameters, whatever the file is
        # (README.md makes torch suggest weights_only=False): check it first.
        subcommand = self.config.get("subcommand")
        if subcommand is not None:
            problem = ckpt_path_problem(self.config[subcommand].get("ckpt_path"), self.prog)
            if problem:
                _exit(f"{self.prog} {subcommand}", problem)
            # What the command line and its configs ask for, before Lightning lays the checkpoint's over it.
            model = self.config[subcommand].get("model")
            self._given_model = model.clone() if isinstance(model, Namespace) else None

    def before_instantiate_classes(self) -> None:
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return
        config = self.config[subcommand]
        self._report_checkpoint_settings(subcommand, config)
        problem = optimizer_blocks_problem(
            config, lambda block: block_source(block, self._argv, config.get("config") or (), subcommand)
        )
        if problem:
            raise ConfigError(problem)

    def _report_checkpoint_settings(self, subcommand: str, config: Namespace) -> None:
        """One line naming the model settings the checkpoint's hyperparameters replaced (Lightning uses those)."""
        ckpt_path, model = config.get("ckpt_path"), config.get("model")
        if not ckpt_path or self._given_model is None or not isinstance(model, Namespace):
            return
        changes = changed_model_settings(self._given_model, model)
        if changes:
            _note(f"{self.prog} {subcommand}", f"{ckpt_path} was saved with other model settings than the command "
                                               f"line and its config; using the checkpoint's: {', '.join(changes)}")


def export_main(args: list[str], prog: str = DEFAULT_PROG) -> None:
    """``<prog> export``: a fit checkpoint's adapters as safetensors, a PEFT AdaLoRA or LoRA folder, or a merged
    model. A wrong option, checkpoint or output folder exits 2 with one line."""
    from adalora_pl.io.checkpoint import EXPORT_FORMATS, export_checkpoint

    parser = argparse.ArgumentParser(prog=f"{prog} export", description="Export the adapters of a fit checkpoint.")
    parser.add_argument("--ckpt_path", required=True, help=f"checkpoint written by `{prog} fit`")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                        help="adapter: safetensors + JSON; peft: PeftModel AdaLoRA folder; "
                             "lora: PeftModel LoRA folder; merged: plain transformers model")
    parser.add_argument("--output", required=True, help="output folder (new, or empty unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an --output folder that already holds files (same names are replaced)")
    ns = parser.parse_args(args)
    # Checked here too, before the checkpoint and backbone load, to name the command line's options.
    problem = output_folder_problem(ns.output, overwrite=ns.overwrite, overwrite_hint="pass --overwrite")
    if problem is not None:
        parser.exit(2, f"{prog} export: error: --output {problem}\n")
    try:
        export_checkpoint(ns.ckpt_path, ns.format, ns.output, overwrite=ns.overwrite)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"{prog} export: error: {one_line(str(err))}\n")


def main(args: Sequence[str] | dict[str, Any] | Namespace | None = None, prog: str | None = None
         ) -> AdaLoRACLI | None:
    """Run the command line on ``args`` (default ``sys.argv[1:]``) and return the LightningCLI (None for ``export``
    and ``recipes``).

    ``prog`` names the command in messages; by default the name of ``sys.argv[0]`` when ``args`` is None (what the
    user typed), else :data:`DEFAULT_PROG` (a call from Python, whose sys.argv is the caller's). ``args`` may also be
    a dict or Namespace, as LightningCLI takes them.
    """
    if prog is None:
        prog = program_name() if args is None else DEFAULT_PROG
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, (dict, Namespace)):
        subcommand = str(argv.get("subcommand") or "")
    else:
        argv = list(argv)
        if argv and argv[0] == "export":
            return export_main(argv[1:], prog)
        if argv and argv[0] == "recipes":
            return recipes_main(argv[1:], prog)
        subcommand = next((a for a in argv if a in AdaLoRACLI.subcommands()), "")
        try:
            argv = resolve_recipes(argv)
        except ConfigError as err:
            _exit(f"{prog} {subcommand}".strip(), str(err))
    try:
        with warnings.catch_warnings():
            # Called from Python (benchmarks, tests) with ``args``, sys.argv belongs to the caller; from the command
            # line, the recipe names are resolved in a copy of it: Lightning's warning about having both is noise.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            return AdaLoRACLI(
                subclass_mode_model=True,
                subclass_mode_data=True,
                trainer_defaults={
                    "callbacks": [
                        ModelCheckpoint(save_last=True),
                        LearningRateMonitor(logging_interval="step"),
                    ],
                },
                save_config_kwargs={"overwrite": True},
                parser_kwargs={"prog": prog, "epilog": extra_help(prog)},
                args=argv,
                prog=prog,
            )
    except Exception as err:
        # A wrong setting already says what to do; jsonargparse would bury it under two tracebacks, ~100 lines of
        # Union output and the whole Namespace. Other errors are bugs and keep their traceback.
        cause = config_error(err)
        if cause is None:
            raise
        _exit(f"{prog} {subcommand}".strip(), one_line(str(cause)))


def run() -> None:
    """The ``adalora-pl`` console script: :func:`main` on the command line, returning nothing (the script passes the
    return value to ``sys.exit``, which would print a returned LightningCLI and exit 1)."""
    main()


if __name__ == "__main__":
    main()
