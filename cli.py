"""Command line: ``python cli.py fit --config configs/cola.yaml`` (LightningCLI).

The YAML names the LightningModule and the DataModule (``class_path``) with their arguments; every
argument can be overridden on the command line (``--model.backbone``, ``--data.data_dir``, ...).
``python cli.py fit --config configs/cola.yaml --print_config`` prints the complete, re-runnable config.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI


class AdaLoRACLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The tokenizer is the backbone's own, unless the data section names another one.
        parser.link_arguments("model.init_args.backbone", "data.init_args.tokenizer")


def main(args: list[str] | None = None) -> AdaLoRACLI:
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
