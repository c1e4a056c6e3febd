"""LightningModules written the way ordinary Lightning projects write them, knowing nothing about adalora_pl.

Each class is one common project shape that ``AdaLoRACallback`` must work with when dropped into the Trainer's
callbacks (tests/lightning/test_foreign_projects.py). A module, not a test file: DDP spawn workers unpickle these
classes by import.

- :class:`SetupDataProject`: datasets built in ``LightningModule.setup`` (after the callbacks' ``setup``), an
  LR schedule over ``trainer.estimated_stepping_batches``, as in Lightning's "Finetune Transformers Models" tutorial.
- :class:`ManualOptimizationProject`: ``automatic_optimization = False`` with ``opt.step(); opt.zero_grad()`` (or
  the other order) inside ``training_step``.
- :class:`HeadOnlyOptimizerProject`: an optimizer built from the head alone (the adapters never train).
- :class:`SetupModelProject`: the network itself built in ``setup`` (too late for any callback's ``setup``).
"""

from __future__ import annotations

import json
import os

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from transformers import BertForSequenceClassification

from tests.builders import tiny_bert_config
from tests.lightning_modules import RandomTokens


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config())


class SetupDataProject(pl.LightningModule):
    """Model in ``__init__``, data in ``setup``, AdamW + linear decay over the Trainer's estimated steps.

    ``data_in_setup=False`` builds the datasets in ``__init__`` instead (the tests of the other shapes use it, so
    that each of them shows its own pattern). ``nan_loss_at_step``: the loss of that optimizer step is multiplied by
    NaN (a diverged run). ``val_score`` is logged as the epoch number: it rises every epoch, so an EarlyStopping in
    "min" mode stops the run after the second validation.
    """

    def __init__(self, num_examples: int = 32, batch_size: int = 8, lr: float = 5e-3, seed: int = 0,
                 nan_loss_at_step: int | None = None, data_in_setup: bool = True) -> None:
        super().__init__()
        self.net = tiny_bert(seed)
        self.num_examples, self.batch_size, self.lr = num_examples, batch_size, lr
        self.nan_loss_at_step = nan_loss_at_step
        self.data_in_setup = data_in_setup
        if not data_in_setup:
            self.build_datasets()

    def build_datasets(self) -> None:
        self.train_set = RandomTokens(self.num_examples)
        self.val_set = RandomTokens(16, seed=1)

    def setup(self, stage: str) -> None:
        if self.data_in_setup:
            self.build_datasets()

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def training_step(self, batch, batch_idx):
        loss = self.net(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        if self.global_step == self.nan_loss_at_step:
            loss = loss * float("nan")
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.net(input_ids=batch["input_ids"], labels=batch["labels"]).loss)
        self.log("val_score", float(self.current_epoch))

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)
        total = self.trainer.estimated_stepping_batches
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class ManualOptimizationProject(SetupDataProject):
    """Manual optimization; ``zero_grad_first`` picks the order of ``zero_grad`` and ``step`` in training_step."""

    def __init__(self, zero_grad_first: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.zero_grad_first = zero_grad_first

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        if self.zero_grad_first:
            opt.zero_grad()
        loss = self.net(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        self.manual_backward(loss)
        opt.step()
        if not self.zero_grad_first:
            opt.zero_grad()  # before any batch-end hook of a callback
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class AutomaticTwin(SetupDataProject):
    """:class:`ManualOptimizationProject`'s arithmetic under automatic optimization (same optimizer, no scheduler)."""

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class HeadOnlyOptimizerProject(SetupDataProject):
    """Trains only its classifier head: an optimizer that never sees the adapters."""

    def configure_optimizers(self):
        return torch.optim.AdamW(self.net.classifier.parameters(), lr=self.lr)


class SetupModelProject(SetupDataProject):
    """Builds its network in ``setup``: Lightning calls the callbacks' ``setup`` first."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.net = None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.net is None:
            self.net = tiny_bert()


class AdapterDump(pl.Callback):
    """Writes this rank's adapter tensors (and their dtypes) to ``adapters_rank<N>.pt`` at the end of training."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer, pl_module) -> None:
        state = {n: p.detach().clone() for n, p in pl_module.named_parameters() if ".lora_" in n}
        torch.save(state, os.path.join(self.directory, f"adapters_rank{trainer.global_rank}.pt"))
        with open(os.path.join(self.directory, f"dtypes_rank{trainer.global_rank}.json"), "w") as f:
            json.dump({n: str(t.dtype) for n, t in state.items()}, f)
