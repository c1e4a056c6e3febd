"""The fused residual add of the hot path: bitwise the reference expressions, under compile and torch.func, and
safe against overwriting a saved tensor."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adalora_pl import LoRALinear, SVDLinear


def _reference_output(layer, x):
    """The unfused expressions of the reference implementations: PEFT's AdaLoRA (in place) and LoRA."""
    result = layer.base_layer(x)
    if isinstance(layer, SVDLinear):
        result += (x @ (layer.lora_A * layer.lora_E).T @ layer.lora_B.T) * layer.lora_alpha / (layer.ranknum + 1e-5)
        return result
    return result + (x @ layer.lora_A.T @ layer.lora_B.T) * layer.scaling


def _grads(layer, x, out, grad_out):
    out.backward(grad_out)
    grads = [p.grad.clone() for p in (layer.lora_A, layer.lora_B, getattr(layer, "lora_E", None)) if p is not None]
    grads.append(x.grad.clone())
    layer.zero_grad()
    x.grad = None
    return grads


@pytest.mark.parametrize("kind", ["adalora", "lora"])
@pytest.mark.parametrize("alpha", [32, 7.3])
@pytest.mark.parametrize("shape", [(4, 7), (9,)])
def test_fused_residual_add_is_bitwise_the_reference(kind, alpha, shape):
    torch.manual_seed(0)
    cls = SVDLinear if kind == "adalora" else LoRALinear
    layer = cls(nn.Linear(24, 40), r=3, lora_alpha=alpha)
    with torch.no_grad():
        (layer.lora_E if kind == "adalora" else layer.lora_B).normal_()
    x = torch.randn(*shape, 24, requires_grad=True)
    # Gradients spread over many binades, so that any change in rounding order would show.
    grad_out = torch.randn(*shape, 40) * torch.exp(torch.randn(*shape, 40) * 4)

    expected = _reference_output(layer, x)
    expected_grads = _grads(layer, x, expected, grad_out)
    out = layer(x)
    assert type(out.grad_fn).__name__ == "_AddScaledIntoBackward"  # the fused path ran
    assert torch.equal(out, expected)
    assert all(torch.equal(a, b) for a, b in zip(_grads(layer, x, out, grad_out), expected_grads, strict=True))
    with torch.no_grad():
        assert torch.equal(layer(x), expected)

    # The switch back to the plain expressions gives the same numbers.
    layer.fuse_residual_add = False
    out = layer(x)
    assert type(out.grad_fn).__name__ != "_AddScaledIntoBackward"
    assert torch.equal(out, expected)
    assert all(torch.equal(a, b) for a, b in zip(_grads(layer, x, out, grad_out), expected_grads, strict=True))


def test_the_fusion_switch_is_per_layer_and_per_call():
    """``fuse_residual_add`` of one layer leaves every other layer fused (no module-level state), and
    ``add_scaled(fused=False)`` evaluates the plain expression."""
    from adalora_pl.fused_add import add_scaled

    torch.manual_seed(0)
    plain, fused = SVDLinear(nn.Linear(8, 6), r=2, lora_alpha=4), SVDLinear(nn.Linear(8, 6), r=2, lora_alpha=4)
    plain.fuse_residual_add = False
    x = torch.randn(3, 8, requires_grad=True)
    assert type(plain(x).grad_fn).__name__ != "_AddScaledIntoBackward"
    assert type(fused(x).grad_fn).__name__ == "_AddScaledIntoBackward"
    assert SVDLinear.fuse_residual_add and LoRALinear.fuse_residual_add  # the class default is untouched

    result, w = torch.randn(3, 5, requires_grad=True), torch.randn(5, 5, requires_grad=True)
    assert type(add_scaled(result, result @ w, 2.0).grad_fn).__name__ == "_AddScaledIntoBackward"
    out = add_scaled(result, result @ w, 2.0, fused=False)
    assert type(out.grad_fn).__name__ == "AddBackward0"
    assert torch.equal(out, result + (result @ w) * 2.0)


@pytest.mark.parametrize("kind", ["adalora", "lora"])
def test_fused_residual_add_under_compile_and_torch_func(kind):
    torch.manual_seed(0)
    cls = SVDLinear if kind == "adalora" else LoRALinear
    layer = cls(nn.Linear(24, 40), r=3, lora_alpha=32)
    with torch.no_grad():
        (layer.lora_E if kind == "adalora" else layer.lora_B).normal_()
    x = torch.randn(4, 7, 24, requires_grad=True)
    grad_out = torch.randn(4, 7, 40)
    expected = _reference_output(layer, x)
    expected_grads = _grads(layer, x, expected, grad_out)

    # torch.compile traces the plain expressions: same values and gradients.
    out = torch.compile(layer, backend="aot_eager")(x)
    assert torch.equal(out, expected)
    assert all(torch.equal(a, b) for a, b in zip(_grads(layer, x, out, grad_out), expected_grads, strict=True))
    # torch.func sees the out-of-place autograd Function (vmap-able, differentiable).
    params = {n: p.detach() for n, p in layer.named_parameters()}
    func_grads = torch.func.grad(
        lambda p: (torch.func.functional_call(layer, p, (x.detach(),)) * grad_out).sum())(params)
    assert torch.allclose(func_grads["lora_A"], expected_grads[0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(func_grads["lora_B"], expected_grads[1], rtol=1e-5, atol=1e-6)


def test_fused_residual_add_refuses_to_overwrite_a_saved_tensor():
    """``update``'s buffer receives the sum: if autograd had saved it, backward must fail, not be wrong."""
    from adalora_pl.fused_add import add_scaled

    result = torch.randn(3, 5, requires_grad=True)
    w = torch.randn(5, 5, requires_grad=True)
    update = result @ w
    squared = update * update  # MulBackward saves update itself
    out = add_scaled(result, update, 2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out.sum() + squared.sum()).backward()
