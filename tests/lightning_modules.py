"""Lightning helpers of the tests: a plain LightningModule that knows nothing about adalora_pl, and callbacks.

A module, not a test file: DDP spawn workers unpickle these classes by import, and the CLI tests name the
callbacks by class path (``--trainer.callbacks+=tests.lightning_modules.AdapterSnapshot``).
"""

from __future__ import annotations

import json
import os

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import BertConfig, BertForSequenceClassification


class RandomTokens(Dataset):
    def __init__(self, num: int = 32, seq_len: int = 10, vocab: int = 100, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (num, seq_len), generator=g)
        self.labels = torch.randint(0, 2, (num,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class PlainClassifier(pl.LightningModule):
    """A user's own module: own loss (cross entropy on logits), own optimizer, own data."""

    def __init__(self, num_examples: int = 32, batch_size: int = 8, lr: float = 5e-3, seed: int = 0,
                 inf_grad_at_step: int | None = None, inf_grad_param: str = "lora_E",
                 snapshot_steps: tuple[int, ...] = (), snapshot_dir: str | None = None, fused: bool = False,
                 skip_steps: tuple[int, ...] = ()) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = BertForSequenceClassification(BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2,
        ))
        self.num_examples, self.batch_size, self.lr = num_examples, batch_size, lr
        self.inf_grad_at_step, self.inf_grad_param = inf_grad_at_step, inf_grad_param
        self.fused, self.skip_steps = fused, skip_steps
        self.snapshot_steps, self.snapshot_dir = snapshot_steps, snapshot_dir
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        if self.global_step in self.skip_steps:
            return None  # Lightning skips backward; the optimizer step still counts
        logits = self.net(input_ids=batch["input_ids"]).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"])
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self.net(input_ids=batch["input_ids"]).logits
        self.log("val_loss", torch.nn.functional.cross_entropy(logits.float(), batch["labels"]))

    test_step = validation_step

    def test_dataloader(self):
        return self.val_dataloader()

    def predict_step(self, batch, batch_idx):
        return self.net(input_ids=batch["input_ids"]).logits

    def on_after_backward(self) -> None:
        if self.inf_grad_at_step is not None and self.global_step == self.inf_grad_at_step:
            for name, p in self.named_parameters():
                if name.endswith(self.inf_grad_param) and p.grad is not None:
                    p.grad[0, 0] = float("inf")
                    break

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.snapshot_dir and self.global_step in self.snapshot_steps:
            state = {k: v.clone() for k, v in self.state_dict().items() if "lora_" in k or "rank_mask" in k}
            torch.save(state, os.path.join(self.snapshot_dir, f"step{self.global_step}.pt"))

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr, fused=self.fused)

    def train_dataloader(self):
        return DataLoader(RandomTokens(self.num_examples), batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self):
        return DataLoader(RandomTokens(16, seed=1), batch_size=self.batch_size)

    def predict_dataloader(self):
        return self.val_dataloader()


class LazyClassifier(PlainClassifier):
    """Builds its network in ``configure_model`` (as for large models), idempotently unless told otherwise."""

    def __init__(self, idempotent: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.config = self.net.config
        self.net = None
        self.idempotent = idempotent

    def configure_model(self) -> None:
        if self.net is not None and self.idempotent:
            return
        torch.manual_seed(0)
        self.net = BertForSequenceClassification(self.config)


class PerturbedScoresOnRankOne(pl.Callback):
    """Under DDP, rank 1 scrambles its own importance averages before every allocation and counts the mask
    events where the keep-mask it computed itself differs from the one it applied (rank 0's, broadcast).
    Put it before the AdaLoRA callback. Writes ``perturbed_rank1.json``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.events = self.differing = 0

    def _allocator(self, trainer):
        return next(c for c in trainer.callbacks if hasattr(c, "allocator")).allocator

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_rank != 1:
            return
        allocator = self._allocator(trainer)
        broadcast = allocator.sync_keep

        def recording(keep):
            applied = broadcast(keep)
            self.events += 1
            self.differing += int(not torch.equal(keep, applied))
            return applied

        allocator.sync_keep = recording
        self.generator = torch.Generator().manual_seed(123)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank == 1:
            unc = self._allocator(trainer).exp_avg_unc
            unc.mul_(torch.rand(unc.shape, generator=self.generator))

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 1:
            with open(os.path.join(self.directory, "perturbed_rank1.json"), "w") as f:
                json.dump({"events": self.events, "differing": self.differing}, f)


class MaskWriter(pl.Callback):
    """Writes every rank's final masks to a JSON file (to compare ranks under DDP)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer, pl_module) -> None:
        masks = {n: b.tolist() for n, b in pl_module.named_buffers() if n.endswith("rank_mask")}
        nonzero = {n: (p != 0).flatten().tolist() for n, p in pl_module.named_parameters() if n.endswith("lora_E")}
        with open(os.path.join(self.directory, f"masks_rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"masks": masks, "nonzero_E": nonzero}, f)


class OrderlyDistributedTeardown(pl.Callback):
    """Destroys the process group on every rank, together, before the spawn workers exit.

    Left to Lightning's ``atexit`` handler, the gloo process group of a spawn worker is torn down at
    interpreter exit, and the worker sometimes aborts there ("terminate called without an active exception",
    SIGABRT) after a fit that completed correctly: in 1 of 40 runs of the DDP test here even with
    AdaLoRACallback's fit-end barrier (6 of 20 without it); none in 50 runs with this callback.
    """

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def adapter_tensors(module) -> dict[str, torch.Tensor]:
    """Copies of every adapter's lora_A, lora_E and lora_B, keyed by layer and name."""
    return {f"{name}.{key}": getattr(layer, key).detach().clone()
            for name, layer in module.adapters.items() for key in ("lora_A", "lora_E", "lora_B")}


class AdapterSnapshot(pl.Callback):
    """Keeps the adapters as they are when training starts (after the CLI seeded and built the module)."""

    def on_fit_start(self, trainer, pl_module) -> None:
        self.initial = adapter_tensors(pl_module)


class StartWriter(pl.Callback):
    """Saves every rank's adapter factors as ``on_train_start`` left them (after AdaLoRACallback's gradient-SVD
    start) to ``start_rank<r>.pt``, to compare ranks under DDP."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_start(self, trainer, pl_module) -> None:
        factors = {n: p.detach().clone() for n, p in pl_module.named_parameters() if ".lora_" in n}
        torch.save(factors, os.path.join(self.directory, f"start_rank{trainer.global_rank}.pt"))
