"""Adapter layers: forward against the delta weight, merge, Conv1D, dropout, LoRA scaling, half-precision bases."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from adalora_pl import LoRALinear, SVDLinear


def test_svd_forward_matches_delta_weight_and_merge_roundtrip():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = SVDLinear(base, r=3, lora_alpha=16)
    with torch.no_grad():
        layer.lora_E.normal_()
    x = torch.randn(4, 6)
    expected = base(x) + x @ layer.delta_weight().T
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    # scaling divides by ranknum (the initial rank), not by r after pruning
    torch.testing.assert_close(
        layer.delta_weight(), layer.lora_B @ (layer.lora_A * layer.lora_E) * 16 / (3 + 1e-5)
    )
    before = layer(x).detach()
    w0 = base.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-6)
    layer.unmerge()
    torch.testing.assert_close(base.weight, w0, rtol=0, atol=1e-6)


def test_conv1d_fan_in_fan_out():
    torch.manual_seed(0)
    conv = Conv1D(5, 6)  # nf=out, nx=in: weight (in=6, out=5)
    layer = SVDLinear(conv, r=2, lora_alpha=8)
    assert (layer.in_features, layer.out_features, layer.fan_in_fan_out) == (6, 5, True)
    with torch.no_grad():
        layer.lora_E.normal_()
    x = torch.randn(3, 6)
    out = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), out, rtol=1e-5, atol=1e-6)


def test_dropout_only_on_adapter_branch_and_input_cast():
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    layer = SVDLinear(base, r=2, lora_alpha=8, lora_dropout=0.5).train()
    x = torch.randn(16, 8)
    # E = 0: the branch contributes nothing, so dropout cannot change the output.
    assert torch.equal(layer(x), base(x))
    with torch.no_grad():
        layer.lora_E.fill_(1.0)
    a, b = layer(x), layer(x)
    assert not torch.equal(a, b)  # dropout active on the branch
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    # bf16 input with fp32 adapter: input cast to the adapter dtype, result keeps the base dtype.
    base16 = nn.Linear(8, 8).to(torch.bfloat16)
    layer16 = SVDLinear(base16, r=2, lora_alpha=8)
    for p in (layer16.lora_A, layer16.lora_E, layer16.lora_B):
        p.data = p.data.float()
    assert layer16(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_lora_layer_scaling_and_zero_init():
    base = nn.Linear(4, 3)
    layer = LoRALinear(base, r=2, lora_alpha=8)
    assert layer.scaling == 4.0
    x = torch.randn(5, 4)
    assert torch.equal(layer(x), base(x))
    with torch.no_grad():
        layer.lora_B.normal_()
    torch.testing.assert_close(layer(x), base(x) + x @ (layer.lora_B @ layer.lora_A * 4.0).T)


@pytest.mark.parametrize("method", ["adalora", "lora"])
@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_gets_float32_adapters_and_keeps_its_output_dtype(method, base_dtype):
    """Adapters of a bf16/fp16 layer are float32 (PEFT's default); the output is in the base dtype and is exactly
    the float32 update added to the base output in float32 and rounded once to the base dtype (PEFT's ``result +=``
    on a half-precision result); autocast_adapter_dtype=False keeps the base dtype."""
    from adalora_pl.layers import LoRALinear

    torch.manual_seed(0)
    base = nn.Linear(8, 6).to(base_dtype)
    cls = SVDLinear if method == "adalora" else LoRALinear
    layer = cls(base, r=4, lora_alpha=8)
    assert {p.dtype for p in layer.adapter_parameters()} == {torch.float32}
    assert layer.base_layer.weight.dtype == base_dtype and layer.weight is base.weight
    with torch.no_grad():
        for p in layer.adapter_parameters():
            p.normal_()
    x = torch.randn(3, 8).to(base_dtype)
    out = layer(x)
    assert out.dtype == base_dtype
    # The reference's expression in its operation order (float32 throughout, one rounding at the end), so the output
    # must equal it bit for bit. Rounding the update to the base dtype before adding (two roundings) would not.
    if method == "adalora":
        branch = x.float() @ (layer.lora_A * layer.lora_E).T @ layer.lora_B.T
        update = branch * layer.lora_alpha / (layer.ranknum + 1e-5)
    else:
        update = x.float() @ layer.lora_A.T @ layer.lora_B.T * layer.scaling
    expected = (base(x).float() + update).to(base_dtype)
    assert torch.equal(out, expected), (out - expected).abs().max()
    # The update matters at this precision: it changes the output by more than the base dtype's rounding.
    assert not torch.equal(out, base(x))
    kept = cls(nn.Linear(8, 6).to(base_dtype), r=4, lora_alpha=8, autocast_adapter_dtype=False)
    assert {p.dtype for p in kept.adapter_parameters()} == {base_dtype}


@pytest.mark.parametrize("convert", [lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.bfloat16()],
                         ids=["to", "half", "bfloat16"])
def test_a_whole_module_conversion_leaves_float32_adapters_exact(convert):
    """What a "bf16-true"/"16-true" Trainer does to the module: the base converts, the adapters keep their float32
    parameter objects and values bit for bit (no round trip through half precision)."""
    layer = SVDLinear(nn.Linear(8, 6), r=4, lora_alpha=8)
    with torch.no_grad():
        layer.lora_E.normal_()
    params = layer.adapter_parameters()
    before = [p.detach().clone() for p in params]
    convert(layer)
    assert layer.base_layer.weight.dtype in (torch.bfloat16, torch.float16)
    assert all(a is b for a, b in zip(params, layer.adapter_parameters(), strict=True))  # same objects
    assert all(p.dtype == torch.float32 and torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert layer.ranknum.dtype == torch.float32 and layer.rank_mask.dtype == torch.bool
    kept = SVDLinear(nn.Linear(8, 6), r=4, lora_alpha=8, autocast_adapter_dtype=False)
    convert(kept)
    assert {p.dtype for p in kept.adapter_parameters()} == {kept.base_layer.weight.dtype}
