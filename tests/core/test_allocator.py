"""RankAllocator: importance EMAs against the formula, masking edge cases, variants, state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adalora_pl import RankAllocator, SVDLinear, mask_threshold


def make_layers(num=2, r=3, din=4, dout=5, seed=0):
    torch.manual_seed(seed)
    return {f"layer{i}": SVDLinear(nn.Linear(din, dout), r=r, lora_alpha=8) for i in range(num)}


def set_grads(layers, seed):
    g = torch.Generator().manual_seed(seed)
    for m in layers.values():
        for p in (m.lora_A, m.lora_E, m.lora_B):
            p.grad = torch.randn(p.shape, generator=g)


def test_importance_emas_follow_the_formula():
    layers = make_layers()
    alloc = RankAllocator(layers, target_r=1, tinit=100, tfinal=1, total_step=200, beta1=0.8, beta2=0.7)
    params = [p for m in layers.values() for p in (m.lora_A, m.lora_E, m.lora_B)]
    avg = [torch.zeros_like(p) for p in params]
    unc = [torch.zeros_like(p) for p in params]
    for step in range(3):
        with torch.no_grad():
            for p in params:
                p.add_(0.1)
        set_grads(layers, step)
        alloc.update_and_allocate(step)
        for i, p in enumerate(params):
            ipt = (p * p.grad).abs()
            avg[i] = 0.8 * avg[i] + 0.2 * ipt
            unc[i] = 0.7 * unc[i] + 0.3 * (ipt - avg[i]).abs()
    scores = alloc.element_scores()
    for i in range(len(params)):
        torch.testing.assert_close(scores[i], avg[i] * unc[i], rtol=1e-6, atol=0)
    # triplet score: s(E_i) + mean_j s(A[i, j]) + mean_j s(B[j, i])
    sA, sE, sB = (avg[i] * unc[i] for i in range(3))
    expected = sE[:, 0] + sA.mean(dim=1) + sB.mean(dim=0)
    torch.testing.assert_close(alloc.layer_scores()[0], expected)


def test_non_finite_step_is_left_out_of_the_averages():
    runs = []
    for inject_inf in (False, True):
        layers = make_layers(seed=1)
        alloc = RankAllocator(layers, target_r=1, tinit=100, tfinal=1, total_step=200)
        step = 0
        for k in range(4):
            if inject_inf and k == 2:
                set_grads(layers, 99)
                next(iter(layers.values())).lora_B.grad[0, 0] = float("inf")
                alloc.update_and_allocate(step)
                assert not bool(alloc.last_finite)
                step += 1
            set_grads(layers, k)
            alloc.update_and_allocate(step)
            step += 1
        runs.append(alloc)
    assert torch.equal(runs[0].exp_avg_ipt, runs[1].exp_avg_ipt)
    assert torch.equal(runs[0].exp_avg_unc, runs[1].exp_avg_unc)
    assert torch.isfinite(runs[1].exp_avg_unc).all()


def test_init_r_equal_target_r_masks_nothing():
    layers = make_layers(r=2)
    alloc = RankAllocator(layers, target_r=2, tinit=1, tfinal=2, total_step=8, delta_t=1)
    with torch.no_grad():
        for m in layers.values():
            m.lora_E.fill_(1.0)
    for step in range(8):
        set_grads(layers, step)
        alloc.update_and_allocate(step)
    assert alloc.frozen
    assert all(bool((m.lora_E == 1.0).all()) for m in layers.values())
    assert all(m.kept_rank == 2 for m in layers.values())


def test_global_budget_can_prune_a_module_to_rank_zero():
    layers = make_layers(num=2, r=3)
    alloc = RankAllocator(layers, target_r=1, tinit=0, tfinal=1, total_step=4, importance="magnitude")
    with torch.no_grad():
        layers["layer0"].lora_E.copy_(torch.tensor([[0.01], [0.02], [0.03]]))
        layers["layer1"].lora_E.copy_(torch.tensor([[1.0], [2.0], [3.0]]))
    alloc.mask_to_budget(2)  # keep the 2 best of 6 triplets
    assert layers["layer0"].kept_rank == 0
    assert layers["layer1"].rank_mask.tolist() == [False, True, True]
    assert layers["layer0"].lora_E.abs().sum() == 0
    # a rank-0 layer still runs and equals its base layer
    x = torch.randn(2, 4)
    assert torch.equal(layers["layer0"](x), layers["layer0"].base_layer(x))


def test_ties_at_threshold_are_all_masked_like_the_reference():
    """The allocator's own masking: with two triplets tied at the lowest score and a budget that removes one,
    both go (as in PEFT), so the layers keep one triplet less than the budget."""
    layers = make_layers(num=2, r=2)
    alloc = RankAllocator(layers, target_r=1, tinit=0, tfinal=1, total_step=10, importance="magnitude")
    with torch.no_grad():
        for layer, values in zip(layers.values(), ([0.5, 0.1], [0.1, 0.3]), strict=True):
            layer.lora_E.copy_(torch.tensor(values).view(-1, 1))
    threshold = alloc.mask_to_budget(budget=3)  # one triplet to remove, two tied at the threshold
    assert threshold.item() == pytest.approx(0.1)
    assert [m.rank_mask.tolist() for m in layers.values()] == [[True, False], [False, True]]
    assert [m.lora_E.view(-1).tolist() for m in layers.values()] == [[0.5, 0.0], [0.0, pytest.approx(0.3)]]
    assert mask_threshold(torch.tensor([0.5, 0.1]), 0) is None
    with pytest.raises(ValueError, match="cannot mask 5 of 4 triplets"):
        mask_threshold(torch.tensor([0.5, 0.1, 0.1, 0.3]), 5)


def test_averages_follow_the_parameters_to_another_device():
    """CPU proxy for Lightning moving the module after the callback's setup: the allocator is built on CPU, the
    layers move to the meta device, and update, masking and state loading run there without a device mix."""
    layers = make_layers()
    alloc = RankAllocator(layers, target_r=1, tinit=0, tfinal=2, total_step=10, delta_t=1)
    saved = alloc.state_dict()
    for layer in layers.values():
        layer.to("meta")
        for p in (layer.lora_A, layer.lora_E, layer.lora_B):
            p.grad = torch.empty_like(p)
    alloc.update_and_allocate(1)
    assert alloc.exp_avg_ipt.device.type == alloc.exp_avg_unc.device.type == "meta"
    alloc.load_state_dict(saved)
    assert alloc.exp_avg_ipt.device.type == "meta"


def test_a_step_without_gradients_or_skipped_by_the_scaler_leaves_the_averages_alone():
    layers = make_layers()
    alloc = RankAllocator(layers, target_r=1, tinit=100, tfinal=1, total_step=200)
    set_grads(layers, 0)
    alloc.update_and_allocate(0)
    before = (alloc.exp_avg_ipt.clone(), alloc.exp_avg_unc.clone())
    for m in layers.values():
        for p in (m.lora_A, m.lora_E, m.lora_B):
            p.grad = None  # training_step returned None: no backward
    alloc.update_and_allocate(1)
    set_grads(layers, 1)
    alloc.update_and_allocate(2, applied=torch.tensor(False))  # the GradScaler skipped this step
    assert torch.equal(alloc.exp_avg_ipt, before[0]) and torch.equal(alloc.exp_avg_unc, before[1])
    alloc.update_and_allocate(3, applied=torch.tensor(True))
    assert not torch.equal(alloc.exp_avg_ipt, before[0])


def test_fresh_allocator_first_called_past_the_final_step_keeps_the_budget():
    """No importance collected: instead of masking every tied-at-zero triplet, keep the pattern the layers carry
    or, without one, the target_budget triplets of largest |E|."""
    layers = make_layers(num=2, r=3)
    with torch.no_grad():
        for i, layer in enumerate(layers.values()):
            layer.lora_E.copy_(torch.tensor([[0.1 + i], [0.3 + i], [0.2 + i]]))
    alloc = RankAllocator(layers, target_r=1, tinit=0, tfinal=2, total_step=10)
    event = alloc.update_and_allocate(9)
    assert event.masked and alloc.frozen
    assert [m.rank_mask.tolist() for m in layers.values()] == [[False, False, False], [False, True, True]]

    carried = make_layers(num=2, r=3)
    for layer in carried.values():
        layer.rank_mask.copy_(torch.tensor([True, False, False]))
        with torch.no_grad():
            layer.lora_E.fill_(1.0)
    alloc = RankAllocator(carried, target_r=1, tinit=0, tfinal=2, total_step=10)
    alloc.update_and_allocate(9)
    assert [m.rank_mask.tolist() for m in carried.values()] == [[True, False, False]] * 2
    assert [m.lora_E.view(-1).tolist() for m in carried.values()] == [[1.0, 0.0, 0.0]] * 2


def test_bf16_adapters_importance_equals_a_float32_recomputation():
    """Importance of half-precision adapters is computed in float32 from the bf16 values and gradients."""
    torch.manual_seed(0)
    layers = {f"l{i}": SVDLinear(nn.Linear(4, 5).to(torch.bfloat16), r=3, lora_alpha=8, autocast_adapter_dtype=False)
              for i in range(2)}
    assert {p.dtype for m in layers.values() for p in (m.lora_A, m.lora_E, m.lora_B)} == {torch.bfloat16}
    alloc = RankAllocator(layers, target_r=1, tinit=100, tfinal=1, total_step=200, beta1=0.8, beta2=0.7)
    params = [p for m in layers.values() for p in (m.lora_A, m.lora_E, m.lora_B)]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype))
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
    alloc.update_and_allocate(0)
    ipt = torch.cat([(p.detach().float() * p.grad.float()).abs().reshape(-1) for p in params])
    expected_avg = 0.2 * ipt
    expected_unc = 0.3 * (ipt - expected_avg).abs()
    assert alloc.exp_avg_ipt.dtype == torch.float32
    torch.testing.assert_close(alloc.exp_avg_ipt, expected_avg, rtol=1e-6, atol=0)
    torch.testing.assert_close(alloc.exp_avg_unc, expected_unc, rtol=1e-6, atol=0)


def test_importance_variants_disagree_on_a_constructed_case():
    """Triplet 0 has a large |E| but tiny, steady sensitivity; triplet 1 a small |E| with large,
    steady sensitivity; triplet 2 a medium, wildly fluctuating sensitivity. Keeping one triplet:
    magnitude keeps 0, sensitivity keeps 1, sensitivity x uncertainty keeps 2."""
    kept = {}
    for variant in ("magnitude", "sensitivity", "sensitivity_uncertainty"):
        layer = SVDLinear(nn.Linear(1, 1, bias=False), r=3, lora_alpha=1)
        alloc = RankAllocator({"l": layer}, target_r=1, tinit=0, tfinal=1, total_step=100, importance=variant)
        with torch.no_grad():
            layer.lora_A.fill_(0.0)
            layer.lora_B.fill_(0.0)
            layer.lora_E.copy_(torch.tensor([[10.0], [0.1], [1.0]]))
        for step in range(40):
            layer.lora_A.grad = torch.zeros_like(layer.lora_A)
            layer.lora_B.grad = torch.zeros_like(layer.lora_B)
            fluct = 3.0 if step % 2 == 0 else 0.0  # |w g| of triplet 2 alternates 3, 0 (mean 1.5)
            layer.lora_E.grad = torch.tensor([[0.001], [20.0], [fluct]])  # |w g| = 0.01, 2.0, 3/0
            alloc.update_importance()
        alloc.mask_to_budget(1)
        kept[variant] = layer.rank_mask.nonzero().flatten().tolist()
    assert kept == {"magnitude": [0], "sensitivity": [1], "sensitivity_uncertainty": [2]}


def test_state_dict_round_trip_and_mismatch_error():
    layers = make_layers()
    alloc = RankAllocator(layers, target_r=1, tinit=0, tfinal=2, total_step=10)
    for step in range(4):
        set_grads(layers, step)
        alloc.update_and_allocate(step)
    state = alloc.state_dict()
    other_layers = make_layers()
    other = RankAllocator(other_layers, target_r=1, tinit=0, tfinal=2, total_step=10)
    other.load_state_dict(state)
    assert torch.equal(other.exp_avg_ipt, alloc.exp_avg_ipt) and torch.equal(other.exp_avg_unc, alloc.exp_avg_unc)
    assert other.last_step == 3 and other.rank_pattern() == alloc.rank_pattern()
    wrong = RankAllocator(make_layers(num=3), target_r=1, tinit=0, tfinal=2, total_step=10)
    with pytest.raises(ValueError, match="does not match these adapters"):
        wrong.load_state_dict(state)


def test_frozen_pattern_is_reapplied_after_every_final_step():
    layers = make_layers(r=2)
    alloc = RankAllocator(layers, target_r=1, tinit=0, tfinal=3, total_step=6)
    for step in range(6):
        set_grads(layers, step)
        with torch.no_grad():
            for m in layers.values():
                m.lora_E.add_(1.0)  # an "optimizer step" that would revive pruned triplets
        alloc.update_and_allocate(step)
        if step >= 3:
            assert alloc.frozen
            for m in layers.values():
                assert torch.equal(m.lora_E[:, 0] != 0, m.rank_mask)
    assert sum(m.kept_rank for m in layers.values()) == 2


def test_bad_allocator_settings():
    layers = make_layers()
    with pytest.raises(ValueError, match="importance must be one of"):
        RankAllocator(layers, target_r=1, tinit=0, tfinal=1, total_step=5, importance="fisher")
    with pytest.raises(ValueError, match=r"target_r \(4\) must not exceed init_r \(3\)"):
        RankAllocator(layers, target_r=4, tinit=0, tfinal=1, total_step=5)
    with pytest.raises(ValueError, match=r"tinit \+ tfinal must be < total_step"):
        RankAllocator(layers, target_r=1, tinit=3, tfinal=2, total_step=5)


@pytest.mark.parametrize("importance", ["sensitivity_uncertainty", "sensitivity", "magnitude"])
def test_a_mask_event_without_any_importance_raises_instead_of_masking_everything(importance):
    """Scores that never saw a gradient all tie at zero, and ties are masked: every triplet would go. The
    allocator refuses (the magnitude variant needs no gradients and masks by |E|)."""
    layers = make_layers()
    with torch.no_grad():
        for m in layers.values():
            m.lora_E.normal_()
    alloc = RankAllocator(layers, target_r=1, tinit=2, tfinal=2, total_step=10, importance=importance)
    for step in range(3):
        alloc.update_and_allocate(step)  # warm-up, no .grad anywhere: nothing reaches the averages
    if importance == "magnitude":
        alloc.allocate(3)
        assert 0 < int(alloc.kept_total()) < 6
        return
    assert alloc.importance_steps == 0
    with pytest.raises(RuntimeError, match="no importance was collected before the mask event at step 3"):
        alloc.allocate(3)
    set_grads(layers, 0)
    alloc.update_importance()
    alloc.allocate(3)
    assert alloc.importance_steps == 1 and 0 < int(alloc.kept_total()) < 6


def test_allocate_after_update_importance_is_update_and_allocate():
    """The callback's two halves (importance right after the optimizer step, the mask at the batch end) give
    PEFT's single call bit for bit."""
    pair = [make_layers(seed=0), make_layers(seed=0)]
    whole = RankAllocator(pair[0], target_r=1, tinit=1, tfinal=2, total_step=8)
    halves = RankAllocator(pair[1], target_r=1, tinit=1, tfinal=2, total_step=8)
    for step in range(8):
        set_grads(pair[0], step)
        set_grads(pair[1], step)
        whole.update_and_allocate(step)
        if step < halves.schedule.final_step:
            halves.update_importance()
        halves.allocate(step)
        assert halves.rank_pattern() == whole.rank_pattern(), step
        assert torch.equal(halves.exp_avg_ipt, whole.exp_avg_ipt) and torch.equal(halves.exp_avg_unc, whole.exp_avg_unc)
    assert whole.frozen and halves.frozen
