"""The opt-in faster-starting options (README, "Faster-starting options"; docs/method.md §13): per-factor learning
rates, rsLoRA scaling, LoRA at a rank pattern an AdaLoRA run found, and the weight-SVD start. Tiny layers and models
only; the exports are tests/io/test_option_exports.py, the resume tests/lightning/test_option_resume.py."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import types

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from adalora_pl import AdaLoRACallback, adapter_param_groups, read_rank_pattern
from adalora_pl.config import RESUME_FIELDS, AdaLoRAConfig
from adalora_pl.errors import ConfigError, MissingFileError
from adalora_pl.injection import count_adapter_parameters, find_adapters, inject_adapters
from adalora_pl.layers import INITIAL_TENSORS, RANKNUM_EPS, LoRALinear, SVDLinear
from adalora_pl.tasks.glue_module import GLUEClassifier
from tests.builders import BERT_TARGETS, logits, make_batch, tiny_bert_classifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def randomised(layer: SVDLinear | LoRALinear, seed: int = 0) -> SVDLinear | LoRALinear:
    """``layer`` with every adapter tensor drawn at random (E and B nonzero: the update is not zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return layer


# ---------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(lr_ratio_b=0), r"lr_ratio_b must be a finite number > 0 \(1 keeps the learning_rate\), got 0"),
        (dict(lr_ratio_b=-2.0), r"lr_ratio_b must be a finite number > 0 .*got -2.0"),
        (dict(lr_ratio_e=float("nan")), r"lr_ratio_e must be a finite number > 0 .*got nan"),
        (dict(lr_ratio_e=float("inf")), r"lr_ratio_e must be a finite number > 0 .*got inf"),
        (dict(lr_ratio_b="4"), r"lr_ratio_b must be a finite number > 0 .*got '4'"),
        (dict(lr_ratio_b=True), r"lr_ratio_b must be a finite number > 0 .*got True"),
        (dict(scaling="sqrt"), r"scaling must be one of \['alpha_over_r', 'alpha_over_sqrt_r'\], got 'sqrt'"),
        (dict(adapter_init="pissa"), r"adapter_init must be one of \[.*'weight_svd', 'gradient_svd'\], got 'pissa'"),
        (dict(rank_pattern=3), r"rank_pattern must be the path of a rank_pattern.json file or None, got 3"),
    ],
)
def test_a_bad_option_value_is_refused_in_one_line_naming_field_and_value(settings, message):
    with pytest.raises(ConfigError, match=message) as info:
        AdaLoRAConfig(**settings)
    assert "\n" not in str(info.value)


def test_defaults_are_the_reference_and_options_round_trip_and_guard_resume():
    default = AdaLoRAConfig()
    assert (default.lr_ratio_b, default.lr_ratio_e, default.scaling, default.adapter_init, default.rank_pattern) == (
        1.0, 1.0, "alpha_over_r", "reference", None)
    options = AdaLoRAConfig(lr_ratio_b=4.0, lr_ratio_e=0.5, scaling="alpha_over_sqrt_r", adapter_init="weight_svd")
    assert AdaLoRAConfig.from_dict(json.loads(json.dumps(options.to_dict()))) == options
    assert {"scaling", "adapter_init", "lr_ratio_b", "lr_ratio_e"} <= set(RESUME_FIELDS)
    run = options.resolved(20)
    with pytest.raises(ConfigError, match=r"scaling 'alpha_over_r' -> 'alpha_over_sqrt_r'"):
        run.check_resume(dataclasses.replace(run, scaling="alpha_over_r").to_dict())
    # a checkpoint from before the options existed holds none of them: it resumes a default run
    old = {k: v for k, v in default.resolved(20).to_dict().items()
           if k not in ("lr_ratio_b", "lr_ratio_e", "scaling", "rank_pattern")}
    default.resolved(20).check_resume(old)


# ---------------------------------------------------------------------------------------- per-factor learning rates
def factor_of(model: nn.Module) -> dict[int, str]:
    return {id(p): name.rpartition(".")[2] for name, p in model.named_parameters()}


def test_param_groups_put_each_factor_at_its_learning_rate():
    model = tiny_bert_classifier()
    inject_adapters(model, BERT_TARGETS, r=2, trainable_modules=["classifier"])
    names = factor_of(model)
    adapter_params = [p for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n]

    (single,) = adapter_param_groups(model, 1e-3)  # both ratios 1: one group, the reference's optimizer
    assert single["lr"] == 1e-3 and [id(p) for p in single["params"]] == [id(p) for p in adapter_params]

    groups = adapter_param_groups(model, 1e-3, lr_ratio_b=4.0, lr_ratio_e=0.5)
    assert [g["lr"] for g in groups] == [1e-3, 4e-3, 5e-4]
    assert [{names[id(p)] for p in g["params"]} for g in groups] == [{"lora_A"}, {"lora_B"}, {"lora_E"}]
    assert sum(len(g["params"]) for g in groups) == len(adapter_params) == 3 * 12  # heads are not included

    lora = tiny_bert_classifier()
    inject_adapters(lora, ["query", "value"], method="lora", r=2)
    assert [g["lr"] for g in adapter_param_groups(lora, 1e-3, lr_ratio_b=16)] == [1e-3, 1.6e-2]
    with pytest.raises(ConfigError, match=r"lr_ratio_e=2 scales the learning rate of lora_E \(SVD adapters\)"):
        adapter_param_groups(lora, 1e-3, lr_ratio_e=2)
    with pytest.raises(ConfigError, match=r"lr_ratio_b must be a finite number > 0 .*got 0"):
        adapter_param_groups(lora, 1e-3, lr_ratio_b=0)


@pytest.fixture(scope="module")
def glue(tiny_backbone):
    """GLUEClassifier on the tiny backbone, with a fixed total (configure_optimizers without a Trainer)."""
    return lambda **kwargs: GLUEClassifier(backbone=tiny_backbone, task_name="cola", total_step=10, **kwargs)


def test_module_optimizer_splits_factors_only_when_a_ratio_differs(glue):
    default = glue(init_r=2, target_r=1)
    optimizer = default.configure_optimizers()["optimizer"]
    adapter_ids = {id(p) for m in default.adapters.values() for p in m.adapter_parameters()}
    # as before the option: [adapters, heads], the adapters in parameter order
    assert [g["lr"] for g in optimizer.param_groups] == [5e-4, 5e-4]
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [
        id(p) for p in default.parameters() if id(p) in adapter_ids]

    module = glue(init_r=2, target_r=1, learning_rate=1e-3, head_learning_rate=2e-3, lr_ratio_b=8, lr_ratio_e=2)
    groups = module.configure_optimizers()["optimizer"].param_groups
    names = factor_of(module)
    assert [g["lr"] for g in groups] == [1e-3, 8e-3, 2e-3, 2e-3]
    assert [{names[id(p)] for p in g["params"]} for g in groups[:3]] == [{"lora_A"}, {"lora_B"}, {"lora_E"}]
    assert not {id(p) for p in groups[3]["params"]} & adapter_ids  # the head keeps its own group

    lora = glue(method="lora", init_r=2, lr_ratio_b=16)
    assert [g["lr"] for g in lora.configure_optimizers()["optimizer"].param_groups] == [5e-4, 8e-3, 5e-4]


@pytest.mark.parametrize("method,settings,message", [
    ("lora", dict(lr_ratio_e=2.0), r"lr_ratio_e=2.0 scales the learning rate of the singular values lora_E, which "
                                   r"method='lora' does not have"),
    ("houlsby", dict(lr_ratio_b=4.0), r"lr_ratio_b=4.0 scales the learning rate of lora_B, which method='houlsby'"),
    ("full", dict(scaling="alpha_over_sqrt_r"), r"scaling='alpha_over_sqrt_r' applies to LoRA-style adapters"),
    ("adalora", dict(rank_pattern="ranks.json"), r"rank_pattern='ranks.json' .* applies to method='lora', not to "
                                                 r"method='adalora'"),
    ("lora", dict(adapter_init="weight_svd"), r"adapter_init='weight_svd' applies to SVD adapters"),
    ("lora", dict(adapter_init="gradient_svd"), r"adapter_init='gradient_svd' applies to SVD adapters"),
    ("adalora", dict(adapter_init="gradient_svd", quantization="nf4"),
     r"adapter_init='gradient_svd' needs the loss gradient of each adapted base weight, which a quantized base "
     r"\(quantization='nf4'\) does not have"),
])
def test_module_refuses_an_option_its_method_has_nothing_for(tiny_backbone, method, settings, message):
    with pytest.raises(ConfigError, match=message):
        GLUEClassifier(backbone=tiny_backbone, method=method, **settings)


# ---------------------------------------------------------------------------------------- rsLoRA scaling
@pytest.mark.parametrize("r", [1, 4, 12])
def test_rslora_changes_the_svd_update_by_sqrt_r_over_r(r):
    torch.manual_seed(0)
    base = nn.Linear(16, 24)
    default = randomised(SVDLinear(base, r=r, lora_alpha=8))
    rs = SVDLinear(base, r=r, lora_alpha=8, scaling="alpha_over_sqrt_r")
    rs.load_state_dict(default.state_dict())
    x = torch.randn(5, 16)
    update, rs_update = default(x) - base(x), rs(x) - base(x)
    # lora_alpha / sqrt(ranknum + 1e-5) against lora_alpha / (ranknum + 1e-5): a factor sqrt(ranknum + 1e-5) exactly,
    # i.e. sqrt(r) / r of the rsLoRA update is the default one (1e-5 of the denominators is below 1e-6 relative)
    torch.testing.assert_close(rs_update, update * math.sqrt(r + RANKNUM_EPS), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rs_update * math.sqrt(r) / r, update, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rs.delta_weight(), default.delta_weight() * math.sqrt(r + RANKNUM_EPS),
                               rtol=1e-5, atol=1e-6)
    assert float(rs.scale()) == pytest.approx(8 / math.sqrt(r + RANKNUM_EPS), rel=1e-12)


def test_rslora_changes_the_lora_update_by_sqrt_r_over_r_and_defaults_are_unchanged():
    torch.manual_seed(0)
    base = nn.Linear(16, 24)
    default = randomised(LoRALinear(base, r=4, lora_alpha=8))
    rs = LoRALinear(base, r=4, lora_alpha=8, scaling="alpha_over_sqrt_r")
    rs.load_state_dict(default.state_dict())
    assert (default.scaling, rs.scaling) == (2.0, 4.0)  # 8 / 4 and 8 / sqrt(4), PEFT's use_rslora
    x = torch.randn(5, 16)
    torch.testing.assert_close((rs(x) - base(x)) * math.sqrt(4) / 4, default(x) - base(x), rtol=1e-6, atol=1e-6)
    # the default layer computes exactly the reference's expression (bitwise)
    svd = randomised(SVDLinear(base, r=3, lora_alpha=8), seed=1)
    expected = base(x) + (x @ (svd.lora_A * svd.lora_E).T @ svd.lora_B.T) * 8 / (svd.ranknum + 1e-5)
    assert torch.equal(svd(x), expected)
    with pytest.raises(ConfigError, match=r"scaling must be one of .*got 'rs'"):
        LoRALinear(base, r=4, lora_alpha=8, scaling="rs")


def test_rslora_through_injection_and_the_module(glue):
    model = tiny_bert_classifier()
    adapters = inject_adapters(model, ["query"], r=4, scaling="alpha_over_sqrt_r")
    assert all(a.scaling_rule == "alpha_over_sqrt_r" for a in adapters.values())
    module = glue(method="lora", init_r=4, scaling="alpha_over_sqrt_r")
    assert all(a.scaling == 32 / 2 for a in module.adapters.values())
    svd = glue(init_r=4, target_r=2, scaling="alpha_over_sqrt_r")
    assert all(a.scaling_rule == "alpha_over_sqrt_r" for a in svd.adapters.values())
    pruned = glue(method="prune_lora", init_r=4, target_r=2, scaling="alpha_over_sqrt_r")
    assert all(a.scaling == 16.0 for a in pruned.adapters.values())


def test_the_options_are_command_line_options(capsys):
    from adalora_pl.cli import main
    from tests.builders import REPO_ROOT

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO_ROOT / "configs" / "cola.yaml"), "--model.lr_ratio_b", "4",
              "--model.lr_ratio_e", "0.5", "--model.scaling", "alpha_over_sqrt_r", "--model.adapter_init",
              "weight_svd", "--model.rank_pattern", "ranks.json", "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for line in ("lr_ratio_b: 4.0", "lr_ratio_e: 0.5", "scaling: alpha_over_sqrt_r", "adapter_init: weight_svd",
                 "rank_pattern: ranks.json"):
        assert line in printed, line


# ---------------------------------------------------------------------------------------- rank pattern for LoRA
def write_pattern(path, ranks: dict[str, int], init_r: int = 4, prefix: str = "model."):
    """A rank_pattern.json as write_rank_report writes it (module paths from the LightningModule)."""
    modules = {prefix + name: {"rank": k, "mask": [i < k for i in range(init_r)]} for name, k in ranks.items()}
    payload = {"schedule": {"init_budget": init_r * len(ranks), "target_budget": 0, "tinit": 0, "tfinal": 0,
                            "total_step": 10, "delta_t": 1, "frozen": True, "last_step": 9},
               "total_rank": sum(ranks.values()), "modules": modules}
    path.write_text(json.dumps(payload, indent=1))
    return path


def bert_paths(layers: int = 2) -> list[str]:
    return [f"bert.encoder.layer.{i}.{t}" for i in range(layers)
            for t in ("attention.self.query", "attention.self.key", "attention.self.value",
                      "attention.output.dense", "intermediate.dense", "output.dense")]


def test_lora_trains_each_module_at_the_rank_of_the_pattern(glue, tmp_path):
    ranks = {path: i % 4 for i, path in enumerate(bert_paths())}  # ranks 0..3, three modules at rank 0
    module = glue(method="lora", rank_pattern=str(write_pattern(tmp_path / "rank_pattern.json", ranks)))
    adapters = find_adapters(module.model)
    assert {p: a.r for p, a in adapters.items()} == {p: k for p, k in ranks.items() if k > 0}
    for path, k in ranks.items():  # a rank-0 module keeps its plain, frozen layer
        if k == 0:
            layer = module.model.get_submodule(path)
            assert type(layer) is nn.Linear and not layer.weight.requires_grad
    shapes = {p: (module.model.get_submodule(p).in_features, module.model.get_submodule(p).out_features)
              for p in adapters}
    expected = sum(k * sum(shapes[p]) for p, k in ranks.items() if k > 0)
    assert count_adapter_parameters(module.model) == module.adapter_param_count() == expected
    assert all(a.scaling == 32 / a.r for a in adapters.values())  # LoRA's alpha / r, per module
    # the file of a callback run on a bare backbone names the paths from the backbone: read the same
    same = glue(method="lora", rank_pattern=str(write_pattern(tmp_path / "plain.json", ranks, prefix="")))
    assert {p: a.r for p, a in find_adapters(same.model).items()} == {p: a.r for p, a in adapters.items()}
    assert read_rank_pattern(tmp_path / "rank_pattern.json") == {"model." + p: k for p, k in ranks.items()}


def test_a_pattern_that_does_not_fit_the_model_is_refused_naming_the_modules(glue, tmp_path):
    ranks = dict.fromkeys(bert_paths(), 2)
    extra = write_pattern(tmp_path / "extra.json", {**ranks, "bert.encoder.layer.9.attention.self.query": 1})
    with pytest.raises(ConfigError, match=r"1 modules the model's targets lack: \['bert.encoder.layer.9.attention"):
        glue(method="lora", rank_pattern=str(extra))
    missing = dict(ranks)
    missing.pop("bert.encoder.layer.1.output.dense")
    with pytest.raises(ConfigError, match=r"no rank for 1 targeted modules: \['bert.encoder.layer.1.output.dense'\]"):
        glue(method="lora", rank_pattern=str(write_pattern(tmp_path / "missing.json", missing)))
    with pytest.raises(ConfigError, match=r"10 modules the model's targets lack: \['bert.encoder.layer.0.attention.self"
                                          r".key', .*\] and 5 more"):  # a wider pattern than the targets
        glue(method="lora", rank_pattern=str(write_pattern(tmp_path / "all.json", ranks)), target_modules=["query"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"modules": {"model." + bert_paths()[0]: {"rank": -1}}}))
    with pytest.raises(ConfigError, match=r"has rank -1; expected an integer >= 0"):
        glue(method="lora", rank_pattern=str(bad))
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"has no \"modules\" entries"):
        glue(method="lora", rank_pattern=str(tmp_path / "empty.json"))
    (tmp_path / "cut.json").write_text('{"modules": {')
    with pytest.raises(ConfigError, match=r"rank_pattern .*cut\.json: not valid JSON"):
        glue(method="lora", rank_pattern=str(tmp_path / "cut.json"))
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ConfigError, match=r"rank_pattern .*list\.json: expected a JSON object, found list"):
        glue(method="lora", rank_pattern=str(tmp_path / "list.json"))
    with pytest.raises(MissingFileError, match=r"rank_pattern file not found: .*nope.json"):
        glue(method="lora", rank_pattern=str(tmp_path / "nope.json"))
    with pytest.raises(ConfigError, match=r"rank_pattern fixes each module's rank; param_budget=1000"):
        glue(method="lora", rank_pattern=str(extra), param_budget=1000)
    with pytest.raises(ConfigError, match=r"AdaLoRACallback allocates the ranks itself"):
        AdaLoRACallback(rank_pattern=str(extra))


# ---------------------------------------------------------------------------------------- weight-SVD start
def effective_weight(layer: SVDLinear) -> torch.Tensor:
    """The (out, in) weight the layer computes with, in float64: base weight plus update."""
    return layer._orient(layer.base_layer.weight.detach()).double() + layer.delta_weight().detach().double()


@pytest.mark.parametrize("kind", ["linear", "conv1d", "rslora"])
def test_weight_svd_start_gives_the_base_output_and_reconstructs_the_weight(kind):
    torch.manual_seed(0)
    base = Conv1D(24, 16) if kind == "conv1d" else nn.Linear(16, 24)  # both (out 24, in 16)
    with torch.no_grad():
        base.weight.normal_()
    original = base.weight.detach().clone()
    w = original.T if kind == "conv1d" else original
    x = torch.randn(7, 16)
    expected = base(x)
    scaling = "alpha_over_sqrt_r" if kind == "rslora" else "alpha_over_r"
    layer = SVDLinear(base, r=5, lora_alpha=8, adapter_init="weight_svd", scaling=scaling)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)  # step 0: the base model's outputs
    torch.testing.assert_close(effective_weight(layer), w.double(), rtol=0, atol=1e-6)  # residual + adapter = W
    u, s, vh = torch.linalg.svd(w.double())
    residual = layer._orient(layer.base_layer.weight.detach()).double()
    torch.testing.assert_close(torch.linalg.svdvals(residual)[:5], s[5:10], rtol=1e-5, atol=1e-5)  # W minus top 5
    torch.testing.assert_close(layer.lora_A @ layer.lora_A.T, torch.eye(5), rtol=0, atol=1e-5)  # V_r^T rows
    torch.testing.assert_close(layer.lora_B.T @ layer.lora_B, torch.eye(5), rtol=0, atol=1e-5)  # U_r columns
    torch.testing.assert_close((layer.lora_E.double() * layer.scale()).view(-1), s[:5], rtol=1e-6, atol=0)
    for name, param in zip(INITIAL_TENSORS, ("lora_A", "lora_E", "lora_B"), strict=True):
        assert torch.equal(getattr(layer, name), getattr(layer, param))  # the initial triplets, as buffers
    torch.testing.assert_close(layer.initial_delta(), w.double() - residual, rtol=0, atol=1e-6)  # float32 residual
    assert "adapter_init=weight_svd" in repr(layer)


def test_pruning_a_weight_svd_triplet_removes_its_principal_component():
    """The documented choice (docs/method.md §13): masking zeroes E_i as for any start, so the triplet's whole
    update, the principal component sigma_i u_i v_i^T it started as, leaves the layer."""
    torch.manual_seed(0)
    base = nn.Linear(16, 24)
    w = base.weight.detach().double().clone()
    layer = SVDLinear(base, r=4, lora_alpha=8, adapter_init="weight_svd")
    u, s, vh = torch.linalg.svd(w)
    with torch.no_grad():
        layer.rank_mask[1] = False
        layer.lora_E.masked_fill_(~layer.rank_mask.view(-1, 1), 0.0)  # what the allocator's mask does
    component = s[1] * torch.outer(u[:, 1], vh[1])
    torch.testing.assert_close(effective_weight(layer), w - component, rtol=0, atol=1e-6)
    # the residual base weight and the initial triplets do not change: exports still know W
    torch.testing.assert_close(layer.base_layer.weight.double() + layer.initial_delta(), w, rtol=0, atol=1e-6)


def test_loading_other_initial_triplets_moves_the_base_to_their_residual():
    """A state dict whose initial triplets differ (another machine's SVD) leaves base + initial update = W."""
    torch.manual_seed(0)
    w = torch.randn(24, 16)
    first = SVDLinear(nn.Linear(16, 24), r=3, lora_alpha=8, adapter_init="weight_svd")
    with torch.no_grad():
        first.base_layer.weight.copy_(w + 1e-3 * torch.randn(24, 16))  # W of the other machine, slightly other SVD
    first = SVDLinear(first.base_layer, r=3, lora_alpha=8, adapter_init="weight_svd")
    second = SVDLinear(nn.Linear(16, 24), r=3, lora_alpha=8)
    with torch.no_grad():
        second.base_layer.weight.copy_(w)
        second.base_layer.bias.copy_(first.base_layer.bias)
    second = SVDLinear(second.base_layer, r=3, lora_alpha=8, adapter_init="weight_svd")
    state = {k: v for k, v in first.state_dict().items() if not k.startswith("base_layer.")}  # adapter-only
    assert not torch.equal(second.init_lora_E, first.init_lora_E)
    second.load_state_dict(state, strict=False)
    torch.testing.assert_close(second.base_layer.weight.double() + second.initial_delta(), w.double(), rtol=0,
                               atol=1e-6)
    same = copy.deepcopy(second)
    weight = same.base_layer.weight.clone()
    same.load_state_dict(state, strict=False)  # the same triplets again: the base weight is left alone, bitwise
    assert torch.equal(same.base_layer.weight, weight)


def test_weight_svd_model_starts_as_the_base_model_through_injection_and_the_module(glue, tiny_backbone):
    model = tiny_bert_classifier()
    reference = logits(model, make_batch())
    adapters = inject_adapters(model, BERT_TARGETS, r=4, adapter_init="weight_svd", trainable_modules=["classifier"])
    torch.testing.assert_close(logits(model, make_batch()), reference, rtol=0, atol=1e-5)
    assert all(a.adapter_init == "weight_svd" for a in adapters.values())
    module = glue(init_r=4, target_r=2, adapter_init="weight_svd")
    plain = GLUEClassifier(backbone=tiny_backbone, task_name="cola", method="full")
    torch.testing.assert_close(logits(module.model, make_batch()), logits(plain.model, make_batch()), rtol=0,
                               atol=1e-5)
    assert all(a.base_layer.weight.requires_grad is False for a in module.adapters.values())


def test_weight_svd_refusals(glue, monkeypatch):
    with pytest.raises(ConfigError, match=r"takes r=5 singular triplets of a 4 x 8 weight, which has at most 4"):
        SVDLinear(nn.Linear(8, 4), r=5, lora_alpha=8, adapter_init="weight_svd")
    with pytest.raises(ConfigError, match=r"divides the singular values by the scale, which is 0.0"):
        SVDLinear(nn.Linear(8, 4), r=2, lora_alpha=0, adapter_init="weight_svd")
    with pytest.raises(ConfigError, match=r"adapter_init='weight_svd' replaces each adapted base weight by its "
                                          r"residual, which a quantized base \(quantization='nf4'\) cannot hold"):
        glue(adapter_init="weight_svd", quantization="nf4")  # refused before the backbone loads
    import adalora_pl.sharding

    monkeypatch.setattr(adalora_pl.sharding, "is_sharded", lambda t: True)
    with pytest.raises(ConfigError, match=r"cannot residualise a sharded \(DTensor\) base weight"):
        SVDLinear(nn.Linear(8, 4), r=2, lora_alpha=8, adapter_init="weight_svd")
    monkeypatch.undo()
    module = glue(init_r=2, target_r=1, adapter_init="weight_svd")
    module._device_mesh = types.SimpleNamespace(mesh_dim_names=("data_parallel",))
    with pytest.raises(ConfigError, match=r"adapter_init='weight_svd' is not supported under ModelParallelStrategy"):
        module.configure_model()
    layer = SVDLinear(nn.Linear(8, 4), r=2, lora_alpha=8, adapter_init="weight_svd")
    with pytest.raises(RuntimeError, match=r"base weight is the residual already"):
        layer.residualise_base()


def test_weight_svd_on_a_quantized_layer_is_refused():
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False, bias=False).to("cpu")
    with pytest.raises(ConfigError, match=r"needs a plain base weight to replace by its residual, but this base "
                                          r"layer is quantized"):
        SVDLinear(layer, r=2, lora_alpha=8, adapter_init="weight_svd")
