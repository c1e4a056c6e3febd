"""Command line: ``python cli.py fit --config configs/cola.yaml`` (LightningCLI).

The YAML names the LightningModule and the DataModule (``class_path``) with their arguments; every
argument can be overridden on the command line (``--model.backbone``, ``--data.data_dir``, ...).
``python cli.py fit --config configs/cola.yaml --print_config`` prints the complete, re-runnable config.

``python cli.py export --ckpt_path CKPT --format {adapter,peft,lora,merged} --output DIR`` turns a fit
checkpoint into an adapter-only safetensors file, a PEFT AdaLoRA folder, a PEFT LoRA folder or a merged
transformers model.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from adalora_pl.io.checkpoint import torch_archive_problem
from adalora_pl.io.pretrained import LoadError

# Lightning's own subcommands are listed by its parser; `export` is dispatched before it, so the help names it here.
EXPORT_HELP = (
    "Also: export  Turn a fit checkpoint into adapter safetensors, a PEFT AdaLoRA or LoRA folder or a merged model "
    "(cli.py export --help)."
)
# ckpt_path values Lightning resolves itself (ModelCheckpoint's files, SLURM's, the model registry's) or fetches
# (remote URLs); anything else must be a checkpoint file.
CKPT_SPECIAL = ("last", "best", "hpc")
CKPT_EXPECTED = (
    "expected a checkpoint written by `cli.py fit` (e.g. <log_dir>/checkpoints/last.ckpt: a torch zip archive "
    "with data.pkl) or one of last, best, hpc, registry[:name[:version]]"
)


def ckpt_path_problem(ckpt_path: str | None) -> str | None:
    """Why ``ckpt_path`` must not go to Lightning (which would unpickle it), or None when it may.

    Lightning's special values and remote URLs pass unchecked; a local path must be a torch zip checkpoint.
    """
    if ckpt_path is None:
        return None
    value = str(ckpt_path)
    # The same test as lightning.pytorch.utilities.model_registry._is_registry (private).
    if value in CKPT_SPECIAL or value.lower() == "registry" or value.lower().startswith("registry:") or "://" in value:
        return None
    path = Path(value).expanduser()
    if not path.exists():
        return f"--ckpt_path {value}: file not found; {CKPT_EXPECTED}"
    if path.is_dir():
        return f"--ckpt_path {value}: is a folder, not a checkpoint file; {CKPT_EXPECTED}"
    problem = torch_archive_problem(path)
    return f"--ckpt_path {value}: {problem}; {CKPT_EXPECTED}" if problem else None


def _exit(prog: str, message: str) -> None:
    """Print ``prog: error: message`` on stderr and exit 2, as argparse does."""
    sys.stderr.write(f"{prog}: error: {message}\n")
    raise SystemExit(2)


def load_error(err: BaseException) -> LoadError | None:
    """The LoadError that caused ``err`` (jsonargparse wraps errors raised while building the model ``from`` them)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, LoadError):
            return err
        seen.add(id(err))
        err = err.__cause__
    return None


class AdaLoRACLI(LightningCLI):
    """LightningCLI that links the tokenizer to ``--model.backbone`` and checks ``--ckpt_path`` before loading it."""

    def add_arguments_to_parser(self, parser) -> None:
        # The tokenizer is the backbone's own, unless the data section names another one.
        parser.link_arguments("model.init_args.backbone", "data.init_args.tokenizer")

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # Right after parsing, Lightning torch.loads ckpt_path to read its hyperparameters, whatever the file is
        # (README.md makes torch suggest weights_only=False): check it first.
        subcommand = self.config.get("subcommand")
        if subcommand is not None:
            problem = ckpt_path_problem(self.config[subcommand].get("ckpt_path"))
            if problem:
                _exit(f"cli.py {subcommand}", problem)


def export_main(args: list[str]) -> None:
    from adalora_pl.io.checkpoint import EXPORT_FORMATS, export_checkpoint

    parser = argparse.ArgumentParser(prog="cli.py export", description="Export the adapters of a fit checkpoint.")
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by `cli.py fit`")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                        help="adapter: safetensors + JSON; peft: PeftModel AdaLoRA folder; "
                             "lora: PeftModel LoRA folder; merged: plain transformers model")
    parser.add_argument("--output", required=True, help="output folder")
    ns = parser.parse_args(args)
    try:
        export_checkpoint(ns.ckpt_path, ns.format, ns.output)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"cli.py export: error: {err}\n")


def main(args: list[str] | None = None) -> AdaLoRACLI | None:
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] == "export":
        return export_main(argv[1:])
    try:
        with warnings.catch_warnings():
            # Called from Python (benchmarks, tests) with ``args``, sys.argv belongs to the caller: Lightning's
            # warning about having both is noise there.
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
                parser_kwargs={"epilog": EXPORT_HELP},
                args=args,
            )
    except Exception as err:
        # A backbone/tokenizer/hub error already says what to do; jsonargparse would bury it in ~100 lines of
        # Union output. Other errors keep their traceback.
        cause = load_error(err)
        if cause is None:
            raise
        subcommand = next((a for a in argv if a in AdaLoRACLI.subcommands()), "")
        _exit(f"cli.py {subcommand}".strip(), str(cause))


if __name__ == "__main__":
    main()
