"""Merging and exporting adapters trained on quantized bases (docs/method.md §11).

- ``merge_adapters`` dequantizes every quantized layer exactly, adds the update in float32 and rounds once: weights
  bitwise, outputs within a derived bound, an ordinary checkpoint for ``save_pretrained`` / ``from_pretrained``;
- ``export_peft`` loads onto PEFT's own 4-bit AdaLoRA (``SVDLinear4bit``) with bitwise equal logits, ``export_lora``
  as PEFT LoRA on the same 4-bit base within a derived bound;
- ``save_adapter`` / ``load_adapter`` and ``import_peft`` load onto a quantized base, which stays quantized.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from adalora_pl import quantized
from adalora_pl.injection import find_adapters, inject_adapters
from adalora_pl.io import (
    compact_adapters,
    export_lora,
    export_peft,
    import_peft,
    load_adapter,
    merge_adapters,
    save_adapter,
)
from adalora_pl.layers import SVDLinear
from tests.builders import (
    QUANTIZED_BASES,
    llama_batch,
    load_quantized,
    save_tiny_llama,
    train_adalora_steps,
)

pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")
pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore:MatMul8bitLt. inputs will be cast"),
    # PEFT checks AdaLoRA's "<path>.lora_E" rank_pattern keys with LoRA's rule, which never matches them.
    pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match"),
    pytest.mark.filterwarnings("ignore:.is_gradient_checkpointing. is deprecated:FutureWarning"),
]

U32 = 2.0 ** -24  # unit roundoff of float32
TARGETS = ["q_proj", "v_proj", "down_proj"]  # k, o, gate, up stay unadapted (and quantized)
INIT_R, TARGET_R, ALPHA = 4, 2, 8


def gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of an n-term float32 dot product (any order)."""
    return n * U32 / (1 - n * U32)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def load(base_dir, kind_id: str, **options):
    kind, double_quant = QUANTIZED_BASES[kind_id]
    return load_quantized(base_dir, kind, double_quant=double_quant, **options)


def trained(base_dir, kind_id: str, **options):
    """A model on a ``kind_id`` base with AdaLoRA adapters trained for a few steps down to TARGET_R per layer."""
    model = load(base_dir, kind_id, **options)
    adapters = inject_adapters(model, TARGETS, r=INIT_R, lora_alpha=ALPHA)
    train_adalora_steps(model, adapters, llama_batch(), steps=4, target_r=TARGET_R)
    assert any(not a.rank_mask.all() for a in adapters.values()), "the allocator should have pruned"
    return model


def inputs() -> dict:
    return {"input_ids": llama_batch(seed=11)["input_ids"]}  # PEFT's AdaLoRA forward wants no labels at inference


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model.eval()(**inputs()).logits


@torch.no_grad()
def layer_inputs(model, paths) -> dict[str, torch.Tensor]:
    """The input every module at ``paths`` receives in a forward pass of ``model`` on :func:`inputs`."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(p).register_forward_pre_hook(lambda m, args, p=p: seen.setdefault(p, args[0]))
             for p in paths]
    model.eval()(**inputs())
    for hook in hooks:
        hook.remove()
    return seen


def abs_update(adapter: SVDLinear) -> torch.Tensor:
    """``s |B| |A * E|`` (out, in): the update with every term made nonnegative, for error bounds."""
    scale = adapter.lora_alpha / (adapter.ranknum + 1e-5)
    return (adapter.lora_B.abs() @ (adapter.lora_A * adapter.lora_E).abs() * scale).detach()


# ---------------------------------------------------------------------------------------- merge

def peft_on_the_base(base_dir, kind_id, folder, layer_class):
    """PEFT's model of an exported ``folder`` on a fresh quantized base, and its ``layer_class`` layers by our paths."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(load(base_dir, kind_id), folder).eval()
    layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
              if isinstance(m, layer_class)}
    return peft_model, layers

def test_merged_nf4_model_matches_ours_within_the_derived_bound(base_dir, tmp_path):
    """The merged plain model computes what ours computes, up to float32 rounding, on a float32 nf4 base.

    Exact parts: ``dequantized_weight`` is what the 4-bit forward multiplies by (bitwise, tests/quant/
    test_quantized_layers.py), so an unadapted layer's plain replacement gives the quantized layer's output bit for
    bit, and the merged weight of an adapted layer is ``fl(Wd + D)``, one rounding of the exact sum of the
    dequantized weight and our float32 update ``D = delta_weight()``.

    Derivation of the bound for an adapted layer with input x (K = in_features, r = init_r, u = 2^-24,
    ``P = |x| (|Wd| + s |B| |A*E|)^T`` the output computed with every term made nonnegative): by Higham's bound, any
    float32 dot product of n terms is off by at most ``gamma_n`` times the sum of the terms' absolute values, whatever
    the summation order (blocked, FMA).

    - ours: ``fl(fl(x Wd^T) + fl(fl(fl(x (A*E)^T) B^T) alpha / d))``: the base matmul gamma_K, the update gamma_{K+r+3}
      (two matmuls and the scaling), the final add u; in all ``<= (2 gamma_{K+r+3} + u) P`` from the exact x (Wd+D*)^T;
    - merged: ``fl(x fl(Wd + D)^T)`` with D computed by ``delta_weight`` (gamma_{r+3}): the weight rounding u, the
      matmul gamma_K; ``<= (gamma_K + u + gamma_{r+3}) (1 + u) P``.

    So ``|ours - merged| <= 3 gamma_{K+r+4} P`` to first order (the terms above sum to at most (3K + 2r + 8) u). The
    logits, behind norms and attention, are checked loosely (1e-5, the unquantized merge test's tolerance); the
    per-layer bound on the model's own activations is the derived check.
    """
    from transformers import AutoModelForCausalLM

    model = trained(base_dir, "nf4")
    ours = copy.deepcopy(model)
    adapters = find_adapters(ours)
    unadapted = {n: m for n, m in ours.named_modules()
                 if quantized.is_quantized(m) and not any(n.startswith(p + ".") for p in adapters)}
    assert len(unadapted) == 4 * 2
    expected_weights = {p: quantized.dequantized_weight(a.base_layer) + a.delta_weight().detach()
                        for p, a in adapters.items()}

    merged = merge_adapters(model)
    assert not find_adapters(merged)
    assert not any(quantized.is_quantized(m) for m in merged.modules())
    assert all(type(merged.get_submodule(p)) is nn.Linear for p in [*adapters, *unadapted])
    for path, weight in expected_weights.items():
        assert torch.equal(merged.get_submodule(path).weight, weight), path  # one rounding, float32 -> float32
        assert not merged.get_submodule(path).weight.requires_grad
    for path, layer in unadapted.items():
        assert torch.equal(merged.get_submodule(path).weight, quantized.dequantized_weight(layer)), path

    seen = layer_inputs(merged, [*adapters, *unadapted])
    with torch.no_grad():
        for path, layer in unadapted.items():
            assert torch.equal(merged.get_submodule(path)(seen[path]), layer(seen[path])), path
        moved = 0
        for path, adapter in adapters.items():
            x = seen[path]
            got, want = merged.get_submodule(path)(x), adapter(x)
            terms = x.abs() @ (quantized.dequantized_weight(adapter.base_layer).abs() + abs_update(adapter)).T
            bound = 3 * gamma(adapter.in_features + INIT_R + 4) * terms
            assert bool(((got - want).abs() <= bound).all()), path
            moved += not torch.equal(want, adapter.base_layer(x))
        assert moved >= len(adapters) // 2, "the trained updates should matter"
    torch.testing.assert_close(logits(merged), logits(ours), rtol=1e-5, atol=1e-5)

    # An ordinary checkpoint: no quantization config, and transformers reads it back as a plain model.
    assert getattr(merged.config, "quantization_config", None) is None and not merged.is_loaded_in_4bit
    merged.save_pretrained(tmp_path / "merged")
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any(quantized.is_quantized(m) for m in reloaded.modules())
    assert torch.equal(logits(reloaded), logits(merged))


@pytest.mark.parametrize("kind_id, options, dtype", [
    ("fp4", {}, torch.float32),
    ("nf4-dq", {}, torch.float32),
    ("nf4", {"compute_dtype": torch.bfloat16}, torch.float32),  # the model's dtype, not the compute dtype
    ("nf4", {"compute_dtype": torch.bfloat16, "dtype": torch.bfloat16}, torch.bfloat16),
    ("int8", {}, torch.float32),
    ("torchao_int8", {}, torch.float32),
    ("torchao_int8", {"dtype": torch.bfloat16}, torch.bfloat16),
])
def test_merge_writes_the_dequantized_sum_rounded_once_for_every_kind(kind_id, options, dtype, base_dir):
    """Every kind: adapted layers become ``(Wd + D).to(dtype)`` (added in float32, one rounding), unadapted quantized
    layers ``Wd.to(dtype)``, in the dtype of the unquantized model (where activations live), and the merged model
    runs. int8 layers quantize their input too, so the merged model is not their output bit for bit."""
    model = load(base_dir, kind_id, **options)
    adapters = inject_adapters(model, TARGETS, r=INIT_R, lora_alpha=ALPHA)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for adapter in adapters.values():
            adapter.lora_E.copy_(torch.randn(adapter.lora_E.shape, generator=generator))
    expected = {p: (quantized.dequantized_weight(a.base_layer) + a.delta_weight()).to(dtype)
                for p, a in adapters.items()}
    plain = {n: quantized.dequantized_weight(m).to(dtype) for n, m in model.named_modules()
             if quantized.is_quantized(m) and not any(n.startswith(p + ".") for p in adapters)}
    merged = merge_adapters(model)
    for path, weight in {**expected, **plain}.items():
        layer = merged.get_submodule(path)
        assert type(layer) is nn.Linear and layer.weight.dtype == dtype and torch.equal(layer.weight, weight), path
    assert torch.isfinite(logits(merged)).all()


def test_merge_refuses_what_it_cannot_dequantize_and_changes_nothing(base_dir):
    class HQQLinear(nn.Module):  # stands in for a quantized layer of another library, left unadapted
        def __init__(self) -> None:
            super().__init__()
            self.W_q = nn.Parameter(torch.zeros(64, dtype=torch.uint8), requires_grad=False)

    model = load(base_dir, "nf4")
    adapters = inject_adapters(model, TARGETS, r=INIT_R, lora_alpha=ALPHA)
    model.model.layers[1].mlp.up_proj = HQQLinear()
    with pytest.raises(ValueError, match=r"cannot dequantize model\.layers\.1\.mlp\.up_proj \(HQQLinear"):
        merge_adapters(model)
    assert find_adapters(model).keys() == adapters.keys()
    assert all(quantized.is_quantized(a.base_layer) for a in adapters.values())
    assert getattr(model.config, "quantization_config", None) is not None


# ---------------------------------------------------------------------------------------- PEFT
@pytest.mark.parametrize("kind_id", ["nf4", "fp4", "nf4-dq"])
def test_peft_adalora_export_loads_on_peft_4bit_adalora_bitwise(kind_id, base_dir, tmp_path):
    """PEFT (from a transformers 4-bit model, ``is_loaded_in_4bit``) wraps the layers in its ``SVDLinear4bit``, loads
    exactly our kept triplets, and computes our logits bit for bit: both run the same bitsandbytes layer on the same
    input, and PEFT's float32 branch ``result + (x (A*E)^T B^T) * alpha / (ranknum + 1e-5)`` is our operation order.
    Compared with our model compacted to the kept triplets, as PEFT holds them (a matmul over r = 4 with a zero triplet
    and one over the 3 kept ones may round differently)."""
    from peft.tuners.adalora.bnb import SVDLinear4bit

    model = trained(base_dir, kind_id)
    export_peft(model, tmp_path / "peft")
    peft_model, layers = peft_on_the_base(base_dir, kind_id, tmp_path / "peft", SVDLinear4bit)
    ours = find_adapters(model)
    assert layers.keys() == ours.keys()
    for path, layer in layers.items():
        keep = ours[path].rank_mask
        assert torch.equal(layer.lora_A["default"], ours[path].lora_A[keep])
        assert torch.equal(layer.lora_E["default"], ours[path].lora_E[keep])
        assert torch.equal(layer.lora_B["default"], ours[path].lora_B[:, keep])
        assert quantized.quantization_kind(layer.base_layer) == QUANTIZED_BASES[kind_id][0]
    compacted = copy.deepcopy(model)
    compact_adapters(compacted)
    assert torch.equal(logits(peft_model), logits(compacted))
    torch.testing.assert_close(logits(peft_model), logits(model), rtol=0, atol=1e-5)


def test_peft_4bit_adalora_with_bfloat16_compute_rounds_the_adapters_through_bfloat16(base_dir, tmp_path):
    """Measured difference: with a bfloat16 compute dtype PEFT builds the adapters in the 4-bit layer's compute dtype,
    loads the float32 file into them and casts them back to float32, so it holds our values rounded to bfloat16.
    Given those values our model computes PEFT's logits bit for bit (a float32 model: the 4-bit output is float32)."""
    from peft import PeftModel
    from peft.tuners.adalora.bnb import SVDLinear4bit

    options = {"compute_dtype": torch.bfloat16}
    model = trained(base_dir, "nf4", **options)
    export_peft(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(load(base_dir, "nf4", **options), tmp_path / "peft").eval()
    rounded = copy.deepcopy(model)
    compact_adapters(rounded)
    with torch.no_grad():
        for adapter in find_adapters(rounded).values():
            for name in ("lora_A", "lora_E", "lora_B"):
                getattr(adapter, name).copy_(getattr(adapter, name).to(torch.bfloat16).float())
    for name, layer in peft_model.named_modules():
        if isinstance(layer, SVDLinear4bit):
            ours = rounded.get_submodule(name.removeprefix("base_model.model."))
            assert layer.lora_A["default"].dtype == torch.float32
            assert torch.equal(layer.lora_A["default"], ours.lora_A)
    assert torch.equal(logits(peft_model), logits(rounded))
    assert not torch.equal(logits(peft_model), logits(model))


def test_on_a_bfloat16_4bit_model_we_round_once_and_peft_rounds_the_update_first(base_dir, tmp_path):
    """Measured difference, per layer with the same adapter values on both sides: our branch is added in float32 and
    rounded once into the bfloat16 output; PEFT's ``SVDLinear4bit`` rounds the unscaled update to bfloat16 first."""
    from peft import PeftModel

    bf16 = torch.bfloat16
    options = {"compute_dtype": bf16, "dtype": bf16}
    model = load(base_dir, "nf4", **options)
    ours = inject_adapters(model, ["q_proj"], r=INIT_R, lora_alpha=ALPHA)["model.layers.0.self_attn.q_proj"]
    with torch.no_grad():
        ours.lora_E.normal_(generator=torch.Generator().manual_seed(5))
    export_peft(model, tmp_path / "peft")
    theirs = PeftModel.from_pretrained(load(base_dir, "nf4", **options), tmp_path / "peft").eval() \
        .get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    x = torch.randn(4, 7, 64, generator=torch.Generator().manual_seed(6)).to(bf16)
    with torch.no_grad():
        for name in ("lora_A", "lora_E", "lora_B"):  # PEFT's load rounded them through bfloat16: give it ours
            getattr(theirs, name)["default"].copy_(getattr(ours, name))
        base = ours.base_layer(x)
        update = x.float() @ (ours.lora_A * ours.lora_E).T @ ours.lora_B.T
        denom = ours.ranknum + 1e-5
        once = (base.float() + update * ALPHA / denom).to(bf16)
        update_rounded_first = base.clone()
        update_rounded_first += update.to(bf16) * ALPHA / denom
        assert torch.equal(ours(x), once)
        assert torch.equal(theirs(x), update_rounded_first)
        assert not torch.equal(once, update_rounded_first)


@pytest.mark.parametrize("kind_id", ["nf4", "nf4-dq"])
def test_lora_export_loads_as_peft_lora_on_the_4bit_base(kind_id, base_dir, tmp_path):
    """``export_lora`` on a 4-bit base loads as PEFT LoRA (its ``lora.Linear4bit``) on the same 4-bit base.

    Per layer, on the input PEFT's layer receives, both add a branch to the same bitsandbytes output r0. Ours computes
    ``fl(fl(fl(x (A*E)^T) B^T) alpha / d)`` (gamma_{K+r+3} of ``Q = |x| |A*E|^T |B|^T s``), PEFT
    ``fl(fl(x A'^T) B'^T)`` with the fold ``A' = fl(s (A*E))`` (one rounding in float64 -> float32) and scaling 1
    (gamma_{K+r+1} Q); each sum ``fl(r0 + update)`` rounds once more. So ``|ours - PEFT| <= 2 gamma_{K+r+3} Q +
    u (2 |r0| + 2 (1 + gamma) Q)``, with the kept rank k <= r. Logits within 1e-5 (the unquantized LoRA tests'
    tolerance)."""
    from peft.tuners.lora.bnb import Linear4bit as PeftLoraLinear4bit

    model = trained(base_dir, kind_id)
    export_lora(model, tmp_path / "lora")
    peft_model, layers = peft_on_the_base(base_dir, kind_id, tmp_path / "lora", PeftLoraLinear4bit)
    ours = find_adapters(model)
    assert layers.keys() == {p for p, a in ours.items() if a.kept_rank > 0}
    seen = layer_inputs(peft_model, [f"base_model.model.{p}" for p in layers])
    with torch.no_grad():
        for path, layer in layers.items():
            adapter, x = ours[path], seen[f"base_model.model.{path}"]
            r0 = adapter.base_layer(x)
            q = x.abs() @ abs_update(adapter).T
            g = gamma(adapter.in_features + INIT_R + 3)
            bound = 2 * g * q + U32 * (2 * r0.abs() + 2 * (1 + g) * q)
            assert bool(((layer(x) - adapter(x)).abs() <= bound).all()), path
    torch.testing.assert_close(logits(peft_model), logits(model), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------- loading onto quantized bases
@pytest.mark.parametrize("kind_id", list(QUANTIZED_BASES))
def test_adapter_folder_and_peft_folder_load_onto_a_quantized_base(kind_id, base_dir, tmp_path):
    """``load_adapter`` and ``import_peft`` rebuild float32 adapters around the quantized layers of a fresh quantized
    base (which stays quantized, its CPU repacking off), and give our logits bit for bit."""
    model = trained(base_dir, kind_id)
    expected = logits(model)
    save_adapter(model, tmp_path / "ours", config={"init_r": INIT_R, "target_r": TARGET_R})
    export_peft(model, tmp_path / "peft")
    for loaded in (load_adapter(load(base_dir, kind_id, cpu_repack=True), tmp_path / "ours"),
                   import_peft(load(base_dir, kind_id, cpu_repack=True), tmp_path / "peft")):
        adapters = find_adapters(loaded)
        assert adapters.keys() == find_adapters(model).keys()
        for path, adapter in adapters.items():
            assert adapter.quantization == QUANTIZED_BASES[kind_id][0]
            assert {p.dtype for p in adapter.adapter_parameters()} == {torch.float32}
            assert torch.equal(adapter.rank_mask, find_adapters(model)[path].rank_mask)
            assert not getattr(adapter.base_layer, "support_avx512bf16_for_cpu", False)
        assert torch.equal(logits(loaded), expected)
