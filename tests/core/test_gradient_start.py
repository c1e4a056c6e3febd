"""The gradient-SVD start (``adapter_init="gradient_svd"``, docs/method.md §13) without Lightning: the layer's
factors from the gradient's singular vectors, the gradient estimate against autograd on a trainable copy, and the
refusals. The callback's part (the first batches of a fit) is tests/lightning/test_gradient_start.py."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from adalora_pl import base_weight_gradients, start_from_gradients
from adalora_pl.config import AdaLoRAConfig
from adalora_pl.errors import ConfigError
from adalora_pl.gradient_start import generated_losses
from adalora_pl.injection import inject_adapters
from adalora_pl.layers import SVDLinear
from tests.builders import BERT_TARGETS, make_batch, tiny_bert_classifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def oriented(layer: SVDLinear, grad: torch.Tensor) -> torch.Tensor:
    """``grad`` (in the base weight's layout) as an (out, in) matrix, float64."""
    return (grad.T if layer.fan_in_fan_out else grad).double()


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_the_start_sets_the_gradients_singular_vectors_and_keeps_the_output(kind):
    torch.manual_seed(0)
    base = Conv1D(24, 16) if kind == "conv1d" else nn.Linear(16, 24)  # both (out 24, in 16)
    layer = SVDLinear(base, r=5, lora_alpha=8, adapter_init="gradient_svd")
    x = torch.randn(7, 16)
    expected = base(x)
    grad = torch.randn(base.weight.shape)
    s = layer.start_from_gradient(grad)
    g = oriented(layer, grad)
    torch.testing.assert_close(s, torch.linalg.svdvals(g))  # the spectrum, returned for the log
    a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    torch.testing.assert_close(a @ a.T, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(b.T @ b, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-6)
    # B^T G A^T = diag(s_1..s_r): A and B are the top right and left singular vectors of G.
    torch.testing.assert_close(b.T @ g @ a.T, torch.diag(s[:5]), rtol=0, atol=1e-5)
    assert torch.count_nonzero(layer.lora_E) == 0
    assert torch.equal(layer(x), expected)  # E = 0: exactly the base layer


def test_the_first_gradient_of_the_singular_values_is_scale_times_sigma():
    """On the loss whose gradient the start took, dL/dE_i = scale * u_i^T G v_i = scale * s_i: the steepest start
    orthonormal factors can have."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 3))
    layers = inject_adapters(model, ["0", "2"], r=3, lora_alpha=6, adapter_init="gradient_svd")
    x, y = torch.randn(9, 12), torch.randn(9, 3)

    def loss() -> torch.Tensor:
        return nn.functional.mse_loss(model(x), y)

    gradients, count = base_weight_gradients(model, layers, (loss() for _ in range(1)))
    singular = {name: torch.linalg.svdvals(g.double()) for name, g in gradients.items()}
    start_from_gradients(layers, gradients)
    loss().backward()
    for name, layer in layers.items():
        expected = (layer.scale(torch.float64) * singular[name][:3]).float()
        torch.testing.assert_close(layer.lora_E.grad.view(-1), expected, rtol=1e-4, atol=1e-6, msg=name)
    assert count == 1


def test_base_weight_gradients_equal_autograd_on_a_trainable_copy_and_leave_nothing_behind():
    model = tiny_bert_classifier(seed=0).eval()
    layers = inject_adapters(model, BERT_TARGETS, r=4, adapter_init="gradient_svd", trainable_modules=["classifier"])
    batches = [make_batch(seed=s, labels=True) for s in (1, 2, 3)]
    oracle = copy.deepcopy(model)
    oracle.requires_grad_(False)
    weights = {name: oracle.get_submodule(name).base_layer.weight for name in layers}
    for w in weights.values():
        w.requires_grad_(True)
    for batch in batches:
        oracle(**batch).loss.backward()  # gradients summed over the three batches
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    # A generator: each loss is made after the function turned the base weights' gradients on.
    gradients, count = base_weight_gradients(model, layers, (model(**b).loss for b in batches), loss_scale=256.0)
    assert count == 3 and gradients.keys() == layers.keys()
    for name, w in weights.items():
        torch.testing.assert_close(gradients[name], w.grad / 3, rtol=1e-5, atol=1e-7, msg=name)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # base frozen again
    assert all(p.grad is None for p in model.parameters())  # the first optimizer step sees none of this


def test_base_weight_gradients_refuse_no_batches_and_nonfinite_gradients():
    model = nn.Sequential(nn.Linear(6, 6))
    layers = inject_adapters(model, ["0"], r=2, adapter_init="gradient_svd")
    with pytest.raises(ValueError, match="got no batch to take the gradient of"):
        base_weight_gradients(model, layers, iter(()))
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match=r"gradient of 0's base weight is inf/NaN over the first 1 batches"):
        base_weight_gradients(model, layers, (model(x).sum() * float("nan") for _ in range(1)))
    assert not layers["0"].base_layer.weight.requires_grad and layers["0"].base_layer.weight.grad is None


def test_generated_losses_skip_none_and_fetch_no_batch_beyond_the_limit():
    fetched = []

    def batches():
        for i in range(10):
            fetched.append(i)
            yield i

    losses = list(generated_losses(batches(), lambda b, i: None if b == 1 else torch.tensor(float(b)), 3))
    assert [float(v) for v in losses] == [0.0, 2.0, 3.0]  # batch 1's step was skipped
    assert fetched == [0, 1, 2, 3]  # the limit is reached on batch 3; batch 4 is never loaded


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: SVDLinear(nn.Linear(4, 6), r=5, lora_alpha=8, adapter_init="gradient_svd"),
         r"takes r=5 singular vectors of a 6 x 4 gradient, which has at most 4; lower init_r"),
        (lambda: AdaLoRAConfig(adapter_init="gradient_svd", gradient_init_batches=0),
         r"gradient_init_batches must be an integer >= 1, got 0"),
        (lambda: AdaLoRAConfig(gradient_init_batches=2.5), r"gradient_init_batches must be an integer >= 1, got 2.5"),
    ],
)
def test_impossible_gradient_starts_are_refused_in_one_line(build, message):
    with pytest.raises(ConfigError, match=message) as info:
        build()
    assert "\n" not in str(info.value)
