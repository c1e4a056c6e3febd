"""Adapters on quantized bases (docs/method.md §11): bitsandbytes 4-bit (nf4, fp4, nf4 with double quantization),
bitsandbytes int8 and torchao int8 weight-only, loaded through transformers as a user loads a QLoRA base.

What is checked: the dequantization is what the quantized forward multiplies with (bitwise for 4-bit), and within half
a quantization step of the original weight; adapters at init change no logit (bitwise); training moves only the
adapters, leaves every quantized base tensor bit-identical and reaches the budget; what cannot be adapted is refused
by type; a missing bitsandbytes / torchao is one line naming the extra.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from adalora_pl import quantized
from adalora_pl.errors import ConfigError
from adalora_pl.injection import find_adapters, inject_adapters
from adalora_pl.layers import SVDLinear
from tests.builders import (
    LLAMA_TARGETS,
    QUANTIZED_BASES,
    llama_batch,
    load_quantized,
    save_tiny_llama,
    train_adalora_steps,
)

pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")
pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:MatMul8bitLt. inputs will be cast")]

KINDS = list(QUANTIZED_BASES)
U32 = 2.0 ** -24  # unit roundoff of float32


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """The unquantized tiny Llama, saved once; every test loads it quantized."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def load(base_dir, kind_id: str, **options):
    kind, double_quant = QUANTIZED_BASES[kind_id]
    return load_quantized(base_dir, kind, double_quant=double_quant, **options)


def quantized_layers(model) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if quantized.is_quantized(m)}


def base_state(model) -> dict[str, torch.Tensor]:
    """Every tensor of ``model`` that is not an adapter's own, as plain tensors (a torchao weight by its inner tensors,
    a bitsandbytes 4-bit weight with its quantization state, as their state dicts write them)."""
    out = {}
    for key, value in model.state_dict().items():
        if any(part in key for part in (".lora_", ".ranknum", ".rank_mask")):
            continue
        if type(value) not in (torch.Tensor, nn.Parameter):  # a tensor subclass: compare what it is made of
            names, _ = value.__tensor_flatten__()
            for name in names:
                out[f"{key}.{name}"] = getattr(value, name).detach().clone()
        else:
            out[key] = value.detach().clone()
    return out


# ---------------------------------------------------------------------------------------- detection, dequantization
@pytest.mark.parametrize("kind_id", KINDS)
def test_kind_features_and_dequantization_within_a_quantization_step(kind_id, base_dir):
    """``dequantized_weight`` is the float32 (out, in) weight, and the original weight lies within one step of the
    quantization grid of it. Absmax quantization scales w by its block's (row's) scale and stores one of the grid
    values around it: int8 (bitsandbytes and torchao) rounds to the nearest, so ``|w - Wd| <= scale / 127 / 2``
    (torchao: ``scale / 2``, its scale is the step); bitsandbytes' 4-bit kernels compare with fixed decision
    thresholds that are not exactly the midpoints of the code, so only the neighbouring code values are guaranteed:
    ``|w - Wd| <= scale * max_gap``. Plus float32 rounding of ``w / scale``, of the comparison and of ``code *
    scale``: each at most ``u`` times ``|w|``, ``scale`` or ``|Wd|``, so a slack of ``4u (|w| + scale + |Wd|)``.
    bitsandbytes int8 quantizes the float16 weight: add its rounding, ``2^-11 (|w| + scale)``."""
    from transformers import AutoModelForCausalLM

    kind, double_quant = QUANTIZED_BASES[kind_id]
    model = load(base_dir, kind_id)
    original = AutoModelForCausalLM.from_pretrained(base_dir)
    layers = quantized_layers(model)
    assert len(layers) == 7 * 2 and "lm_head" not in layers  # transformers keeps the head unquantized
    for path, layer in layers.items():
        assert quantized.quantization_kind(layer) == kind
        assert quantized.linear_features(layer) == (layer.in_features, layer.out_features)
        weight = quantized.dequantized_weight(layer)
        assert weight.dtype == torch.float32 and weight.shape == (layer.out_features, layer.in_features)
        w = original.get_submodule(path).weight.detach()
        if kind in ("nf4", "fp4"):
            import bitsandbytes.functional as bnbf

            assert quantized.double_quant(layer) == double_quant
            state = layer.weight.quant_state
            code = state.code.float().sort().values
            max_gap = float((code[1:] - code[:-1]).max())
            # The block scales as the dequantization used them (double quantization: dequantized from 8 bits).
            scales = (bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset) if double_quant \
                else state.absmax
            step = scales.float().repeat_interleave(state.blocksize)[: w.numel()].view_as(w) * max_gap
            if double_quant:  # the scale itself is quantized: w / absmax_q may leave [-1, 1] and clamp
                step = step + (w.abs() - scales.float().repeat_interleave(state.blocksize)[: w.numel()].view_as(w)
                               ).clamp(min=0)
        elif kind == "int8":
            step = layer.state.SCB.float().view(-1, 1) / 127 / 2 if layer.state.SCB is not None else \
                layer.weight.SCB.float().view(-1, 1) / 127 / 2
        else:
            step = layer.weight.scale.float().view(-1, 1) / 2
        step = step.expand_as(w)
        slack = 4 * U32 * (w.abs() + 254 * step + weight.abs())
        if kind == "int8":  # bitsandbytes quantizes int8 from the float16 weight: w and its row scale round first
            slack = slack + 2.0 ** -11 * (w.abs() + 254 * step)  # 254 * step >= scale in every case
        bad = (w - weight).abs() > step + slack
        assert not bool(bad.any()), (path, (w - weight).abs()[bad] - step[bad], w[bad], weight[bad])


@pytest.mark.parametrize("kind_id", ["nf4", "fp4", "nf4-dq"])
def test_4bit_forward_multiplies_by_the_dequantized_weight_bitwise(kind_id, base_dir):
    """bitsandbytes' 4-bit matmul (CPU, and its training path on GPU) dequantizes to the input's dtype and calls
    ``F.linear``: with a float32 compute dtype the forward is ``F.linear(x, dequantized_weight)`` bit for bit, so the
    dequantization is exact, not an approximation of the layer."""
    model = load(base_dir, kind_id)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0))
    for path, layer in quantized_layers(model).items():
        xin = x if layer.in_features == 64 else torch.randn(3, 5, layer.in_features)
        with torch.no_grad():
            assert torch.equal(layer(xin), nn.functional.linear(xin, quantized.dequantized_weight(layer))), path


def test_compute_dtype_plain_dtype_and_description(base_dir):
    bf16 = torch.bfloat16
    nf4 = quantized_layers(load(base_dir, "nf4-dq", compute_dtype=bf16))["model.layers.0.mlp.up_proj"]
    assert quantized.compute_dtype(nf4) == bf16 and quantized.plain_dtype(nf4) == torch.float32
    assert quantized.describe(nf4) == "bitsandbytes Linear4bit (nf4, double quantization, compute torch.bfloat16)"
    ao = quantized_layers(load(base_dir, "torchao_int8", dtype=bf16))["model.layers.0.mlp.up_proj"]
    assert quantized.compute_dtype(ao) == quantized.plain_dtype(ao) == bf16
    int8 = quantized_layers(load(base_dir, "int8"))["model.layers.0.mlp.up_proj"]
    assert quantized.compute_dtype(int8) == torch.float16 and quantized.plain_dtype(int8) is None  # no bias
    plain = nn.Linear(4, 3)
    assert quantized.quantization_kind(plain) is None and not quantized.is_quantized(plain)
    assert torch.equal(quantized.dequantized_weight(plain), plain.weight)


# ---------------------------------------------------------------------------------------- adapters at init
@pytest.mark.parametrize("method", ["adalora", "lora", "prune_lora", "bottleneck"])
@pytest.mark.parametrize("kind_id", KINDS)
def test_adapters_at_init_leave_the_quantized_logits_bitwise(kind_id, method, base_dir):
    """E = 0 (LoRA and its pruned ablation: B = 0; bottleneck: up = 0): the branch adds exact zeros in float32 and the
    sum is rounded once into the base output's dtype, which gives the base output back bit for bit; the base keeps
    running quantized."""
    from adalora_pl.baselines import ADAPTER_CLASSES

    batch = llama_batch()
    base = load(base_dir, kind_id)
    with torch.no_grad():
        expected = base(**batch).logits
    model = load(base_dir, kind_id)
    layer_type = ADAPTER_CLASSES[method]
    targets = ["o_proj", "down_proj"] if method == "bottleneck" else LLAMA_TARGETS
    adapters = inject_adapters(model, targets, method=layer_type, r=4, lora_alpha=8)
    assert len(adapters) == len(targets) * 2
    for adapter in adapters.values():
        assert type(adapter) is layer_type and adapter.quantization == QUANTIZED_BASES[kind_id][0]
        assert quantized.is_quantized(adapter.base_layer)
        assert {p.dtype for p in adapter.adapter_parameters()} == {torch.float32}
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, expected)


def test_half_precision_quantized_base_adds_in_float32_and_rounds_once(base_dir):
    """A bfloat16 model on an nf4 base computing in bfloat16: adapters stay float32 (bfloat16 with
    ``autocast_adapter_dtype=False``), the layer returns bfloat16, and its output is the float32 sum of the base
    output and the update rounded once."""
    bf16 = torch.bfloat16
    model = load(base_dir, "nf4", compute_dtype=bf16, dtype=bf16)
    adapters = inject_adapters(model, LLAMA_TARGETS, r=4, lora_alpha=8)
    layer = adapters["model.layers.0.mlp.down_proj"]
    with torch.no_grad():
        layer.lora_E.normal_(generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, layer.in_features, generator=torch.Generator().manual_seed(1)).to(bf16)
    with torch.no_grad():
        base = layer.base_layer(x)
        update = x.float() @ (layer.lora_A * layer.lora_E).T @ layer.lora_B.T
        expected = (base.float() + update * layer.lora_alpha / (layer.ranknum + 1e-5)).to(bf16)
        got = layer(x)
    assert layer.lora_A.dtype == torch.float32 and got.dtype == bf16
    assert torch.equal(got, expected)
    # Training through the 4-bit output (made inside bitsandbytes' autograd Function) works out of place.
    model.train()
    model(**llama_batch()).loss.backward()
    assert layer.lora_E.grad is not None

    kept = load(base_dir, "nf4", compute_dtype=bf16, dtype=bf16)
    low = inject_adapters(kept, ["q_proj"], r=4, lora_alpha=8, autocast_adapter_dtype=False)
    assert {p.dtype for a in low.values() for p in a.adapter_parameters()} == {bf16}


# ---------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("kind_id", KINDS)
def test_training_moves_only_adapters_keeps_the_quantized_base_and_reaches_the_budget(kind_id, base_dir):
    model = load(base_dir, kind_id)
    adapters = inject_adapters(model, LLAMA_TARGETS, r=4, lora_alpha=8)
    before = base_state(model)
    allocator, losses, grad_names = train_adalora_steps(model, adapters, llama_batch(), steps=5, target_r=2)

    adapter_params = {f"{path}.{name}" for path, a in adapters.items() for name in ("lora_A", "lora_E", "lora_B")}
    assert set(grad_names) == adapter_params  # every adapter factor, nothing else
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in adapter_params)
    after = base_state(model)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"quantized base tensors changed: {changed[:5]}"
    assert all(map(torch.isfinite, map(torch.tensor, losses))) and losses[-1] < losses[0]
    # The budget: target_r per layer on average, pruned triplets exactly zero, the masks are the pattern.
    assert int(allocator.kept_total()) == 2 * len(adapters)
    for adapter in adapters.values():
        assert torch.all(adapter.lora_E[~adapter.rank_mask] == 0)
    assert sum(a.kept_rank for a in adapters.values()) == 2 * len(adapters)


def test_adapters_keep_bitsandbytes_4bit_off_its_cpu_repacking(base_dir):
    """bitsandbytes repacks a 4-bit weight on its first eval forward on CPUs with AVX512-BF16, rounding the block scales
    to bfloat16 for good; the repacked path passes no gradient to its input. An adapter turns that off for its base
    layer and for the unadapted 4-bit layers too (a repacked one would cut the gradient of every adapter below it), so
    validation leaves the frozen base as it was and training works after it (on other CPUs the flag is off already)."""
    model = load(base_dir, "nf4", cpu_repack=True)
    adapters = inject_adapters(model, ["q_proj", "down_proj"], r=4, lora_alpha=8)
    four_bit = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert len(four_bit) == 14 and all(m.support_avx512bf16_for_cpu is False for m in four_bit)
    before = base_state(model)
    with torch.no_grad():
        model(**llama_batch())
    after = base_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in four_bit)
    model.train()
    model(**llama_batch()).loss.backward()  # through the unadapted 4-bit layers above layer 0's q_proj
    assert adapters["model.layers.0.self_attn.q_proj"].lora_E.grad.abs().sum() > 0  # E = 0: A, B get none yet


def test_merge_in_place_on_a_quantized_base_points_to_merge_adapters(base_dir):
    model = load(base_dir, "nf4")
    adapter = inject_adapters(model, ["q_proj"], r=4, lora_alpha=8)["model.layers.0.self_attn.q_proj"]
    with pytest.raises(NotImplementedError, match="merge_adapters") as info:
        adapter.merge()
    assert "Linear4bit (nf4" in str(info.value)
    with pytest.raises(NotImplementedError, match="merge_adapters"):
        adapter.unmerge()
    assert not adapter.merged


# ---------------------------------------------------------------------------------------- refusals
class HQQLinear(nn.Module):
    """Stands in for hqq's quantized linear: not an nn.Linear, packed uint8 weights."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.W_q = nn.Parameter(torch.zeros(out_features * in_features // 2, dtype=torch.uint8), requires_grad=False)


class QuantLinear(nn.Module):
    """Stands in for a GPTQ kernel layer (auto-gptq / gptqmodel name it so)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.register_buffer("qweight", torch.zeros(in_features // 8, out_features, dtype=torch.int32))


def int8_weight_linear(in_features: int, out_features: int) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, bias=False)
    layer.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8), requires_grad=False)
    return layer


def dynamic_int8_linear(in_features: int, out_features: int) -> nn.Linear:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    holder = nn.Sequential(nn.Linear(in_features, out_features))
    quantize_(holder, Int8DynamicActivationInt8WeightConfig())
    return holder[0]


@pytest.mark.parametrize("make, named", [
    (HQQLinear, "HQQLinear"),
    (QuantLinear, "QuantLinear"),
    (int8_weight_linear, "torch.int8 weights"),
    (dynamic_int8_linear, "Int8Tensor weight that is not int8 weight-only"),
])
def test_unsupported_quantized_layers_are_refused_with_their_type(make, named, base_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    model.model.layers[1].self_attn.v_proj = make(64, 64)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match="cannot adapt") as info:
        inject_adapters(model, LLAMA_TARGETS, r=4, lora_alpha=8)
    message = str(info.value)
    assert "'model.layers.1.self_attn.v_proj'" in message and named in message and "Supported quantized" in message
    assert not find_adapters(model) and before == {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match=named):
        SVDLinear(model.model.layers[1].self_attn.v_proj, r=2, lora_alpha=4)


def test_a_repacked_4bit_layer_is_refused(base_dir):
    import bitsandbytes.functional as bnbf

    model = load(base_dir, "nf4")
    layer = model.model.layers[0].self_attn.q_proj
    # What bitsandbytes' eval forward does on a CPU with AVX512-BF16, done here whatever the CPU.
    layer.weight.data, layer.weight.quant_state = bnbf._convert_weight_packed_for_cpu(layer.weight.data,
                                                                                      layer.weight.quant_state)
    with pytest.raises(ConfigError, match="repacked for its CPU inference kernel"):
        inject_adapters(model, ["q_proj"], r=2, lora_alpha=4)


@pytest.mark.parametrize("package, kind_id", [("bitsandbytes", "nf4"), ("torchao.quantization", "torchao_int8")])
def test_missing_quantization_package_is_one_line_naming_the_extra(package, kind_id, base_dir, monkeypatch):
    model = load(base_dir, kind_id)
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now raises ImportError
    with pytest.raises(quantized.QuantizationUnavailable) as info:
        inject_adapters(model, LLAMA_TARGETS, r=2, lora_alpha=4)
    message = str(info.value)
    assert "\n" not in message and 'pip install "adalora-pl[quant]"' in message and package in message
    assert isinstance(info.value, ImportError) and isinstance(info.value, ConfigError)
    assert not find_adapters(model)
    # An unquantized model never needs them.
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(base_dir)
    assert len(inject_adapters(plain, LLAMA_TARGETS, r=2, lora_alpha=4)) == 14
