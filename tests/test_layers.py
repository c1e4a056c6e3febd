"""Adapter layers and injection: exact step-0 equality, merge, Conv1D, errors that name what exists."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.pytorch_utils import Conv1D

from adalora_pl import LoRALinear, SVDLinear, find_adapters, inject_adapters
from adalora_pl.injection import TARGET_MODULE_PRESETS
from tests.helpers import BERT_TARGETS, tiny_bert_classifier


def tiny_models():
    torch.manual_seed(0)
    yield "bert", tiny_bert_classifier(), {"input_ids": torch.randint(0, 100, (2, 7))}
    deberta = DebertaV2ForSequenceClassification(DebertaV2Config(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, relative_attention=True, position_buckets=8, pos_att_type=["p2c", "c2p"],
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
    )).eval()
    yield "deberta-v2", deberta, {"input_ids": torch.randint(0, 100, (2, 7))}
    bart = BartForConditionalGeneration(BartConfig(
        vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )).eval()
    yield "bart", bart, {"input_ids": torch.randint(3, 100, (2, 7)), "decoder_input_ids": torch.randint(3, 100, (2, 5))}
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )).eval()
    yield "llama", llama, {"input_ids": torch.randint(0, 100, (2, 7))}
    gpt2 = GPT2LMHeadModel(GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0,
    )).eval()
    yield "gpt2", gpt2, {"input_ids": torch.randint(0, 100, (2, 7))}


@pytest.mark.parametrize("method", ["adalora", "lora"])
@pytest.mark.parametrize("case", list(tiny_models()), ids=lambda c: c[0])
def test_adapted_model_equals_base_at_step_zero(case, method):
    model_type, base, inputs = case
    adapted = copy.deepcopy(base)
    adapters = inject_adapters(adapted, TARGET_MODULE_PRESETS[model_type], method=method, r=4)
    assert len(adapters) > 0
    with torch.no_grad():
        expected = base(**inputs).logits
        got = adapted(**inputs).logits
    assert torch.equal(expected, got)
    # Base weights frozen, adapters trainable.
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or n.startswith(("classifier", "score", "pooler")) or ".pooler." in n
               or "classification_head" in n or n.startswith("classifier") for n in trainable), trainable
    assert all(f"{name}.lora_A" in trainable for name in adapters)


def test_bert_preset_adapts_six_matrices_per_layer():
    model = tiny_bert_classifier()
    adapters = inject_adapters(model, None, r=2)
    assert len(adapters) == 6 * model.config.num_hidden_layers
    assert "bert.pooler.dense" not in adapters
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "bert.pooler.dense.weight"} <= trainable


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


def test_unknown_target_lists_linear_layers():
    model = tiny_bert_classifier()
    with pytest.raises(ValueError) as err:
        inject_adapters(model, ["query_proj"], r=2)
    message = str(err.value)
    assert "query_proj" in message and "attention.self.query" in message and "intermediate.dense" in message


def test_target_that_is_not_linear():
    model = tiny_bert_classifier()
    with pytest.raises(ValueError, match=r"'attention\.self'.*BertSelfAttention.*not a linear layer"):
        inject_adapters(model, ["attention.self"], r=2)


def test_no_preset_for_unknown_model_type():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no preset of target modules for model_type None"):
        inject_adapters(model, None)


def test_bad_ranks_and_double_injection():
    with pytest.raises(ValueError, match="rank r must be >= 0, got -1"):
        SVDLinear(nn.Linear(2, 2), r=-1, lora_alpha=1)
    with pytest.raises(ValueError, match="LoRA rank r must be > 0, got 0"):
        LoRALinear(nn.Linear(2, 2), r=0, lora_alpha=1)
    model = tiny_bert_classifier()
    inject_adapters(model, BERT_TARGETS, r=2)
    assert len(find_adapters(model)) == 12
    with pytest.raises(ValueError, match="already has adapters"):
        inject_adapters(model, BERT_TARGETS, r=2)


def test_target_inside_trainable_module_is_refused():
    model = tiny_bert_classifier()
    with pytest.raises(ValueError, match="lies inside trainable module 'bert.pooler'"):
        inject_adapters(model, ["dense"], r=2, trainable_modules=["pooler"])


# ------------------------------------------------------------------ the fused residual add of the hot path
def _reference_output(layer, x):
    """The unfused expressions of the reference implementations: PEFT's AdaLoRA (in place) and LoRA."""
    result = layer.base_layer(x)
    if isinstance(layer, SVDLinear):
        result += (x @ (layer.lora_A * layer.lora_E).T @ layer.lora_B.T) * layer.scaling / (layer.ranknum + 1e-5)
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
    from adalora_pl import fused_add

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
    fused_add.FUSE_RESIDUAL_ADD = False
    try:
        out = layer(x)
        assert type(out.grad_fn).__name__ != "_AddScaledIntoBackward"
        assert torch.equal(out, expected)
    finally:
        fused_add.FUSE_RESIDUAL_ADD = True


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


@pytest.mark.parametrize("method", ["adalora", "lora"])
@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_gets_float32_adapters_and_keeps_its_output_dtype(method, base_dtype):
    """Adapters of a bf16/fp16 layer are float32 (PEFT's default); the output is in the base dtype and equals
    the float32 update added once into the base output; autocast_adapter_dtype=False keeps the base dtype."""
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
    expected = (base(x).float() + x.float() @ layer.delta_weight().T).to(base_dtype)
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2)
    kept = cls(nn.Linear(8, 6).to(base_dtype), r=4, lora_alpha=8, autocast_adapter_dtype=False)
    assert {p.dtype for p in kept.adapter_parameters()} == {base_dtype}


def test_restore_adapter_dtype_undoes_a_whole_module_conversion():
    layer = SVDLinear(nn.Linear(8, 6), r=4, lora_alpha=8)
    params = layer.adapter_parameters()
    layer.to(torch.bfloat16)
    assert layer.lora_A.dtype == torch.bfloat16
    assert layer.restore_adapter_dtype() is True
    assert [p.dtype for p in layer.adapter_parameters()] == [torch.float32] * 3
    assert all(a is b for a, b in zip(params, layer.adapter_parameters(), strict=True))  # same objects
    assert layer.ranknum.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    assert layer.restore_adapter_dtype() is False
