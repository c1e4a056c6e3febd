"""Step-for-step parity with PEFT's AdaLoRA (the oracle): same masks, same parameters (docs/method.md §9)."""

from __future__ import annotations

import copy

import pytest
import torch

from adalora_pl import RankAllocator, inject_adapters, orthogonal_regularizer
from tests.builders import (
    BERT_TARGETS,
    max_adapter_diff,
    peft_layers,
    peft_twin,
    random_batches,
    tiny_bert_classifier,
)

pytest.importorskip("peft")

TOTAL, TINIT, TFINAL = 64, 6, 20  # final_step = 44: warm-up, cubic and final phases all covered


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
    theirs = peft_layers(peft_model)
    history = []
    for step, batch in enumerate(random_batches(TOTAL)):
        loss = ours(**batch).loss + orth * orthogonal_regularizer(factors)
        loss.backward()
        ours_opt.step()
        allocator.update_and_allocate(step)
        ours_opt.zero_grad()

        peft_model(**batch).loss.backward()
        peft_opt.step()
        peft_model.base_model.update_and_allocate(step)
        peft_opt.zero_grad()

        same_mask = all(
            torch.equal(m.lora_E == 0, theirs[n].lora_E["default"] == 0) for n, m in adapters.items()
        )
        history.append((step, same_mask, max_adapter_diff(peft_model, adapters),
                        sum(int((m.lora_E != 0).sum()) for m in adapters.values())))
    return history, adapters, allocator


@pytest.mark.parametrize("delta_t", [4, 3], ids=["final-step-on-grid", "forced-final-mask"])
def test_masks_and_parameters_match_peft_every_step(delta_t):
    assert ((TOTAL - TFINAL) % 4 == 0) and ((TOTAL - TFINAL) % 3 != 0)
    history, adapters, allocator = run_parity(delta_t)
    bad_masks = [step for step, same, _, _ in history if not same]
    assert not bad_masks, f"masks differ from PEFT at steps {bad_masks}"
    worst = max(diff for _, _, diff, _ in history)
    assert worst <= 1e-6, f"largest adapter parameter difference {worst}"
    # The run really pruned: final kept rank equals the target budget, with the pattern frozen.
    assert allocator.frozen
    assert sum(m.kept_rank for m in adapters.values()) == allocator.schedule.target_budget
    nonzero_final = history[-1][3]
    assert nonzero_final <= allocator.schedule.target_budget
    print(f"\nparity delta_t={delta_t}: {len(history)} steps, largest parameter difference {worst:.3g}")


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
