"""`export_lora`: AdaLoRA adapters folded into a standard PEFT LoRA folder, checked against PEFT itself; PEFT
CAUSAL_LM round trips (logits and greedy generation) of both PEFT exports; `cli.py export --format lora`.

The adapted models carry random nonzero A, E, B, a different number of kept triplets per layer (at random
positions, E zero where pruned) and one layer pruned to rank 0.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from adalora_pl.cli import main
from adalora_pl.injection import find_adapters, inject_adapters
from adalora_pl.io import export_lora, export_peft
from adalora_pl.io.lora import lora_factors, pattern_keys
from adalora_pl.layers import SVDLinear
from tests.builders import make_batch, trained_like

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

INIT_R, ALPHA = 6, 12
# Kept ranks given to the adapters in turn after the first one (which is pruned to rank 0); 3 is the most common.
KEPT_CYCLE = (6, 3, 2, 3, 5, 1, 3, 4)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]  # GPT-2's Conv1D layers: weights stored (in, out), fan_in_fan_out
ATOL = 1e-5


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return GPT2LMHeadModel(config).eval()


CAUSAL_LMS = {"llama": (tiny_llama, LLAMA_TARGETS), "gpt2": (tiny_gpt2, GPT2_TARGETS)}


@torch.no_grad()
def randomize(adapters: dict, seed: int = 1) -> dict[str, int]:
    """Random A, E, B and a rank mask per adapter (E zero where pruned); returns the kept rank by path."""
    g = torch.Generator().manual_seed(seed)
    kept = {}
    for i, (path, adapter) in enumerate(adapters.items()):
        adapter.lora_A.normal_(0.0, 0.1, generator=g)
        adapter.lora_B.normal_(0.0, 0.1, generator=g)
        adapter.lora_E.normal_(0.0, 1.0, generator=g)
        k = 0 if i == 0 else KEPT_CYCLE[(i - 1) % len(KEPT_CYCLE)]
        mask = torch.zeros(adapter.r, dtype=torch.bool)
        mask[torch.randperm(adapter.r, generator=g)[:k]] = True
        adapter.rank_mask.copy_(mask)
        adapter.lora_E.masked_fill_(~mask.view(-1, 1), 0.0)
        kept[path] = k
    return kept


def adapted(arch: str):
    """(fresh base, adapted copy, kept rank by path) of a tiny causal LM."""
    build, targets = CAUSAL_LMS[arch]
    base = build()
    model = copy.deepcopy(base)
    kept = randomize(inject_adapters(model, targets, r=INIT_R, lora_alpha=ALPHA))
    return base, model.eval(), kept


def input_ids(seed: int = 3) -> torch.Tensor:
    return torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def lm_logits(model, ids=None) -> torch.Tensor:
    return model.eval()(input_ids=input_ids() if ids is None else ids).logits


def load_peft(base, folder):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()


def lora_layers(peft_model) -> dict:
    """PEFT's LoRA layers by the module path of the wrapped model (ours' naming)."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {n.removeprefix(prefix): m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def check_ranks(peft_model, model, kept: dict[str, int]) -> None:
    """PEFT's layers have exactly the kept ranks with scaling 1; rank-0 layers stay plain."""
    layers = lora_layers(peft_model)
    assert sorted(layers) == sorted(p for p, k in kept.items() if k > 0)
    for path, adapter in find_adapters(model).items():
        if kept[path] == 0:
            plain = peft_model.base_model.model.get_submodule(path)
            assert type(plain) is type(adapter.base_layer), path  # no LoRA on a fully pruned layer
            continue
        layer = layers[path]
        assert layer.lora_A["default"].weight.shape == (kept[path], adapter.in_features), path
        assert layer.lora_B["default"].weight.shape == (adapter.out_features, kept[path]), path
        assert layer.r["default"] == kept[path] and layer.scaling["default"] == 1.0, path


# ---------------------------------------------------------------------------------------- the LoRA format
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_export_lora_loads_in_peft_as_lora_with_kept_ranks_and_same_logits(arch, tmp_path):
    from peft import LoraConfig, PeftModelForCausalLM, PeftType

    base, model, kept = adapted(arch)
    ours = lm_logits(model)
    assert max_diff(ours, lm_logits(base)) > 1e-2, "the adapters should change the outputs"
    export_lora(model, tmp_path, base_model_name_or_path=f"tiny-{arch}")

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["use_rslora"], config["init_lora_weights"]) == (3, 3, False, True)
    pruned = [p for p, k in kept.items() if k == 0]
    assert len(pruned) == 1 and config["target_modules"] == [p for p, k in kept.items() if k > 0]
    assert config["rank_pattern"] == config["alpha_pattern"] == {p: k for p, k in kept.items() if k not in (0, 3)}
    assert config["fan_in_fan_out"] is (arch == "gpt2")
    assert LoraConfig.from_pretrained(str(tmp_path)).rank_pattern == config["rank_pattern"]  # PEFT reads it
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    expected_keys = [f"base_model.model.{p}.lora_{x}.weight" for p, k in kept.items() if k for x in "AB"]
    assert sorted(tensors) == sorted(expected_keys)

    peft_model = load_peft(base, tmp_path)
    assert isinstance(peft_model, PeftModelForCausalLM)
    assert peft_model.peft_config["default"].peft_type == PeftType.LORA
    check_ranks(peft_model, model, kept)
    if arch == "gpt2":
        assert all(layer.fan_in_fan_out for layer in lora_layers(peft_model).values())
    torch.testing.assert_close(lm_logits(peft_model), ours, rtol=0, atol=ATOL)


def test_lora_factors_reproduce_delta_weight_and_skip_pruned_triplets():
    _, model, kept = adapted("llama")
    for path, adapter in find_adapters(model).items():
        lora_a, lora_b = lora_factors(adapter)
        assert lora_a.shape == (kept[path], adapter.in_features) and lora_b.shape == (adapter.out_features, kept[path])
        torch.testing.assert_close(lora_b @ lora_a, adapter.delta_weight(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["bert", "bart"])
def test_export_lora_of_a_classifier_saves_the_trained_head(arch, tmp_path):
    from peft import PeftModelForSequenceClassification

    base, model, _, heads = trained_like(arch)  # INIT_R 4, first layer pruned to rank 0, heads perturbed
    kept = {p: a.kept_rank for p, a in find_adapters(model).items()}
    export_lora(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["peft_type"] == "LORA"
    trained_heads = sorted({n.rpartition(".")[0] for n, p in model.named_parameters()
                            if p.requires_grad and "lora_" not in n})
    assert sorted(config["modules_to_save"]) == trained_heads
    assert trained_heads and all(any(head in h.split(".") for head in heads) for h in trained_heads)

    peft_model = load_peft(base, tmp_path)
    assert isinstance(peft_model, PeftModelForSequenceClassification)
    check_ranks(peft_model, model, kept)
    batch = make_batch()
    with torch.no_grad():
        got, expected, before = peft_model(**batch).logits, model(**batch).logits, base(**batch).logits
    assert max_diff(expected, before) > 1e-3
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)


class Nested(nn.Module):
    """``block.proj`` is also the end of ``inner.block.proj``: a plain pattern key would match both."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.inner = nn.Module()
        self.inner.block = Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.block.proj(torch.tanh(self.block.proj(x)))


def test_pattern_keys_that_are_suffixes_of_other_modules_are_anchored(tmp_path):
    from peft.utils.other import get_pattern_key

    # PEFT's lookup takes the first key whose pattern matches the end of the name: "block.proj" would give its
    # rank to "inner.block.proj" too.
    assert get_pattern_key(["block.proj", "inner.block.proj"], "inner.block.proj") == "block.proj"
    torch.manual_seed(0)
    base = Nested()
    model = copy.deepcopy(base)
    adapters = inject_adapters(model, ["block.proj"], r=4, lora_alpha=8, trainable_modules=[])
    assert sorted(adapters) == ["block.proj", "inner.block.proj"]
    randomize(adapters)
    with torch.no_grad():
        for adapter, k in zip(adapters.values(), (2, 4), strict=True):
            adapter.lora_E.normal_()
            adapter.rank_mask.copy_(torch.arange(4) < k)
            adapter.lora_E.masked_fill_(~adapter.rank_mask.view(-1, 1), 0.0)
    export_lora(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    # The tie between ranks 2 and 4 goes to the larger one; the other layer is anchored at the start of the name.
    assert config["r"] == 4 and config["rank_pattern"] == {"^block\\.proj": 2}
    assert config["target_modules"] == "^(?:block\\.proj|inner\\.block\\.proj)$"
    assert get_pattern_key(list(config["rank_pattern"]), "inner.block.proj") == "inner.block.proj"  # no match
    assert pattern_keys(["inner.block.proj"], ["block.proj", "inner.block.proj"]) == {
        "inner.block.proj": "inner.block.proj"}  # a longer path matches nothing else: stays plain

    peft_model = load_peft(base, tmp_path)
    layers = lora_layers(peft_model)
    assert {p: layer.r["default"] for p, layer in layers.items()} == {"block.proj": 2, "inner.block.proj": 4}
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), model(x), rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------------- CAUSAL_LM generation
# PEFT checks AdaLoRA's "<path>.lora_E" rank_pattern keys with LoRA's per-module rule and warns (see test_export.py)
@pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match")
@pytest.mark.parametrize("export", ["peft", "lora"])
def test_causal_lm_exports_generate_the_same_tokens_in_peft(export, tmp_path):
    from peft import PeftModelForCausalLM, PeftType

    base, model, _ = adapted("llama")
    if export == "peft":
        export_peft(model, tmp_path, base_model_name_or_path="tiny-llama")
    else:
        export_lora(model, tmp_path, base_model_name_or_path="tiny-llama")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    peft_model = load_peft(base, tmp_path)
    assert isinstance(peft_model, PeftModelForCausalLM)
    assert peft_model.peft_config["default"].peft_type == (PeftType.ADALORA if export == "peft" else PeftType.LORA)
    torch.testing.assert_close(lm_logits(peft_model), lm_logits(model), rtol=0, atol=ATOL)

    ids = input_ids()
    kwargs = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 12, "do_sample": False}
    with torch.no_grad():
        ours = model.generate(input_ids=ids, **kwargs)
        theirs = peft_model.generate(input_ids=ids, **kwargs)
        plain = base.generate(input_ids=ids, **kwargs)
    assert ours.shape == (2, ids.shape[1] + 12)
    assert torch.equal(theirs, ours)
    assert not torch.equal(plain, ours), "the adapters should change the generated tokens"


# ---------------------------------------------------------------------------------------- refusals
def test_revived_pruned_triplet_is_refused_or_zeroed_on_request(tmp_path):
    base, model, kept = adapted("llama")
    path, adapter = next((p, a) for p, a in find_adapters(model).items() if 0 < kept[p] < INIT_R)
    with torch.no_grad():
        adapter.lora_E[~adapter.rank_mask] = 0.5  # pruned triplets that trained back
    revived = lm_logits(model)
    with pytest.raises(ValueError, match=rf"^export_lora: {INIT_R - kept[path]} triplets pruned .* in "
                                         rf"{re.escape(path)} \({INIT_R - kept[path]}\)"):
        export_lora(model, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    assert torch.equal(lm_logits(model), revived)  # the refusal changed nothing

    export_lora(model, tmp_path / "zeroed", zero_masked=True)
    assert not adapter.lora_E[~adapter.rank_mask].any()  # zeroed in the model, so that model and export agree
    zeroed = lm_logits(model)
    assert max_diff(zeroed, revived) > 1e-4
    torch.testing.assert_close(lm_logits(load_peft(base, tmp_path / "zeroed")), zeroed, rtol=0, atol=ATOL)


def lora_baseline(_):
    model = tiny_llama()
    inject_adapters(model, ["q_proj"], method="lora", r=4)
    return model


def merged_one(model):
    find_adapters(model)["model.layers.1.mlp.up_proj"].merge()
    return model


@torch.no_grad()
def all_pruned(model):
    for adapter in find_adapters(model).values():
        adapter.rank_mask.fill_(False)
        adapter.lora_E.zero_()
    return model


def two_dropouts(model):
    find_adapters(model)["model.layers.0.mlp.up_proj"].lora_dropout = nn.Dropout(0.1)
    return model


@pytest.mark.parametrize(("case", "message"), [
    (lambda m: tiny_llama(), "LlamaForCausalLM has no adapters to export"),
    (lora_baseline, "export_lora rewrites AdaLoRA (SVDLinear) adapters; 'model.layers.0.self_attn.q_proj' is a "
                    "LoRALinear"),
    (merged_one, "adapter 'model.layers.1.mlp.up_proj' is merged into its base weight; unmerge it before "
                 "export_lora"),
    (all_pruned, "every adapter of LlamaForCausalLM is pruned to rank 0"),
    (two_dropouts, "a LoRA config holds one lora_dropout; the adapters have [0.0, 0.1]"),
], ids=["no-adapters", "not-svd", "merged", "all-pruned", "two-dropouts"])
def test_export_lora_refusals_write_nothing(case, message, tmp_path):
    _, model, _ = adapted("llama")
    with pytest.raises(ValueError, match=re.escape(message)):
        export_lora(case(model), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_layers_may_differ_in_ranknum_and_alpha(tmp_path):
    # export_peft needs one init_r and one lora_alpha; the LoRA fold absorbs both per layer.
    base, model, kept = adapted("llama")
    adapters = find_adapters(model)
    adapters["model.layers.0.mlp.up_proj"].lora_alpha = 3.0
    adapters["model.layers.1.self_attn.q_proj"].ranknum.fill_(9.0)
    assert isinstance(adapters["model.layers.1.self_attn.q_proj"], SVDLinear)
    with pytest.raises(ValueError, match="one init_r"):
        export_peft(model, tmp_path / "peft")
    export_lora(model, tmp_path / "lora")
    peft_model = load_peft(base, tmp_path / "lora")
    check_ranks(peft_model, model, kept)
    torch.testing.assert_close(lm_logits(peft_model), lm_logits(model), rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------------- the command line
def test_cli_export_format_lora_reproduces_the_trained_logits(tmp_path, trained, tiny_backbone):
    from peft import PeftModel

    module, ckpt, _ = trained
    out = tmp_path / "lora"
    main(["export", "--ckpt_path", str(ckpt), "--format", "lora", "--output", str(out)])
    config = json.loads((out / "adapter_config.json").read_text())
    kept = {p: a.kept_rank for p, a in module.adapters.items()}
    assert (config["peft_type"], config["task_type"], config["base_model_name_or_path"]) == (
        "LORA", "SEQ_CLS", tiny_backbone)
    assert sorted(config["modules_to_save"]) == ["bert.pooler.dense", "classifier"]  # the trained heads
    assert config["target_modules"] == [p for p, k in kept.items() if k > 0]
    assert 0 < len(config["target_modules"]) <= len(kept)

    ids = torch.randint(5, 100, (3, 9), generator=torch.Generator().manual_seed(0))
    base = AutoModelForSequenceClassification.from_pretrained(tiny_backbone, num_labels=2)
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    check_ranks(peft_model, module.model, kept)
    with torch.no_grad():
        got, expected = peft_model(input_ids=ids).logits, module.model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
