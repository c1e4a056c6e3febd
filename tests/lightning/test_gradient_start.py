"""The gradient-SVD start run by ``AdaLoRACallback`` on a user's own LightningModule (docs/method.md §13): A and B
from the first batches' gradients of the module's own loss, taken in eval mode, with the module's logging and
torchmetrics states left as if nothing had run; refused under manual optimization. Resume and exports with the
start: tests/lightning/test_option_resume.py."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torchmetrics
from torch.utils.data import DataLoader

from adalora_pl import AdaLoRACallback
from adalora_pl.errors import ConfigError
from tests.builders import BERT_TARGETS
from tests.lightning_modules import OrderlyDistributedTeardown, PlainClassifier, RandomTokens, StartWriter

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class MeteredClassifier(PlainClassifier):
    """A user's module whose training step updates and logs a torchmetrics accuracy, with dropout in the network,
    and records the mode it trains in."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.net.config.hidden_dropout_prob = 0.1
        for module in self.net.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.1
        self.train_acc = torchmetrics.Accuracy(task="binary")
        self.modes: list[bool] = []

    def training_step(self, batch, batch_idx):
        logits = self.net(input_ids=batch["input_ids"]).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"])
        self.train_acc(logits.argmax(-1), batch["labels"])
        self.log("train_acc", self.train_acc, on_step=True, on_epoch=True)
        self.log_dict({"train_loss": loss})
        self.modes.append(self.net.training)
        return {"loss": loss}


class StartRecorder(pl.Callback):
    """The adapters as the start left them (runs after AdaLoRACallback's on_train_start)."""

    def on_train_start(self, trainer, pl_module):
        self.factors = {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone(), m.lora_E.detach().clone())
                        for n, m in trainer.callbacks[0]._adapters.items()}


def oracle_gradients(module: PlainClassifier, names: list[str], batches: int,
                     rows: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
    """The mean gradient of each base weight over the first ``batches`` training batches (or the batches of these
    ``rows``), by plain autograd on a copy with the base weights trainable (eval mode, the module's own loss)."""
    net = copy.deepcopy(module.net).eval()
    net.requires_grad_(False)
    weights = {n: net.get_submodule(n.removeprefix("net.")).weight for n in names}
    for w in weights.values():
        w.requires_grad_(True)
    data = RandomTokens(module.num_examples)
    loader = DataLoader(data, batch_size=module.batch_size, shuffle=False)
    if rows is not None:
        loader, batches = [data[r] for r in rows], len(rows)
    for i, batch in enumerate(loader):
        if i == batches:
            break
        logits = net(input_ids=batch["input_ids"]).logits
        torch.nn.functional.cross_entropy(logits.float(), batch["labels"]).backward()
    return {n: w.grad / batches for n, w in weights.items()}


def test_the_callback_starts_from_the_first_batches_gradients_and_leaves_no_trace(tmp_path):
    module = MeteredClassifier(num_examples=32, batch_size=8)
    cb = AdaLoRACallback(target_modules=BERT_TARGETS, trainable_modules=["classifier"], init_r=3, target_r=2,
                         tinit=1, tfinal=2, adapter_init="gradient_svd", gradient_init_batches=3)
    recorder = StartRecorder()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, callbacks=[cb, recorder], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path)
    before = copy.deepcopy(module)
    trainer.fit(module)

    oracle = oracle_gradients(before, list(recorder.factors), batches=3)
    for name, (a, b, e) in recorder.factors.items():
        g = oracle[name].double()
        s = torch.linalg.svdvals(g)
        # A's rows and B's columns are the top-3 right and left singular vectors of the gradient: B^T G A^T = diag(s).
        torch.testing.assert_close(b.double().T @ g @ a.double().T, torch.diag(s[:3]), rtol=1e-4, atol=1e-7,
                                   msg=name)
        assert torch.count_nonzero(e) == 0
    # The start's three steps ran in eval mode (its own record: side effects other than logging and metrics happen),
    # every training step in train mode again; logging from the steps works.
    assert module.modes == [False] * 3 + [True] * 8
    assert trainer.global_step == 8 and "train_acc_epoch" in trainer.logged_metrics
    assert all(p.grad is None or ".lora_" in n or "classifier" in n for n, p in module.named_parameters())


def test_the_start_leaves_the_metric_state_of_the_first_epoch_alone(tmp_path):
    """The accuracy's state after one epoch equals that of a run without the start (same batches, same predictions
    at E = 0 for the first step: compared through the metric's update count and totals)."""
    counts = {}
    for init in ("orthogonal", "gradient_svd"):
        module = MeteredClassifier(num_examples=16, batch_size=8)
        seen = []

        class Peek(pl.Callback):
            def on_train_epoch_end(self, trainer, pl_module, seen=seen):
                seen.append(pl_module.train_acc._update_count)

        cb = AdaLoRACallback(target_modules=BERT_TARGETS, trainable_modules=["classifier"], init_r=3, target_r=2,
                             total_step=2, adapter_init=init, gradient_init_batches=2)
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, callbacks=[cb, Peek()], logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_val_batches=0, default_root_dir=tmp_path)
        trainer.fit(module)
        counts[init] = seen
    assert counts["gradient_svd"] == counts["orthogonal"] == [2]  # two training batches, not 2 + 2


def test_manual_optimization_is_refused_before_training(tmp_path):
    class Manual(PlainClassifier):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):  # pragma: no cover - never reached
            raise AssertionError("trained")

    cb = AdaLoRACallback(target_modules=BERT_TARGETS, init_r=3, target_r=2, adapter_init="gradient_svd")
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, callbacks=[cb], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"adapter_init='gradient_svd' takes its gradient from Manual.training_step, "
                                          r"which under manual optimization would step the optimizer itself"):
        trainer.fit(Manual())


@pytest.mark.slow
def test_ddp_ranks_start_from_the_all_reduced_gradient(tmp_path):
    """Two DDP processes, each with its own half of the data: both start from the same A and B (DDP broadcast the
    parameters before this, and never again), the singular vectors of the gradient averaged over both ranks'
    batches. Each rank takes all 4 of its batches, so together they cover the 32 rows whatever order the sampler
    gives them: the mean of equal-sized batch means is the mean over all rows."""
    module = PlainClassifier(num_examples=32, batch_size=4)
    before = copy.deepcopy(module)
    cb = AdaLoRACallback(target_modules=BERT_TARGETS, trainable_modules=["classifier"], init_r=3, target_r=2,
                         total_step=4, adapter_init="gradient_svd", gradient_init_batches=4)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=4, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[cb, StartWriter(str(tmp_path)), OrderlyDistributedTeardown()],
                         default_root_dir=tmp_path)
    trainer.fit(module)
    rank0, rank1 = (torch.load(tmp_path / f"start_rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    names = sorted({k.removeprefix("net.").rsplit(".lora_", 1)[0] for k in rank0})
    oracle = oracle_gradients(before, [f"net.{n}" for n in names], 1, rows=[list(range(32))])
    for n in names:
        g = oracle[f"net.{n}"].double()
        a, b = rank0[f"net.{n}.lora_A"].double(), rank0[f"net.{n}.lora_B"].double()
        s = torch.linalg.svdvals(g)
        torch.testing.assert_close(b.T @ g @ a.T, torch.diag(s[:3]), rtol=1e-4, atol=1e-7, msg=n)
