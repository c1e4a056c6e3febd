"""Exports of models trained with the opt-in options (docs/method.md §13): rsLoRA scaling and the weight-SVD start,
whose base weight is a residual. Every format must give the model's outputs: the merged model, PEFT's AdaLoRA and
LoRA folders loaded by PEFT onto the ORIGINAL base, our import of the PEFT folder, and our adapter folder."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from adalora_pl import (
    compact_adapters,
    export_lora,
    export_peft,
    import_peft,
    load_adapter,
    merge_adapters,
    save_adapter,
)
from adalora_pl.config import AdaLoRAConfig
from adalora_pl.injection import find_adapters, inject_adapters
from adalora_pl.layers import INITIAL_TENSORS
from tests.builders import ALPHA, BERT_TARGETS, INIT_R, logits, tiny_bert_classifier
from tests.io.test_export import TIGHT, peft_noise

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: Option sets of the SVD adapters: (scaling, adapter_init, compact after training).
CASES = {
    "rslora": ("alpha_over_sqrt_r", "reference", False),
    "weight_svd": ("alpha_over_r", "weight_svd", False),
    "weight_svd_rslora": ("alpha_over_sqrt_r", "weight_svd", False),
    "weight_svd_compacted": ("alpha_over_r", "weight_svd", True),
}


def trained_with(case: str, seed: int = 0):
    """(fresh base, model with SVD adapters of ``case``, its AdaLoRAConfig): adapters moved away from their start,
    random masks (E zero where pruned), the first layer pruned to rank 0, perturbed heads."""
    scaling, init, compact = CASES[case]
    base = tiny_bert_classifier(seed)
    model = copy.deepcopy(base)
    adapters = inject_adapters(model, BERT_TARGETS, r=INIT_R, lora_alpha=ALPHA, trainable_modules=["classifier"],
                               scaling=scaling, adapter_init=init)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for i, adapter in enumerate(adapters.values()):
            for p in (adapter.lora_A, adapter.lora_E, adapter.lora_B):
                p.add_(0.3 * p.abs().mean() * torch.randn(p.shape, generator=g) + 0.01 * torch.randn(p.shape,
                                                                                                     generator=g))
            mask = torch.rand(INIT_R, generator=g) > 0.4
            mask[0] = i % 3 != 2
            mask[:] = False if i == 0 else mask
            adapter.rank_mask.copy_(mask)
            adapter.lora_E.masked_fill_(~mask.view(-1, 1), 0.0)
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_" not in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    if compact:
        compact_adapters(model)
    model.eval()
    assert not torch.allclose(logits(model), logits(base), atol=1e-3), "the adapters should change the outputs"
    config = AdaLoRAConfig(target_modules=BERT_TARGETS, init_r=INIT_R, target_r=2, lora_alpha=ALPHA, total_step=100,
                           tinit=10, tfinal=20, scaling=scaling, adapter_init=init)
    return base, model, config


@pytest.mark.parametrize("case", list(CASES))
def test_merged_model_gives_the_model_outputs(case):
    _, model, _ = trained_with(case)
    expected = logits(model)
    merged = merge_adapters(copy.deepcopy(model))
    assert not find_adapters(merged)
    torch.testing.assert_close(logits(merged), expected, **TIGHT)


@pytest.mark.parametrize("case", list(CASES))
@peft_noise
def test_peft_folder_loaded_by_peft_onto_the_original_base_gives_the_model_outputs(case, tmp_path):
    peft = pytest.importorskip("peft")
    base, model, config = trained_with(case)
    export_peft(model, tmp_path, config=config)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    svd = CASES[case][1] == "weight_svd"
    assert written["init_r"] == (2 * INIT_R if svd else INIT_R)  # the initial triplets ride along, negated
    if case == "rslora":  # PEFT's alpha / (init_r + 1e-5) equals our alpha / sqrt(init_r + 1e-5)
        assert written["lora_alpha"] == pytest.approx(ALPHA * (INIT_R + 1e-5) ** 0.5, rel=1e-12)
    pruned_path = next(iter(find_adapters(model)))
    assert written["rank_pattern"][f"{pruned_path}.lora_E"] == [False] * INIT_R + ([True] * INIT_R if svd else [])
    expected = logits(model)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(logits(peft_model), expected, **TIGHT)
    ours = import_peft(copy.deepcopy(base), tmp_path)  # plain SVD adapters on the original base, same outputs
    torch.testing.assert_close(logits(ours), expected, **TIGHT)


@pytest.mark.parametrize("case", list(CASES))
def test_lora_folder_loaded_by_peft_onto_the_original_base_gives_the_model_outputs(case, tmp_path):
    peft = pytest.importorskip("peft")
    base, model, _ = trained_with(case)
    export_lora(model, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    adapters = find_adapters(model)
    first = next(iter(adapters))  # pruned to rank 0: a weight-SVD layer still gave up its initial triplets
    svd = CASES[case][1] == "weight_svd"
    assert (first in written["target_modules"]) == svd
    if svd:
        assert written["rank_pattern"].get(first, written["r"]) == INIT_R
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(logits(peft_model), logits(model), **TIGHT)


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_folder_reloads_the_model_with_its_residual_base(case, tmp_path):
    base, model, config = trained_with(case)
    save_adapter(model, tmp_path, config={"method": "adalora", **config.to_dict()})
    entry = next(iter(json.loads((tmp_path / "adapter_config.json").read_text())["adapters"].values()))
    assert entry.get("scaling", "alpha_over_r") == CASES[case][0]
    assert entry.get("adapter_init", "reference") == CASES[case][1]
    loaded = load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(loaded), logits(model), **TIGHT)
    for path, adapter in find_adapters(model).items():
        again = find_adapters(loaded)[path]
        assert (again.scaling_rule, again.adapter_init, again.r) == (adapter.scaling_rule, adapter.adapter_init,
                                                                     adapter.r)
        # the residual is rebuilt from the saved initial triplets, by the same arithmetic: the same weight
        assert torch.equal(again.base_layer.weight, adapter.base_layer.weight), path
        for name in (INITIAL_TENSORS if adapter.adapter_init == "weight_svd" else ()):
            assert torch.equal(getattr(again, name), getattr(adapter, name))


def test_default_exports_are_unchanged_by_the_options(tmp_path):
    """A default model's files carry none of the options' fields."""
    base = tiny_bert_classifier()
    model = copy.deepcopy(base)
    inject_adapters(model, ["query"], r=INIT_R, lora_alpha=ALPHA)
    save_adapter(model, tmp_path / "adapter")
    entry = next(iter(json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["adapters"].values()))
    assert "scaling" not in entry and "adapter_init" not in entry
    export_peft(model, tmp_path / "peft")
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (written["init_r"], written["lora_alpha"]) == (INIT_R, ALPHA)


def test_rslora_lora_adapters_export_as_adapter_folder_and_merged(tmp_path):
    base = tiny_bert_classifier()
    model = copy.deepcopy(base)
    adapters = inject_adapters(model, BERT_TARGETS, method="lora", r=4, lora_alpha=ALPHA,
                               scaling="alpha_over_sqrt_r", trainable_modules=["classifier"])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for adapter in adapters.values():
            adapter.lora_B.copy_(0.1 * torch.randn(adapter.lora_B.shape, generator=g))
    expected = logits(model)
    save_adapter(model, tmp_path)
    loaded = load_adapter(copy.deepcopy(base), tmp_path)
    assert all(a.scaling == ALPHA / 2 for a in find_adapters(loaded).values())
    torch.testing.assert_close(logits(loaded), expected, **TIGHT)
    torch.testing.assert_close(logits(merge_adapters(copy.deepcopy(model))), expected, **TIGHT)
