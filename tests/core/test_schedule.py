"""The cubic budget schedule (docs/method.md §4) and the validation of AdaLoRA's settings."""

from __future__ import annotations

import math

import pytest

from adalora_pl import BudgetSchedule, budget_at
from adalora_pl.schedule import validate_betas, validate_ranks


def spec_budget(step, b0, bT, tinit, tfinal, T):
    """Spec §4 written independently: floor(bT + (b0 - bT) * (1 - (t - ti) / (T - tf - ti))^3)."""
    if step <= tinit:
        return b0
    if step > T - tfinal:
        return bT
    frac = (step - tinit) / (T - tfinal - tinit)
    return math.floor(bT + (b0 - bT) * (1 - frac) ** 3)


@pytest.mark.parametrize("b0,bT,tinit,tfinal,T", [(72 * 3, 72, 10, 30, 100), (36, 12, 0, 5, 40), (8, 8, 2, 2, 9)])
def test_budget_matches_formula_and_properties(b0, bT, tinit, tfinal, T):
    budgets = [budget_at(s, init_budget=b0, target_budget=bT, tinit=tinit, tfinal=tfinal, total_step=T)
               for s in range(T + 5)]
    assert budgets == [spec_budget(s, b0, bT, tinit, tfinal, T) for s in range(T + 5)]
    assert budgets[0] == b0
    assert budgets[T - tfinal] == bT and budgets[-1] == bT
    assert all(a >= b for a, b in zip(budgets, budgets[1:], strict=False)), "budget must never increase"
    if b0 > bT:
        assert budgets[tinit + 1] < b0  # pruning starts right after warm-up


def test_mask_steps_absolute_multiples_and_forced_final():
    s = BudgetSchedule(init_budget=30, target_budget=10, tinit=5, tfinal=10, total_step=47, delta_t=4)
    mask_steps = [t for t in range(47) if s.is_mask_step(t)]
    # cubic phase is 6..37; multiples of 4 there, plus the forced final step 37
    assert mask_steps == [8, 12, 16, 20, 24, 28, 32, 36, 37]
    assert [s.phase_at(t) for t in (5, 6, 37, 38)] == ["warmup", "cubic", "cubic", "final"]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(tinit=50, tfinal=50, total_step=100), r"tinit \+ tfinal must be < total_step.*= 100 >= total_step=100"),
        (dict(tinit=0, tfinal=0, total_step=10, delta_t=0), r"delta_t must be an integer >= 1.*got 0"),
        (dict(tinit=-1, tfinal=0, total_step=10), r"tinit must be a non-negative number of steps, got -1"),
        (dict(tinit=0, tfinal=0, total_step=0), r"total_step must be a positive.*got 0"),
        (dict(tinit=0.5, tfinal=0, total_step=10), r"tinit must be .* got 0.5"),
    ],
)
def test_schedule_errors_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BudgetSchedule(init_budget=10, target_budget=5, **{"delta_t": 1, **kwargs})


def test_rank_and_beta_errors():
    with pytest.raises(ValueError, match=r"target_r \(8\) must not exceed init_r \(4\)"):
        validate_ranks(4, 8)
    with pytest.raises(ValueError, match="init_r must be a positive integer, got 0"):
        validate_ranks(0, 0)
    with pytest.raises(ValueError, match="target_r must be a positive integer, got -2"):
        validate_ranks(4, -2)
    with pytest.raises(ValueError, match=r"beta1 must be in \[0, 1\), got 1.0"):
        validate_betas(1.0, 0.5)
    with pytest.raises(ValueError, match=r"beta2 must be in \[0, 1\), got -0.1"):
        validate_betas(0.5, -0.1)
