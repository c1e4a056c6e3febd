"""The opt-in orthogonal initialisation of SVD adapters (`adapter_init="orthogonal"`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adalora_pl import AdaLoRACallback, SVDLinear, inject_adapters
from tests.builders import tiny_bert_classifier


@pytest.mark.parametrize("shape", [(16, 24), (24, 16), (384, 384)])
def test_orthogonal_init_gives_orthonormal_factors_and_the_base_output(shape):
    torch.manual_seed(0)
    base = nn.Linear(*shape)
    layer = SVDLinear(base, r=4, lora_alpha=8, adapter_init="orthogonal")
    eye = torch.eye(4)
    torch.testing.assert_close(layer.lora_A @ layer.lora_A.T, eye, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.T @ layer.lora_B, eye, rtol=0, atol=1e-5)
    assert torch.count_nonzero(layer.lora_E) == 0
    x = torch.randn(5, shape[0])
    assert torch.equal(layer(x), base(x))
    reference = SVDLinear(nn.Linear(*shape), r=4, lora_alpha=8)  # N(0, 0.02): far from orthonormal rows
    assert (reference.lora_A @ reference.lora_A.T - eye).abs().max() > 0.5


def test_orthogonal_init_through_injection_and_the_callback_and_bad_values():
    model = tiny_bert_classifier()
    adapters = inject_adapters(model, ["query", "value"], r=3, adapter_init="orthogonal")
    for layer in adapters.values():
        torch.testing.assert_close(layer.lora_A @ layer.lora_A.T, torch.eye(3), rtol=0, atol=1e-5)
    with pytest.raises(ValueError,
                       match=r"adapter_init must be one of \['reference', 'orthogonal', 'weight_svd', "
                             r"'gradient_svd'\], got 'svd'"):
        SVDLinear(nn.Linear(4, 4), r=2, lora_alpha=8, adapter_init="svd")
    with pytest.raises(ValueError, match=r"adapter_init must be one of"):
        AdaLoRACallback(adapter_init="svd")
