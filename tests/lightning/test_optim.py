"""AdapterModule.configure_optimizers: parameter groups, head learning rate, linear warm-up and decay.

The expected learning rates are computed here from the documented schedule (warm-up
``lr * (step + 1) / (warmup + 1)``, then ``lr * (total - step) / (total - warmup)``), not with the module's own
lambda, and compared with what the optimizer's parameter groups hold at each step.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from adalora_pl.tasks.glue_module import GLUEClassifier

LR, HEAD_LR = 1e-3, 4e-3
HEADS = ("classifier.", "bert.pooler.")  # the default trainable modules of a BERT sequence classifier


def classifier(backbone: str, **kwargs) -> GLUEClassifier:
    # LoRA: the same optimizer as AdaLoRA without the allocation callback, which needs a running Trainer.
    settings = dict(task_name="cola", method="lora", init_r=2, learning_rate=LR)
    settings.update(kwargs)
    return GLUEClassifier(backbone=backbone, **settings)


def expected_factor(step: int, warmup: int, total: int) -> float:
    """The documented schedule, written out: linear warm-up to the peak, then linear decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return (total - step) / (total - warmup)


def lrs_over_steps(module: GLUEClassifier, steps: int) -> list[list[float]]:
    """The learning rate of every parameter group before each of ``steps`` optimizer steps (and after the last)."""
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"  # the schedule counts optimizer steps, not epochs
    seen = []
    for _ in range(steps + 1):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()  # no gradients: AdamW changes nothing, but the scheduler wants a step before its own
        scheduler.step()
    return seen


def test_adapters_and_heads_get_their_own_groups_and_learning_rates(tiny_backbone):
    module = classifier(tiny_backbone, head_learning_rate=HEAD_LR, total_step=10)
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["lr"] for g in optimizer.param_groups] == [LR, HEAD_LR]  # no warm-up: the peak at step 0

    names = {id(p): n for n, p in module.named_parameters()}
    adapter_group, head_group = ({names[id(p)] for p in g["params"]} for g in optimizer.param_groups)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert adapter_group | head_group == trainable and not adapter_group & head_group
    assert adapter_group and all(".lora_" in n for n in adapter_group)
    assert len(adapter_group) == 2 * 12  # lora_A and lora_B of the six matrices in each of the two layers
    assert head_group == {n for n in trainable if n.startswith(tuple("model." + h for h in HEADS))}
    assert {"model.classifier.weight", "model.bert.pooler.dense.weight"} <= head_group


def test_head_learning_rate_defaults_to_the_learning_rate(tiny_backbone):
    optimizer = classifier(tiny_backbone, total_step=10).configure_optimizers()["optimizer"]
    assert [g["lr"] for g in optimizer.param_groups] == [LR, LR]


@pytest.mark.parametrize(("warmup_steps", "warmup"), [(0, 0), (5, 5), (0.25, 5), (0.12, 2)])
def test_linear_warmup_then_linear_decay(tiny_backbone, warmup_steps, warmup):
    """``warmup_steps`` in steps, or as a fraction of ``total_step`` (0.25 x 20 = 5, 0.12 x 20 = 2.4 -> 2)."""
    total = 20
    module = classifier(tiny_backbone, head_learning_rate=HEAD_LR, total_step=total, warmup_steps=warmup_steps)
    seen = lrs_over_steps(module, total)
    for step, (adapter_lr, head_lr) in enumerate(seen):
        factor = expected_factor(step, warmup, total)
        assert adapter_lr == pytest.approx(LR * factor, rel=1e-12), step
        assert head_lr == pytest.approx(HEAD_LR * factor, rel=1e-12), step
    # The landmarks, by hand: warm-up starts below the peak, the peak is reached at `warmup`, 0 at the end.
    assert seen[warmup][0] == pytest.approx(LR)
    assert seen[total][0] == 0.0
    if warmup:
        assert seen[0][0] == pytest.approx(LR / (warmup + 1))
        assert seen[warmup - 1][0] == pytest.approx(LR * warmup / (warmup + 1))


def test_full_fine_tuning_puts_everything_in_one_group(tiny_backbone):
    module = classifier(tiny_backbone, method="full", head_learning_rate=HEAD_LR, total_step=10)
    optimizer = module.configure_optimizers()["optimizer"]
    assert len(optimizer.param_groups) == 1
    (group,) = optimizer.param_groups
    assert group["lr"] == LR  # head_learning_rate does not apply: there is no separate head
    assert {id(p) for p in group["params"]} == {id(p) for p in module.parameters()}
    assert all(p.requires_grad for p in group["params"])


class RecordLR(pl.Callback):
    """The learning rates the optimizer holds when each training batch starts, i.e. the ones its step uses."""

    def __init__(self) -> None:
        self.seen: list[list[float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append([g["lr"] for g in trainer.optimizers[0].param_groups])


def test_fraction_warmup_counts_the_trainers_steps(tiny_backbone, one_torch_thread):
    """Without total_step the schedule spans the Trainer's steps: 2 epochs x 4 batches = 8; 0.3 x 8 -> 2 warm-up."""
    total, warmup = 8, 2
    module = classifier(tiny_backbone, head_learning_rate=HEAD_LR, warmup_steps=0.3)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(5, 40, (4, 8), generator=g),
                "attention_mask": torch.ones(4, 8, dtype=torch.long),
                "labels": torch.randint(0, 2, (4,), generator=g)} for _ in range(4)]
    record = RecordLR()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[record])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert trainer.global_step == total
    assert len(record.seen) == total
    for step, (adapter_lr, head_lr) in enumerate(record.seen):
        factor = expected_factor(step, warmup, total)
        assert adapter_lr == pytest.approx(LR * factor, rel=1e-12), step
        assert head_lr == pytest.approx(HEAD_LR * factor, rel=1e-12), step
