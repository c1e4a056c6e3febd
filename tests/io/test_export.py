"""Export paths of a trained model: adapter-only checkpoint, PEFT format both ways, merge, compaction.

Every round trip compares logits of tiny BERT and BART classifiers whose adapters carry random nonzero
singular values, a random rank mask, and one layer pruned to rank 0 (``tests.builders.trained_like``).
"""

from __future__ import annotations

import copy
import json
import pickle
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import BartForSequenceClassification, BertForSequenceClassification

from adalora_pl import (
    compact_adapters,
    count_adapter_parameters,
    export_peft,
    import_peft,
    load_adapter,
    merge_adapters,
    save_adapter,
)
from adalora_pl.config import RESUME_FIELDS, AdaLoRAConfig
from adalora_pl.errors import ConfigError
from adalora_pl.injection import find_adapters, inject_adapters
from adalora_pl.layers import SVDLinear
from tests.builders import (
    ALPHA,
    ARCHS,
    BERT_TARGETS,
    INIT_R,
    TouchOnUnpickle,
    logits,
    make_batch,
    peft_layers,
    tiny_bert_classifier,
    trained_like,
)

TIGHT = {"rtol": 1e-5, "atol": 1e-6}


# PEFT warnings that are expected here: it checks rank_pattern keys with LoRA's per-module-rank rule (AdaLoRA's
# "<path>.lora_E" keys never match it), and it mistakes the empty tensors of a rank-0 layer for unsaved shards.
def peft_noise(test):
    test = pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match")(test)
    return pytest.mark.filterwarnings("ignore:.*LoRA tensor\\(s\\) have invalid shape")(test)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    schedule = AdaLoRAConfig(init_r=INIT_R, target_r=2, lora_alpha=ALPHA, total_step=100, tinit=10, tfinal=20)
    export_peft(model, tmp_path, config=schedule, base_model_name_or_path=f"tiny-{arch}")

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["task_type"] == "SEQ_CLS"
    assert config["init_r"] == INIT_R and config["lora_alpha"] == ALPHA
    assert (config["total_step"], config["tinit"], config["tfinal"], config["target_r"]) == (100, 10, 20, 2)
    back = AdaLoRAConfig.from_peft(config)  # back to ours: the same settings, the adapted paths as targets
    assert back.differences(schedule.resolved(100), RESUME_FIELDS) == []
    assert set(back.target_modules) == set(find_adapters(model))
    zero_path, _ = first_adapter(model)
    assert config["rank_pattern"][f"{zero_path}.lora_E"] == [False] * INIT_R
    assert all(k.endswith(".lora_E") for k in config["rank_pattern"])

    peft_model = peft.PeftModel.from_pretrained(ARCHS[arch][0](0), str(tmp_path)).eval()
    torch.testing.assert_close(logits(peft_model), logits(model), **TIGHT)
    # PEFT resized every layer to its kept rank and kept ranknum = init_r (the scaling).
    for path, layer in peft_layers(peft_model).items():
        ours = find_adapters(model)[path]
        assert layer.lora_A["default"].shape[0] == ours.kept_rank
        if ours.kept_rank:
            assert layer.ranknum["default"].item() == INIT_R

    # Compacted layers export the same adapter.
    compact_adapters(model)
    export_peft(model, tmp_path / "compact")
    again = peft.PeftModel.from_pretrained(ARCHS[arch][0](0), str(tmp_path / "compact")).eval()
    torch.testing.assert_close(logits(again), logits(model), **TIGHT)


def test_export_peft_rejects_a_config_that_is_not_the_adapters(tmp_path):
    _, model, _, _ = trained_like("bert")
    message = f"the config does not describe these adapters: init_r=12 \\(adapters: {INIT_R}\\)"
    with pytest.raises(ConfigError, match=message):
        export_peft(model, tmp_path, config=AdaLoRAConfig(lora_alpha=ALPHA))
    with pytest.raises(ConfigError, match="tinit/tfinal are fractions of training: the config needs total_step"):
        export_peft(model, tmp_path, config=AdaLoRAConfig(init_r=INIT_R, target_r=2, lora_alpha=ALPHA, tinit=0.1))
    assert not tmp_path.joinpath("adapter_config.json").exists()


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


# ---------------------------------------------------------------------------------------- masked triplets
def revive_masked_triplets(model) -> dict[str, int]:
    """Give pruned triplets nonzero singular values, as training does between the last mask event and the end
    when tfinal=0 and delta_t > 1. Returns the number revived per layer."""
    revived = {}
    with torch.no_grad():
        for i, (path, adapter) in enumerate(find_adapters(model).items()):
            pruned = (~adapter.rank_mask).nonzero().view(-1)
            if i in (0, 3) and pruned.numel():
                take = pruned[: 2 if i == 0 else 1]
                adapter.lora_E[take] = 0.5
                revived[path] = take.numel()
    return revived


def apply_pattern(model) -> None:
    """What RankAllocator.apply_rank_pattern() does: E = 0 where rank_mask is False."""
    with torch.no_grad():
        for adapter in find_adapters(model).values():
            adapter.lora_E.masked_fill_(~adapter.rank_mask.view(-1, 1), 0.0)


@peft_noise
def test_pruned_triplets_with_nonzero_e_are_refused_or_zeroed_on_request(tmp_path):
    peft = pytest.importorskip("peft")
    _, model, _, _ = trained_like("bert")
    revived = revive_masked_triplets(model)
    assert sum(revived.values()) == 3 and len(revived) == 2
    (path0, n0), (path3, n3) = revived.items()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected_refusal = (
        rf"triplets pruned by rank_mask still have a nonzero lora_E, in {re.escape(path0)} \({n0}\), "
        rf"{re.escape(path3)} \({n3}\); leaving them out would change the model's outputs\. Apply the rank pattern "
        r"first \(RankAllocator\.apply_rank_pattern\(\)"
    )
    with pytest.raises(ValueError, match="compact_adapters: 3 " + expected_refusal):
        compact_adapters(model)
    with pytest.raises(ValueError, match="export_peft: 3 " + expected_refusal):
        export_peft(model, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()), "a refusal must leave the model as it was"

    # zero_masked=True: the model is first made what the allocator would have left, then compacted / exported.
    reference = copy.deepcopy(model)
    apply_pattern(reference)
    expected = logits(reference)
    assert not torch.allclose(logits(model), expected, atol=1e-4), "the revived triplets should matter"
    exported = copy.deepcopy(model)
    export_peft(exported, tmp_path / "zeroed", zero_masked=True)
    torch.testing.assert_close(logits(exported), expected, rtol=0, atol=0)
    peft_model = peft.PeftModel.from_pretrained(tiny_bert_classifier(0), str(tmp_path / "zeroed")).eval()
    torch.testing.assert_close(logits(peft_model), expected, **TIGHT)
    compact_adapters(model, zero_masked=True)
    torch.testing.assert_close(logits(model), expected, **TIGHT)


@peft_noise
def test_compaction_and_export_of_an_applied_pattern_keep_outputs(tmp_path):
    # The fix a user applies after the refusal: apply the pattern, then compaction changes nothing.
    peft = pytest.importorskip("peft")
    _, model, _, _ = trained_like("bert")
    revive_masked_triplets(model)
    apply_pattern(model)
    expected = logits(model)
    export_peft(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(tiny_bert_classifier(0), str(tmp_path)).eval()
    torch.testing.assert_close(logits(peft_model), expected, **TIGHT)
    compact_adapters(model)
    torch.testing.assert_close(logits(model), expected, **TIGHT)


def test_zero_masked_refuses_a_merged_adapter():
    _, model, _, _ = trained_like("bert")
    revived = revive_masked_triplets(model)
    path = next(iter(revived))
    find_adapters(model)[path].merge()
    with pytest.raises(ValueError, match=rf"compact_adapters: adapter '{re.escape(path)}' is merged; unmerge it"):
        compact_adapters(model, zero_masked=True)
    assert find_adapters(model)[path].lora_E.any()


# ---------------------------------------------------------------------------------------- refusals
def write_pickle_bomb(path, marker) -> None:
    path.write_bytes(pickle.dumps({"weights": TouchOnUnpickle(marker)}))


class RootParam(torch.nn.Module):
    """A parameter on the root module next to an adapted linear layer."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))
        self.lin = torch.nn.Linear(4, 4)


def refusal_cases():
    """(name, build the model, export_peft kwargs, expected message) for every refusal of export_peft."""
    def adalora():
        return trained_like("bert")[1]

    def lora():
        model = tiny_bert_classifier(0)
        inject_adapters(model, BERT_TARGETS, method="lora", r=2)
        return model

    def edit(fn):
        def build():
            model = adalora()
            with torch.no_grad():
                fn(list(find_adapters(model).values()))
            return model
        return build

    def root_param():
        model = RootParam()
        model.lin = SVDLinear(model.lin, r=2, lora_alpha=4)
        return model

    return [
        ("no adapters", lambda: tiny_bert_classifier(0), {}, "BertForSequenceClassification has no adapters to export"),
        ("lora", lora, {}, "export_peft writes AdaLoRA (SVDLinear) adapters; these are not: ['bert.encoder.layer.0"),
        ("ranknum", edit(lambda a: a[1].ranknum.fill_(3.0)), {},
         "PEFT has one init_r for all layers; the adapters have ranknum values [3.0, 4.0]"),
        ("fraction", edit(lambda a: [x.ranknum.fill_(2.5) for x in a]), {},
         "ranknum 2.5 is not a positive integer; PEFT cannot reproduce this scaling"),
        ("alpha", edit(lambda a: setattr(a[2], "lora_alpha", 8)), {},
         "PEFT needs one lora_alpha and one lora_dropout; found [8, 16], [0.0]"),
        ("alpha0", edit(lambda a: [setattr(x, "lora_alpha", 0) for x in a]), {},
         "PEFT replaces lora_alpha <= 0 by init_r; cannot export lora_alpha=0"),
        ("schedule", adalora,
         {"config": AdaLoRAConfig(init_r=INIT_R, target_r=2, lora_alpha=ALPHA, tinit=10, tfinal=20).resolved(30)},
         "PEFT's AdaLoraConfig needs total_step > tinit + tfinal: 30 optimizer steps leave no budgeting phase"),
        ("merged", edit(lambda a: a[1].merge()), {},
         "adapter 'bert.encoder.layer.0.attention.self.key' is merged into its base weight; unmerge it before"),
        ("root", root_param, {}, "a trainable parameter sits on the root module; PEFT's modules_to_save cannot hold"),
        ("overlap", adalora, {"head_modules": ["bert.encoder.layer.1.output"]},
         "module 'bert.encoder.layer.1.output' would be a PEFT modules_to_save entry but overlaps adapter "
         "'bert.encoder.layer.1.output.dense'"),
    ]


@pytest.mark.parametrize("case", refusal_cases(), ids=lambda c: c[0])
def test_export_peft_refusals_write_nothing(case, tmp_path):
    _, build, kwargs, message = case
    with pytest.raises(ValueError) as info:
        export_peft(build(), tmp_path / "out", **kwargs)
    assert message in str(info.value)
    assert not (tmp_path / "out").exists()


def copy_folder(source, target, skip=()):
    target.mkdir()
    for f in source.iterdir():
        if f.name not in skip:
            (target / f.name).write_bytes(f.read_bytes())
    return target


def test_import_peft_refusals(peft_folder, tmp_path):
    def refused(folder, error=ValueError):
        fresh = tiny_bert_classifier(0)
        with pytest.raises(error) as info:
            import_peft(fresh, folder)
        assert not find_adapters(fresh), "a refused import must leave the model without adapters"
        return str(info.value)

    assert refused(tmp_path / "nowhere", FileNotFoundError) == f"{tmp_path / 'nowhere'}: PEFT adapter folder not found"
    no_config = copy_folder(peft_folder, tmp_path / "no_config", skip={"adapter_config.json"})
    assert refused(no_config, FileNotFoundError) == f"{no_config / 'adapter_config.json'}: file not found"

    lora = copy_folder(peft_folder, tmp_path / "lora")
    config = json.loads((lora / "adapter_config.json").read_text())
    (lora / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))
    assert refused(lora) == f"{lora / 'adapter_config.json'}: peft_type is 'LORA', import_peft reads ADALORA"

    # Only a pickled adapter_model.bin (PEFT's safe_serialization=False): refused, and never unpickled.
    pickled = copy_folder(peft_folder, tmp_path / "pickled", skip={"adapter_model.safetensors"})
    marker = tmp_path / "unpickled"
    write_pickle_bomb(pickled / "adapter_model.bin", marker)
    message = refused(pickled)
    assert message.startswith(f"{pickled}: no adapter_model.safetensors, only pickled weights (adapter_model.bin); "
                              "import_peft reads safetensors only and never unpickles a file")
    assert not marker.exists()

    garbage = copy_folder(peft_folder, tmp_path / "garbage", skip={"adapter_model.safetensors"})
    (garbage / "adapter_model.safetensors").write_bytes(b"\x00\xff not a tensor file" * 64)
    assert refused(garbage).startswith(f"{garbage / 'adapter_model.safetensors'}: not a readable safetensors file")

    short = copy_folder(peft_folder, tmp_path / "short_pattern")
    config = json.loads((short / "adapter_config.json").read_text())
    key = "bert.encoder.layer.0.attention.self.query.lora_E"
    config["rank_pattern"][key] = config["rank_pattern"][key][:3]
    (short / "adapter_config.json").write_text(json.dumps(config))
    assert refused(short) == (f"{short / 'adapter_config.json'}: rank_pattern of "
                              f"'bert.encoder.layer.0.attention.self.query' has 3 entries, init_r is {INIT_R}")

    # Another base model: a shape mismatch names the tensor and both shapes; a missing layer is named.
    wider = tiny_bert_classifier(0, hidden_size=48, intermediate_size=96)
    shapes = r"has shape \((\d+), 32\) but the base model needs \(\1, 48\)|has shape \(32, (\d+)\) but .+ \(48, \2\)"
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: tensor 'base_model\.model\.bert\.encoder\."
                                         r"[\w.]+\.lora_[AB]' (?:" + shapes + ")"):
        import_peft(wider, peft_folder)
    assert not find_adapters(wider)
    shallow = tiny_bert_classifier(0, num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"adapter module 'bert\.encoder\.layer\.1\.[a-z.]+' does not exist in "
                                         r"BertForSequenceClassification; is this the base model"):
        import_peft(shallow, peft_folder)
    assert not find_adapters(shallow)

    adapted = trained_like("bert")[1]
    with pytest.raises(ValueError, match="BertForSequenceClassification already has adapters; import_peft expects"):
        import_peft(adapted, peft_folder)


def test_load_adapter_refuses_pickles_and_peft_folders(peft_folder, tmp_path):
    _, model, _, _ = trained_like("bert")
    ours = save_adapter(model, tmp_path / "ours")
    pickled = copy_folder(ours, tmp_path / "pickled", skip={"adapter.safetensors"})
    marker = tmp_path / "unpickled"
    write_pickle_bomb(pickled / "adapter.bin", marker)
    fresh = tiny_bert_classifier(0)
    with pytest.raises(ValueError) as info:
        load_adapter(fresh, pickled)
    assert str(info.value).startswith(f"{pickled}: no adapter.safetensors, only pickled weights (adapter.bin); "
                                      "load_adapter reads safetensors only and never unpickles a file")
    assert not marker.exists() and not find_adapters(fresh)

    peft_hint = r"adapter_config\.json: not an adalora-pl adapter config \(a PEFT adapter folder\? use import_peft\)"
    with pytest.raises(ValueError, match=peft_hint):
        load_adapter(tiny_bert_classifier(0), peft_folder)


# ---------------------------------------------------------------------------------------- half precision
@peft_noise
def test_bfloat16_base_with_float32_adapters_merges_exports_imports_and_compacts(tmp_path):
    peft = pytest.importorskip("peft")
    bf16 = torch.bfloat16

    def bf16_base():
        return tiny_bert_classifier(0).to(bf16)

    _, model, _, _ = trained_like("bert", dtype=bf16)
    adapters = find_adapters(model)
    assert all(a.lora_A.dtype == torch.float32 and a.base_layer.weight.dtype == bf16 for a in adapters.values())
    expected = logits(model)
    assert expected.dtype == bf16

    # PEFT format: adapter tensors stay float32 in the file, exactly our values (kept triplets only).
    export_peft(model, tmp_path / "peft")
    stored = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert {t.dtype for k, t in stored.items() if ".lora_" in k} == {torch.float32}
    for path, adapter in adapters.items():
        keep = adapter.rank_mask
        for name, value in (("lora_A", adapter.lora_A[keep]), ("lora_E", adapter.lora_E[keep]),
                            ("lora_B", adapter.lora_B[:, keep])):
            assert torch.equal(stored[f"base_model.model.{path}.{name}"], value), (path, name)

    # PEFT's own loading path, untouched. It rounds the stored float32 values through bfloat16 (it rebuilds the layers
    # in the base dtype to resize them by the rank pattern, loads into them, then upcasts the adapters to float32):
    # what it holds is our values rounded to bfloat16, in float32 tensors. Given those same values, our model must
    # compute bit for bit what PEFT computes from our folder (rank pattern, scaling, ranknum, heads all read by PEFT).
    peft_model = peft.PeftModel.from_pretrained(bf16_base(), str(tmp_path / "peft")).eval()
    assert {layer.lora_E["default"].dtype for layer in peft_layers(peft_model).values()} == {torch.float32}
    rounded = copy.deepcopy(model)
    rounded_adapters = find_adapters(rounded)
    with torch.no_grad():
        for adapter in rounded_adapters.values():
            for name in ("lora_A", "lora_E", "lora_B"):
                getattr(adapter, name).copy_(getattr(adapter, name).to(bf16).float())
    for path, layer in peft_layers(peft_model).items():
        ours, keep = rounded_adapters[path], rounded_adapters[path].rank_mask
        assert torch.equal(layer.lora_A["default"], ours.lora_A[keep]), path
        assert torch.equal(layer.lora_E["default"], ours.lora_E[keep]), path
        assert torch.equal(layer.lora_B["default"], ours.lora_B[:, keep]), path
    torch.testing.assert_close(logits(peft_model), logits(rounded), rtol=0, atol=0)
    imported = import_peft(bf16_base(), tmp_path / "peft")
    for path, ours in find_adapters(imported).items():
        source = adapters[path]
        assert ours.lora_A.dtype == ours.lora_E.dtype == ours.lora_B.dtype == torch.float32
        assert torch.equal(ours.rank_mask, source.rank_mask)
        assert torch.equal(ours.lora_A[ours.rank_mask], source.lora_A[source.rank_mask])
        assert torch.equal(ours.lora_E, source.lora_E)
        assert torch.equal(ours.lora_B[:, ours.rank_mask], source.lora_B[:, source.rank_mask])
    torch.testing.assert_close(logits(imported), expected, rtol=0, atol=0)

    # Merge: the float32 delta is added in float32 and rounded to bfloat16 once, bit for bit PEFT's merge (of the
    # values PEFT holds, so of our rounded copy).
    folded = {p: (a.base_layer.weight.float() + a.delta_weight()).to(bf16) for p, a in adapters.items()}
    merged = merge_adapters(copy.deepcopy(model))
    merged_rounded = merge_adapters(rounded)
    peft_merged = peft_model.merge_and_unload()
    for path, weight in folded.items():
        ours = merged.get_submodule(path).weight
        assert ours.dtype == bf16 and torch.equal(ours, weight), path
        assert torch.equal(merged_rounded.get_submodule(path).weight, peft_merged.get_submodule(path).weight), path

    # Compaction keeps the adapters' own dtype, and the outputs.
    compacted = copy.deepcopy(model)
    compact_adapters(compacted)
    assert {a.lora_B.dtype for a in find_adapters(compacted).values()} == {torch.float32}
    torch.testing.assert_close(logits(compacted), expected, rtol=0, atol=0)

    # Adapter-only checkpoint: float32 adapters come back float32.
    save_adapter(model, tmp_path / "adapter")
    loaded = load_adapter(bf16_base(), tmp_path / "adapter")
    assert {a.lora_A.dtype for a in find_adapters(loaded).values()} == {torch.float32}
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=0)
