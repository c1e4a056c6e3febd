"""Command line: ``python cli.py fit --config configs/cola.yaml`` (LightningCLI).

The YAML names the LightningModule and the DataModule (``class_path``) with their arguments; every
argument can be overridden on the command line (``--model.backbone``, ``--data.data_dir``, ...).
``python cli.py fit --config configs/cola.yaml --print_config`` prints the complete, re-runnable config.

``python cli.py export --ckpt_path CKPT --format {adapter,peft,merged} --output DIR`` turns a fit
checkpoint into an adapter-only safetensors file, a PEFT adapter folder or a merged transformers model.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI


class AdaLoRACLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The tokenizer is the backbone's own, unless the data section names another one.
        parser.link_arguments("model.init_args.backbone", "data.init_args.tokenizer")


def export_main(args: list[str]) -> None:
    from adalora_pl.checkpoint import EXPORT_FORMATS, export_checkpoint

    parser = argparse.ArgumentParser(prog="cli.py export", description="Export the adapters of a fit checkpoint.")
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by `cli.py fit`")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                        help="adapter: safetensors + JSON; peft: PeftModel folder; merged: plain transformers model")
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
            args=args,
        )


if __name__ == "__main__":
    main()
