"""Step-for-step parity with PEFT's AdaLoRA (the oracle), bit for bit: same loss, masks, A/E/B and importance
averages at every optimizer step (docs/method.md §9).

The pure path (no Lightning) runs the same operations in the same order as PEFT: the regularizer is added inside
the loss (as ``AdaLoraModel.forward`` does), the adapter branch is ``result += (x @ (A*E).T @ B.T) * alpha /
(ranknum + 1e-5)`` (ours fused into one ``addcdiv`` with the same roundings, adalora_pl/fused_add.py), the EMAs
are the same elementwise expressions (ours on one flat buffer, PEFT's per tensor; elementwise ops round the same
either way) and the triplet score the same reductions on tensors of the same shape. So nothing is left for a
tolerance to cover: every comparison is ``torch.equal``. A change that is only "numerically equivalent" (another
summation order, ``lerp`` for the EMA, the regularizer's terms in another order) fails here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch

from adalora_pl import RankAllocator, inject_adapters, orthogonal_regularizer
from tests.builders import (
    BERT_TARGETS,
    peft_layers,
    peft_twin,
    random_batches,
    tiny_bert_classifier,
)

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest on a busy CPU

TOTAL, TINIT, TFINAL = 64, 6, 20  # final_step = 44: warm-up, cubic and final phases all covered
FACTORS = ("lora_A", "lora_E", "lora_B")  # our flat buffers' order within a layer


@dataclass
class StepRecord:
    """What differed from PEFT after one optimizer step (empty lists: bitwise equal)."""

    step: int
    loss_equal: bool
    masks: list[str] = field(default_factory=list)
    params: list[str] = field(default_factory=list)
    averages: list[str] = field(default_factory=list)
    kept: int = 0  # nonzero singular values after the step
    averaged: bool = False  # our averages held nonzero values that were compared

    def differs(self) -> bool:
        return not self.loss_equal or bool(self.masks or self.params or self.averages)

    def __str__(self) -> str:
        parts = [] if self.loss_equal else ["loss"]
        parts += [f"{len(v)} {k} (first: {v[0]})" for k, v in
                  (("masks", self.masks), ("parameters", self.params), ("averages", self.averages)) if v]
        return f"step {self.step}: " + "; ".join(parts)


def our_averages(allocator: RankAllocator, adapters) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``"<path>.<factor>" -> (exp_avg_ipt, exp_avg_unc)`` cut from the flat buffers in their (A, E, B) order."""
    ipt = allocator.exp_avg_ipt.split(allocator.numels)
    unc = allocator.exp_avg_unc.split(allocator.numels)
    keys = [f"{name}.{factor}" for name in adapters for factor in FACTORS]
    shapes = [getattr(adapters[name], factor).shape for name in adapters for factor in FACTORS]
    return {k: (i.view(s), u.view(s)) for k, i, u, s in zip(keys, ipt, unc, shapes, strict=True)}


def compare(step, loss_equal, adapters, allocator, peft_model, final_step) -> StepRecord:
    theirs = peft_layers(peft_model)
    peft_alloc = peft_model.base_model.rankallocator
    record = StepRecord(step, loss_equal, kept=sum(int((m.lora_E != 0).sum()) for m in adapters.values()))
    for name, ours in adapters.items():
        if not torch.equal(ours.lora_E == 0, theirs[name].lora_E["default"] == 0):
            record.masks.append(name)
        record.params += [f"{name}.{k}" for k in FACTORS
                          if not torch.equal(getattr(ours, k), getattr(theirs[name], k)["default"])]
    averages = our_averages(allocator, adapters)
    if step >= final_step:
        # PEFT drops its averages at the final mask (reset_ipt) and never fills them again; ours are zeroed.
        if peft_alloc.exp_avg_ipt or peft_alloc.exp_avg_unc:
            record.averages.append("PEFT still holds averages after the final mask")
        record.averages += [k for k, (i, u) in averages.items() if i.any() or u.any()]
        return record
    record.averaged = all(bool(i.any() and u.any()) for i, u in averages.values())
    for key, (ipt, unc) in averages.items():
        peft_key = f"{key}.default"  # PEFT keys its averages by the wrapped model's parameter names
        same = torch.equal(ipt, peft_alloc.exp_avg_ipt[peft_key]) and torch.equal(unc, peft_alloc.exp_avg_unc[peft_key])
        if not same:
            record.averages.append(key)
    return record


def run_parity(delta_t: int, init_r: int = 4, target_r: int = 2, orth: float = 0.1):
    base = tiny_bert_classifier(seed=0)
    ours = copy.deepcopy(base)
    adapters = inject_adapters(ours, BERT_TARGETS, method="adalora", r=init_r, lora_alpha=32,
                               trainable_modules=["classifier", "pooler"])
    peft_model = peft_twin(base, adapters, init_r=init_r, target_r=target_r, tinit=TINIT, tfinal=TFINAL,
                           total_step=TOTAL, delta_t=delta_t, orth_reg_weight=orth)
    allocator = RankAllocator(adapters, target_r=target_r, tinit=TINIT, tfinal=TFINAL, total_step=TOTAL,
                              delta_t=delta_t)
    factors = [(m.lora_A, m.lora_B) for m in adapters.values()]
    ours_opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=5e-3)
    peft_opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-3)
    assert sum(p.numel() for g in ours_opt.param_groups for p in g["params"]) == sum(
        p.numel() for g in peft_opt.param_groups for p in g["params"]
    )
    history = []
    for step, batch in enumerate(random_batches(TOTAL)):
        # The regularizer inside the loss, after the task loss, as PEFT's forward adds it.
        loss = ours(**batch).loss + orth * orthogonal_regularizer(factors)
        loss.backward()
        ours_opt.step()
        allocator.update_and_allocate(step)
        ours_opt.zero_grad()

        peft_loss = peft_model(**batch).loss
        peft_loss.backward()
        peft_opt.step()
        peft_model.base_model.update_and_allocate(step)
        peft_opt.zero_grad()

        history.append(compare(step, torch.equal(loss.detach(), peft_loss.detach()), adapters, allocator,
                               peft_model, allocator.schedule.final_step))
    return history, adapters, allocator, ours, peft_model


@pytest.mark.parametrize("delta_t", [4, 3], ids=["final-step-on-grid", "forced-final-mask"])
def test_masks_parameters_and_importance_averages_equal_peft_bitwise_every_step(delta_t):
    assert ((TOTAL - TFINAL) % 4 == 0) and ((TOTAL - TFINAL) % 3 != 0)
    history, adapters, allocator, ours, peft_model = run_parity(delta_t)
    # The first step that differs, with what differed: where a divergence starts is what a regression needs.
    first = next((r for r in history if r.differs()), None)
    assert first is None, f"first difference from PEFT: {first}"
    # The trained heads (pooler, classifier) follow too: same gradients in, same AdamW steps out. PEFT trains a copy
    # of each head inside a ModulesToSaveWrapper, under "<head>.modules_to_save.default.".
    peft_heads = {n.replace("modules_to_save.default.", ""): p
                  for n, p in peft_model.base_model.model.named_parameters() if p.requires_grad and ".lora_" not in n}
    ours_heads = {n: p for n, p in ours.named_parameters() if p.requires_grad and ".lora_" not in n}
    assert sorted(peft_heads) == sorted(ours_heads)
    assert not [n for n, p in ours_heads.items() if not torch.equal(p, peft_heads[n])]
    # The comparisons had something to compare: nonzero averages at every step before the final mask, masks that
    # pruned in the cubic phase, and at the end the target budget with the pattern frozen.
    final_step = allocator.schedule.final_step
    assert all(r.averaged for r in history if r.step < final_step)
    assert any(r.kept < history[0].kept for r in history if r.step < final_step)
    assert allocator.frozen
    assert sum(m.kept_rank for m in adapters.values()) == allocator.schedule.target_budget
    assert history[-1].kept <= allocator.schedule.target_budget
    print(f"\nparity delta_t={delta_t}: {len(history)} steps, bitwise equal to PEFT")


def test_initial_adapter_output_equals_peft_and_base():
    base = tiny_bert_classifier(seed=3)
    ours = copy.deepcopy(base)
    adapters = inject_adapters(ours, BERT_TARGETS, r=3, trainable_modules=["classifier", "pooler"])
    with torch.no_grad():
        for m in adapters.values():
            m.lora_E.normal_()
    peft_model = peft_twin(base, adapters, init_r=3, target_r=1, tinit=1, tfinal=1, total_step=10, delta_t=1)
    batch = random_batches(1)[0]
    batch.pop("labels")
    assert torch.equal(ours(**batch).logits, peft_model(**batch).logits)
