"""Export paths of a trained model: adapter-only checkpoint, PEFT format both ways, merge, compaction.

Every round trip compares logits of tiny BERT and BART classifiers whose adapters carry random nonzero
singular values, a random rank mask, and one layer pruned to rank 0.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import BartConfig, BartForSequenceClassification, BertForSequenceClassification

from adalora_pl.export import (
    compact_adapters,
    count_adapter_parameters,
    export_peft,
    import_peft,
    load_adapter,
    merge_adapters,
    save_adapter,
)
from adalora_pl.injection import find_adapters, inject_adapters
from adalora_pl.layers import SVDLinear
from tests.helpers import BERT_TARGETS, tiny_bert_classifier

BART_TARGETS = ["q_proj", "k_proj", "v_proj", "self_attn.out_proj", "encoder_attn.out_proj", "fc1", "fc2"]
INIT_R, ALPHA = 4, 16
TIGHT = {"rtol": 1e-5, "atol": 1e-6}


# PEFT warnings that are expected here: it checks rank_pattern keys with LoRA's per-module-rank rule (AdaLoRA's
# "<path>.lora_E" keys never match it), and it mistakes the empty tensors of a rank-0 layer for unsaved shards.
def peft_noise(test):
    test = pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match")(test)
    return pytest.mark.filterwarnings("ignore:.*LoRA tensor\\(s\\) have invalid shape")(test)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_bart_classifier(seed: int = 0) -> BartForSequenceClassification:
    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, classifier_dropout=0.0, num_labels=2,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
    )
    return BartForSequenceClassification(config).eval()


ARCHS = {
    "bert": (tiny_bert_classifier, BERT_TARGETS, ["classifier", "pooler"]),
    "bart": (tiny_bart_classifier, BART_TARGETS, ["classification_head"]),
}


def make_batch(seed: int = 7, batch_size: int = 4, seq_len: int = 10, labels: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (batch_size, seq_len), generator=g)
    ids[:, -1] = 2  # BART classifies at the (single) eos token; BERT does not mind
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if labels:
        batch["labels"] = torch.randint(0, 2, (batch_size,), generator=g)
    return batch


@torch.no_grad()
def logits(model, batch=None) -> torch.Tensor:
    model.eval()
    return model(**(batch or make_batch())).logits


def trained_like(arch: str, seed: int = 0):
    """(fresh base, adapted model) with random E, random masks (E zero where pruned), the first layer
    pruned to rank 0, the second fully kept, and perturbed head weights."""
    build, targets, heads = ARCHS[arch]
    base = build(seed)
    model = copy.deepcopy(base)
    adapters = inject_adapters(model, targets, r=INIT_R, lora_alpha=ALPHA, trainable_modules=heads)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for i, adapter in enumerate(adapters.values()):
            adapter.lora_E.copy_(torch.randn(adapter.lora_E.shape, generator=g))
            mask = torch.rand(INIT_R, generator=g) > 0.4
            mask[0] = i % 3 != 2  # make sure some layers lose a leading triplet too
            if i == 0:
                mask[:] = False
            elif i == 1:
                mask[:] = True
            adapter.rank_mask.copy_(mask)
            adapter.lora_E.masked_fill_(~mask.view(-1, 1), 0.0)
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_" not in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.eval()
    assert not torch.allclose(logits(model), logits(base), atol=1e-3), "adapters should change the outputs"
    return base, model, targets, heads


def first_adapter(model) -> tuple[str, SVDLinear]:
    return next(iter(find_adapters(model).items()))


# ---------------------------------------------------------------------------------------- adapter-only
@pytest.mark.parametrize("arch", ["bert", "bart"])
def test_adapter_checkpoint_round_trip(arch, tmp_path):
    base, model, targets, heads = trained_like(arch)
    config = {"method": "adalora", "init_r": INIT_R, "target_r": 2, "lora_alpha": ALPHA, "lora_dropout": 0.0,
              "target_modules": targets, "trainable_modules": heads, "backbone": f"tiny-{arch}"}
    save_adapter(model, tmp_path, config=config)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["method"] == "adalora" and meta["init_r"] == INIT_R and meta["backbone"] == f"tiny-{arch}"
    assert meta["target_modules"] == targets and meta["trainable_modules"] == heads
    assert set(meta["adapters"]) == set(find_adapters(model))
    assert meta["adapters"][first_adapter(model)[0]]["kept_rank"] == 0

    fresh = ARCHS[arch][0](0)
    loaded = load_adapter(fresh, tmp_path)
    assert loaded is fresh
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    for path, ours in find_adapters(model).items():
        theirs = find_adapters(loaded)[path]
        assert torch.equal(theirs.rank_mask, ours.rank_mask) and theirs.ranknum.item() == INIT_R
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}


def test_adapter_checkpoint_of_compacted_lora_and_explicit_heads(tmp_path):
    # Per-layer ranks differ after compaction; ranknum must survive the round trip.
    base, model, _, _ = trained_like("bert")
    compact_adapters(model)
    save_adapter(model, tmp_path / "svd", config={}, head_modules=["classifier", "bert.pooler"])
    loaded = load_adapter(tiny_bert_classifier(0), tmp_path / "svd")
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    assert {p: a.r for p, a in find_adapters(loaded).items()} == {p: a.r for p, a in find_adapters(model).items()}

    lora = copy.deepcopy(base)
    for adapter in inject_adapters(lora, BERT_TARGETS, method="lora", r=2, lora_alpha=8).values():
        torch.nn.init.normal_(adapter.lora_B, std=0.05)
    save_adapter(lora, tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["method"] == "lora"
    torch.testing.assert_close(logits(load_adapter(tiny_bert_classifier(0), tmp_path / "lora")), logits(lora))


def test_load_adapter_errors(tmp_path):
    _, model, _, _ = trained_like("bert")
    save_adapter(model, tmp_path / "ok", config={"init_r": INIT_R})

    with pytest.raises(FileNotFoundError, match="not found"):
        load_adapter(tiny_bert_classifier(0), tmp_path / "nowhere")
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "adapter_config.json").write_text((tmp_path / "ok" / "adapter_config.json").read_text())
    with pytest.raises(FileNotFoundError, match="adapter.safetensors"):
        load_adapter(tiny_bert_classifier(0), tmp_path / "no_weights")

    # Garbage bytes in the tensor file: a ValueError naming the file, and the model left untouched.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((tmp_path / "ok" / "adapter_config.json").read_text())
    (bad / "adapter.safetensors").write_bytes(b"\x00\xff not a tensor file" * 64)
    fresh = tiny_bert_classifier(0)
    with pytest.raises(ValueError, match=r"adapter\.safetensors.*safetensors"):
        load_adapter(fresh, bad)
    assert not find_adapters(fresh)

    # A base model with another hidden size: the message names the tensor and both shapes.
    wider = tiny_bert_classifier(0, hidden_size=48, intermediate_size=96)
    with pytest.raises(ValueError) as info:
        load_adapter(wider, tmp_path / "ok")
    message = str(info.value)
    assert "encoder.layer.0.attention.self.query.lora_A" in message
    assert f"({INIT_R}, 32)" in message and f"({INIT_R}, 48)" in message
    assert not find_adapters(wider)

    # Adapter paths the base model lacks (one layer instead of two).
    shallow = tiny_bert_classifier(0, num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"encoder\.layer\.1\..*does not exist"):
        load_adapter(shallow, tmp_path / "ok")
    assert not find_adapters(shallow)


# ---------------------------------------------------------------------------------------- PEFT format
@pytest.mark.parametrize("arch", ["bert", "bart"])
@peft_noise
def test_export_peft_loads_in_peft_with_same_logits(arch, tmp_path):
    peft = pytest.importorskip("peft")
    base, model, _, _ = trained_like(arch)
    export_peft(model, tmp_path, base_model_name_or_path=f"tiny-{arch}", total_step=100, tinit=10, tfinal=20)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["task_type"] == "SEQ_CLS"
    assert config["init_r"] == INIT_R and config["lora_alpha"] == ALPHA and config["total_step"] == 100
    zero_path, _ = first_adapter(model)
    assert config["rank_pattern"][f"{zero_path}.lora_E"] == [False] * INIT_R
    assert all(k.endswith(".lora_E") for k in config["rank_pattern"])

    peft_model = peft.PeftModel.from_pretrained(ARCHS[arch][0](0), str(tmp_path)).eval()
    torch.testing.assert_close(logits(peft_model), logits(model), **TIGHT)
    # PEFT resized every layer to its kept rank and kept ranknum = init_r (the scaling).
    from tests.helpers import peft_layers

    for path, layer in peft_layers(peft_model).items():
        ours = find_adapters(model)[path]
        assert layer.lora_A["default"].shape[0] == ours.kept_rank
        if ours.kept_rank:
            assert layer.ranknum["default"].item() == INIT_R

    # Compacted layers export the same adapter.
    compact_adapters(model)
    export_peft(model, tmp_path / "compact", total_step=100)
    again = peft.PeftModel.from_pretrained(ARCHS[arch][0](0), str(tmp_path / "compact")).eval()
    torch.testing.assert_close(logits(again), logits(model), **TIGHT)


def test_export_peft_rejects_bad_schedule(tmp_path):
    _, model, _, _ = trained_like("bert")
    with pytest.raises(ValueError, match="total_step"):
        export_peft(model, tmp_path, total_step=30, tinit=10, tfinal=20)


@pytest.mark.parametrize("arch", ["bert", "bart"])
@peft_noise
def test_import_peft_trained_adapter(arch, tmp_path):
    peft = pytest.importorskip("peft")
    build, targets, heads = ARCHS[arch]
    config = peft.AdaLoraConfig(
        init_r=INIT_R, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=5, lora_alpha=ALPHA,
        lora_dropout=0.0, target_modules=targets, modules_to_save=heads, task_type="SEQ_CLS",
    )
    peft_model = peft.get_peft_model(build(0), config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(5):  # warm-up, two cubic steps, the forced final mask, one frozen step
        peft_model(**make_batch(seed=step, labels=True)).loss.backward()
        optimizer.step()
        peft_model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    pattern = peft_model.peft_config["default"].rank_pattern
    assert pattern and not all(all(v) for v in pattern.values()), "training should have pruned something"
    # Prune one more layer to rank 0 by hand, as the allocator would.
    zero_key = sorted(pattern)[0]
    pattern[zero_key] = [False] * INIT_R
    peft_model.base_model.rankallocator.mask_using_rank_pattern(peft_model.base_model.model, pattern)
    peft_model.save_pretrained(str(tmp_path))
    peft_model.eval()

    ours = import_peft(build(0), tmp_path)
    torch.testing.assert_close(logits(ours), logits(peft_model), **TIGHT)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    adapters = find_adapters(ours)
    assert len(adapters) == len(saved)
    for key, flags in saved.items():
        adapter = adapters[key.removesuffix(".lora_E")]
        assert isinstance(adapter, SVDLinear) and adapter.r == INIT_R and adapter.ranknum.item() == INIT_R
        assert adapter.rank_mask.tolist() == flags
        pruned = ~adapter.rank_mask
        assert not adapter.lora_E[pruned].any() and not adapter.lora_A[pruned].any()
        assert not adapter.lora_B[:, pruned].any()
    assert adapters[zero_key.split(".lora_E")[0]].kept_rank == 0
    head_params = [n for n, p in ours.named_parameters() if p.requires_grad and "lora_" not in n]
    assert head_params and all(any(n.startswith(h) or f".{h}" in n for h in heads) for n in head_params)


# ---------------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("arch", ["bert", "bart"])
def test_merge_gives_plain_model_with_same_logits(arch, tmp_path):
    _, model, _, _ = trained_like(arch)
    expected = logits(model)
    merged = merge_adapters(model)
    assert not find_adapters(merged)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged), expected, rtol=1e-5, atol=1e-5)

    merged.save_pretrained(tmp_path)
    cls = BertForSequenceClassification if arch == "bert" else BartForSequenceClassification
    # transformers 5 does not write BART's num_labels=2 to config.json (its default is 3): pass it back.
    reloaded = cls.from_pretrained(tmp_path, num_labels=merged.config.num_labels).eval()
    torch.testing.assert_close(logits(reloaded), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- compaction
@pytest.mark.parametrize("arch", ["bert", "bart"])
def test_compaction_keeps_outputs_and_drops_parameters(arch):
    _, model, _, _ = trained_like(arch)
    expected = logits(model)
    before = count_adapter_parameters(model)
    kept = {p: a.kept_rank for p, a in find_adapters(model).items()}
    ranks = compact_adapters(model)
    assert ranks == kept
    assert count_adapter_parameters(model) < before
    torch.testing.assert_close(logits(model), expected, **TIGHT)
    for adapter in find_adapters(model).values():
        assert adapter.lora_A.shape[0] == adapter.lora_E.shape[0] == adapter.lora_B.shape[1] == adapter.r
        assert adapter.rank_mask.all() and adapter.ranknum.item() == INIT_R
    _, zero = first_adapter(model)
    assert zero.r == 0
    x = torch.randn(3, zero.in_features)
    torch.testing.assert_close(zero(x), zero.base_layer(x), rtol=0, atol=0)
    assert not zero.delta_weight().any()


def test_compaction_with_adamw_lets_training_continue():
    _, model, _, _ = trained_like("bert")
    adapters = find_adapters(model)
    masks = {p: a.rank_mask.clone() for p, a in adapters.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def train_step(seed):
        model.train()
        model(**make_batch(seed=seed, labels=True)).loss.backward()
        optimizer.step()
        with torch.no_grad():  # the frozen final phase re-applies the pattern after every step
            for a in find_adapters(model).values():
                a.lora_E.masked_fill_(~a.rank_mask.view(-1, 1), 0.0)
        optimizer.zero_grad()

    train_step(0)
    train_step(1)
    expected = logits(model)
    old_params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    compact_adapters(model, optimizer)
    torch.testing.assert_close(logits(model), expected, **TIGHT)

    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}
    assert old_params != {id(p) for p in params}
    for path, adapter in find_adapters(model).items():
        assert adapter.r == int(masks[path].sum())
        for name in ("lora_A", "lora_E", "lora_B"):
            param = getattr(adapter, name)
            state = optimizer.state[param]
            if param.numel():
                assert state["exp_avg"].shape == param.shape and state["exp_avg_sq"].shape == param.shape

    kept = {p: (a.lora_A.detach().clone(), a.lora_E.detach().clone()) for p, a in find_adapters(model).items()}
    train_step(2)
    changed = [p for p, a in find_adapters(model).items() if a.r and not torch.equal(a.lora_A, kept[p][0])]
    assert len(changed) == sum(1 for a in find_adapters(model).values() if a.r)
    assert any(not torch.equal(a.lora_E, kept[p][1]) for p, a in find_adapters(model).items() if a.r)
    assert torch.isfinite(logits(model)).all()
