"""The opt-in fused adapter kernel (``kernel="fused"``, adalora_pl/fused_branch.py): equal to the reference to float
rounding (a bound derived from the GEMM error bound), exact gradients, what it saves for backward, the final phase on
the kept triplets only, where it falls back to the reference, and its settings."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from adalora_pl import AdaLoRAConfig, ConfigError, LoRALinear, RankAllocator, SVDLinear, inject_adapters, set_kernel
from adalora_pl.fused_branch import _AdaptedLinear, fused_adapted_linear
from tests.builders import make_batch, tiny_bert_classifier

IN, OUT, R = 24, 40, 4
EPS32 = torch.finfo(torch.float32).eps


def _layer(kind: str, base: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layer = (SVDLinear if kind == "adalora" else LoRALinear)(base, r=R, lora_alpha=7.3)
    with torch.no_grad():
        for p in layer.adapter_parameters():
            p.normal_()
    return layer


def _bases():
    torch.manual_seed(1)
    return {"linear": nn.Linear(IN, OUT), "no_bias": nn.Linear(IN, OUT, bias=False), "conv1d": Conv1D(OUT, IN)}


def _factors64(layer):
    """The branch's (A', B') in float64, as the fused kernel folds them: A' = A * E, B' = B * scale."""
    if isinstance(layer, SVDLinear):
        return (layer.lora_A * layer.lora_E).double(), layer.lora_B.double() * layer.scale(torch.float64)
    return layer.lora_A.double(), layer.lora_B.double() * layer.scaling


def _weight64(layer):
    w = layer.base_layer.weight.double()
    return w.t() if layer.fan_in_fan_out else w


def _rounding_bound(layer, x):
    """A bound on |fl32(y) - y| for y = x W^T + b + (x A'^T) B'^T computed in float32 by either kernel.

    A float32 dot product of length k errs by at most gamma_k * sum |terms| (gamma_k = k u / (1 - k u), u = eps / 2);
    the branch is two products (k = in, then k = r, with the first product's error carried through |B'|), the scale
    fold and the adds a few more roundings. Both kernels are within it of the exact value, so within twice it of each
    other.
    """
    a, b = _factors64(layer)
    ax = x.detach().double().abs()
    magnitude = ax @ _weight64(layer).abs().t() + (ax @ a.abs().t()) @ b.abs().t()
    if layer.base_layer.bias is not None:
        magnitude = magnitude + layer.base_layer.bias.double().abs()
    k = IN + R + 4
    gamma = k * EPS32 / 2 / (1 - k * EPS32 / 2)
    return gamma * magnitude


@pytest.mark.parametrize("kind", ["adalora", "lora"])
@pytest.mark.parametrize("base_name", ["linear", "no_bias", "conv1d"])
@pytest.mark.parametrize("shape", [(3, 5), (7,)])
def test_fused_output_and_gradients_match_the_reference_within_the_rounding_bound(kind, base_name, shape):
    reference = _layer(kind, _bases()[base_name])
    fused = copy.deepcopy(reference)
    set_kernel([fused], "fused")
    x = torch.randn(*shape, IN, requires_grad=True)
    x_fused = x.detach().clone().requires_grad_(True)
    grad_out = torch.randn(*shape, OUT)

    expected, out = reference(x), fused(x_fused)
    assert type(out.grad_fn).__name__ == "_AdaptedLinearBackward"  # the fused kernel ran
    assert type(expected.grad_fn).__name__ != "_AdaptedLinearBackward"
    bound = _rounding_bound(reference, x)
    # Exact value in float64, against which both kernels are held to the bound.
    a, b = _factors64(reference)
    exact = x.detach().double() @ _weight64(reference).t() + (x.detach().double() @ a.t()) @ b.t()
    if reference.base_layer.bias is not None:
        exact = exact + reference.base_layer.bias.double()
    assert ((expected.double() - exact).abs() <= bound).all()
    assert ((out.double() - exact).abs() <= bound).all()
    assert not torch.equal(bound, torch.zeros_like(bound))

    expected.backward(grad_out)
    out.backward(grad_out)
    # Gradients: the same products in another order; relative to the magnitude of each gradient's terms.
    for name in ("lora_A", "lora_B", "lora_E"):
        if hasattr(reference, name):
            g_ref, g_fused = getattr(reference, name).grad, getattr(fused, name).grad
            assert g_fused.dtype == torch.float32 and g_fused.shape == g_ref.shape
            torch.testing.assert_close(g_fused, g_ref, rtol=1e-5, atol=1e-5 * float(g_ref.abs().max()))
    torch.testing.assert_close(x_fused.grad, x.grad, rtol=1e-5, atol=1e-5 * float(x.grad.abs().max()))
    assert reference.base_layer.weight.grad is None and fused.base_layer.weight.grad is None


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("weight_in_out", [False, True])
def test_fused_backward_is_the_derivative_of_its_forward(dropout_p, weight_in_out):
    """gradcheck in float64 (the dropout mask drawn from a fixed seed at each call, so forward is a function)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, IN, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(*((IN, OUT) if weight_in_out else (OUT, IN)), dtype=torch.float64)
    bias = torch.randn(OUT, dtype=torch.float64)
    a = torch.randn(R, IN, dtype=torch.float64, requires_grad=True)
    b = torch.randn(OUT, R, dtype=torch.float64, requires_grad=True)

    def fn(x, a, b):
        torch.manual_seed(123)
        return _AdaptedLinear.apply(x, weight, bias, a, b, dropout_p, weight_in_out)

    assert torch.autograd.gradcheck(fn, (x, a, b))


def test_fused_dropout_drops_the_branch_input_only_and_scales_the_kept():
    """With dropout the branch sees x * mask / (1 - p), the base sees x; the mask is a Bernoulli(1 - p) draw."""
    torch.manual_seed(0)
    p = 0.25
    x = torch.randn(64, IN, dtype=torch.float64)
    weight = torch.randn(OUT, IN, dtype=torch.float64)
    a = torch.eye(R, IN, dtype=torch.float64)  # the branch reads the first R features of its input
    b = torch.zeros(OUT, R, dtype=torch.float64)
    b[:R] = torch.eye(R, dtype=torch.float64)
    out = fused_adapted_linear(x, weight, None, a, b, dropout_p=p)
    branch = out - x @ weight.t()
    seen = branch[:, :R]  # x[:, :R] * mask / (1 - p)
    kept = seen != 0
    torch.testing.assert_close(seen[kept], x[:, :R][kept] / (1 - p))
    drop_rate = 1 - kept.double().mean().item()
    assert 0.1 < drop_rate < 0.4  # 256 draws of Bernoulli(0.25)
    assert torch.equal(branch[:, R:], torch.zeros_like(branch[:, R:]))


def test_fused_kernel_saves_only_the_input_and_the_rank_sized_intermediate():
    """The activation-sized tensors saved for backward: the input itself (not a copy) and t (tokens x r), as the
    reference with its one-pass add; the fused kernel's gain is in passes and temporaries, not in saved tensors."""
    tokens = 3 * 5
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    for kernel in ("fused", "reference"):
        layer = _layer("adalora", nn.Linear(IN, OUT))
        set_kernel([layer], kernel)
        x = torch.randn(3, 5, IN, requires_grad=True)
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x)
        per_token = [t for t in saved if t.dim() >= 2 and t.numel() % tokens == 0 and t.shape[0] in (3, tokens)]
        sizes = sorted(t.numel() // tokens for t in per_token)
        assert sizes == [R, IN], kernel
        assert any(t.data_ptr() == x.data_ptr() for t in per_token), kernel


def test_frozen_pattern_computes_the_kept_triplets_only():
    """After freeze_pattern the fused layer equals itself before (masked E is zero: they added nothing), its masked
    E gets a zero gradient (the reference gives it one), and masked rows of A / columns of B get zero gradient in
    both."""
    layer = _layer("adalora", nn.Linear(IN, OUT))
    keep = torch.tensor([True, False, True, False])
    with torch.no_grad():
        layer.lora_E[~keep] = 0.0
    layer.rank_mask.copy_(keep)
    set_kernel([layer], "fused")
    x = torch.randn(6, IN)
    grad_out = torch.randn(6, OUT)

    def run():
        layer.zero_grad(set_to_none=True)
        out = layer(x)
        out.backward(grad_out)
        return out.detach(), [getattr(layer, n).grad.clone() for n in ("lora_A", "lora_E", "lora_B")]

    full, (ga, ge, gb) = run()
    layer.freeze_pattern()
    kept_out, (ka, ke, kb) = run()
    torch.testing.assert_close(kept_out, full, rtol=1e-6, atol=1e-6 * float(full.abs().max()))
    assert torch.equal(ke[~keep], torch.zeros_like(ke[~keep])) and not torch.equal(ge[~keep], torch.zeros(2, 1))
    for g in (ga[~keep], ka[~keep], gb[:, ~keep], kb[:, ~keep]):
        assert torch.equal(g, torch.zeros_like(g))
    torch.testing.assert_close(ka[keep], ga[keep])
    torch.testing.assert_close(kb[:, keep], gb[:, keep])

    # Nothing kept: the base layer's output, and zero (not missing) gradients, so the optimizer treats A and B as the
    # reference kernel's zero gradients make it.
    layer.rank_mask.zero_()
    layer.freeze_pattern()
    out, grads = run()
    torch.testing.assert_close(out, layer.base_layer(x), rtol=0, atol=0)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    layer.thaw_pattern()
    assert layer._kept_index is None


def test_the_allocator_freezes_the_pattern_at_tfinal_and_on_resume():
    model = tiny_bert_classifier()
    adapters = inject_adapters(model, ["query", "value"], r=4, lora_alpha=8)
    set_kernel(model, "fused")
    allocator = RankAllocator(adapters, target_r=2, tinit=1, tfinal=2, total_step=6, delta_t=1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = make_batch(labels=True)
    for step in range(6):
        model(**batch).loss.backward()
        optimizer.step()
        allocator.update_and_allocate(step)
        optimizer.zero_grad()
        frozen = [layer._kept_index is not None for layer in adapters.values()]
        assert all(frozen) == (step >= allocator.schedule.final_step) and (all(frozen) or not any(frozen))
    for layer in adapters.values():
        assert torch.equal(layer._kept_index, torch.nonzero(layer.rank_mask).view(-1))

    state = allocator.state_dict()
    for layer in adapters.values():
        layer.thaw_pattern()
    RankAllocator(adapters, target_r=2, tinit=1, tfinal=2, total_step=6, delta_t=1).load_state_dict(state)
    assert all(layer._kept_index is not None for layer in adapters.values())


def test_training_with_the_fused_kernel_follows_the_reference():
    """Eight steps through warm-up, cubic phase and final phase on a tiny BERT, in float64: the same masks at every
    step and adapters equal to float64 rounding amplified by Adam.

    In float64 because with E = 0 at the start Adam's first steps move each element by about +-lr whatever its
    gradient's size, so a gradient near zero whose sign the float32 rounding flips moves E the other way; the
    importance scores, and masks near a tie, then differ by rounding luck, for any change of summation order (as
    between PEFT and a second BLAS), not because of the kernel.
    """
    base = tiny_bert_classifier(seed=3).double()
    models = {}
    for kernel in ("reference", "fused"):
        model = copy.deepcopy(base)
        torch.manual_seed(0)  # the same initial factors
        adapters = inject_adapters(model, ["query", "value", "intermediate.dense", "output.dense"], r=4, lora_alpha=8)
        set_kernel(model, kernel)
        allocator = RankAllocator(adapters, target_r=2, tinit=2, tfinal=3, total_step=8, delta_t=1)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        models[kernel] = (model, adapters, allocator, optimizer)
    batch = make_batch(labels=True, batch_size=8)
    for step in range(8):
        for model, _, allocator, optimizer in models.values():
            torch.manual_seed(step)  # the same hidden-dropout masks in both models
            model(**batch).loss.backward()
            optimizer.step()
            allocator.update_and_allocate(step)
            optimizer.zero_grad()
        ref, fused = models["reference"][1], models["fused"][1]
        for name in ref:
            assert torch.equal(ref[name].rank_mask, fused[name].rank_mask), (step, name)
    for name in ref:
        for p in ("lora_A", "lora_E", "lora_B"):
            torch.testing.assert_close(getattr(fused[name], p), getattr(ref[name], p), rtol=0, atol=1e-10)


def test_fused_kernel_under_cpu_bf16_autocast():
    """Under autocast the kernel computes in bfloat16, as autocast's matmuls would; the factors' gradients come back
    in float32."""
    reference = _layer("adalora", nn.Linear(IN, OUT))
    fused = copy.deepcopy(reference)
    set_kernel([fused], "fused")
    x = torch.randn(5, IN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, out = reference(x), fused(x)
    assert out.dtype == torch.bfloat16
    scale = float(expected.detach().float().abs().max())
    torch.testing.assert_close(out.float(), expected.float(), rtol=0, atol=4 * 2**-8 * scale)
    out.float().sum().backward()
    assert fused.lora_A.grad.dtype == torch.float32 and torch.isfinite(fused.lora_A.grad).all()


def test_where_the_fused_kernel_does_not_apply_the_reference_runs_bitwise():
    """A hook on the base layer (it would be skipped), a trainable base weight, and torch.func transforms: the
    reference expressions, bitwise."""
    reference = _layer("lora", nn.Linear(IN, OUT))
    x = torch.randn(4, IN)
    expected = reference(x)

    hooked = copy.deepcopy(reference)
    set_kernel([hooked], "fused")
    calls = []
    hooked.base_layer.register_forward_hook(lambda *args: calls.append(1))
    out = hooked(x)
    assert calls == [1] and torch.equal(out, expected) and type(out.grad_fn).__name__ != "_AdaptedLinearBackward"

    trainable = copy.deepcopy(reference)
    set_kernel([trainable], "fused")
    trainable.base_layer.weight.requires_grad_(True)
    assert type(trainable(x).grad_fn).__name__ != "_AdaptedLinearBackward"

    functional = copy.deepcopy(reference)
    set_kernel([functional], "fused")
    params = dict(functional.named_parameters())
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(functional, p, (x,)))(params)
    assert jac["lora_B"].shape == (4, OUT, OUT, R)


def test_the_kernel_setting_is_checked_and_reaches_the_layers():
    with pytest.raises(ConfigError, match=r"kernel must be one of \['reference', 'fused'\], got 'fast'"):
        AdaLoRAConfig(kernel="fast")
    with pytest.raises(ConfigError, match="kernel must be one of"):
        set_kernel([], "fast")
    model = tiny_bert_classifier()
    adapters = inject_adapters(model, ["query"], r=2, lora_alpha=4)
    assert {layer.kernel for layer in adapters.values()} == {"reference"}  # the default: PEFT's arithmetic
    set_kernel(model, "fused")
    assert {layer.kernel for layer in adapters.values()} == {"fused"}
    assert SVDLinear.kernel == "reference"  # per layer: the class default is untouched


def test_fused_kernel_on_a_bfloat16_base_with_float32_adapters():
    """bf16-true: the float32 adapters' branch runs in the base's bfloat16 (documented, docs/method.md §14); the
    output is bfloat16 within bfloat16 rounding of the reference (which adds a float32 update and rounds once), and
    the factors' gradients are float32."""
    reference = _layer("lora", nn.Linear(IN, OUT).to(torch.bfloat16))
    assert reference.lora_A.dtype == torch.float32
    fused = copy.deepcopy(reference)
    set_kernel([fused], "fused")
    x = torch.randn(6, IN, dtype=torch.bfloat16)
    expected, out = reference(x), fused(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    assert type(out.grad_fn).__name__ == "_AdaptedLinearBackward"
    scale = float(expected.detach().float().abs().max())
    torch.testing.assert_close(out.float(), expected.float(), rtol=0, atol=4 * 2**-8 * scale)
    out.float().sum().backward()
    assert fused.lora_B.grad.dtype == torch.float32 and bool(fused.lora_B.grad.abs().sum() > 0)
