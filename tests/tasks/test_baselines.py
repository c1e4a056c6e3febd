"""Baselines and ablations: each trains through the CLI and reports #Params equal to a hand count;
prune-LoRA cannot recover a pruned doublet while AdaLoRA can revive a masked triplet; budget helper."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from adalora_pl import AdaLoRACallback, RankAllocator, SVDLinear
from adalora_pl.baselines import DoubletPruner, PrunableLoRALinear, match_budget, params_for_rank
from tests.builders import fit_tiny, write_cola

# Tiny BERT of tests.builders: hidden 32, FFN 64, 2 layers; per layer four 32x32 matrices (q, k, v, attention
# output), intermediate 32 -> 64 and output 64 -> 32.
SHAPES_PER_LAYER = [(32, 32)] * 4 + [(32, 64), (64, 32)]
LAYERS = 2


def hand_count_from_pattern(log_dir: Path, per_rank) -> int:
    """Sum over modules of kept rank x cost of one rank, with shapes by module name."""
    modules = json.loads((log_dir / "rank_pattern.json").read_text())["modules"]
    total = 0
    for name, entry in modules.items():
        shape = (32, 64) if name.endswith("intermediate.dense") else (
            (64, 32) if name.endswith(".output.dense") and "attention" not in name else (32, 32))
        total += entry["rank"] * per_rank(*shape)
    return total


@pytest.mark.parametrize(
    "method,extra,expected",
    [
        ("lora", [], LAYERS * sum(3 * (i + o) for i, o in SHAPES_PER_LAYER)),  # r = init_r = 3
        ("svd_lora", [], LAYERS * sum(3 * (i + o + 1) for i, o in SHAPES_PER_LAYER)),  # nothing pruned
        ("houlsby", ["--model.bottleneck_size", "4"], LAYERS * 2 * (2 * 4 * 32 + 4 + 32)),  # after attn and FFN
        ("pfeiffer", ["--model.bottleneck_size", "4"], LAYERS * 1 * (2 * 4 * 32 + 4 + 32)),  # after FFN only
        ("full", [], 0),
    ],
)
def test_baseline_trains_and_reports_hand_counted_params(tmp_path, tiny_backbone, method, extra, expected):
    cli = fit_tiny(tmp_path, "cola.yaml", tiny_backbone, write_cola(tmp_path / "CoLA", rows=16),
                   "--model.method", method, *extra)
    assert cli.trainer.global_step == 4
    assert cli.model.adapter_param_count() == expected
    if method == "full":
        assert cli.model.trainable_parameter_count() == sum(p.numel() for p in cli.model.parameters())
    if method == "svd_lora":  # the schedule ran with a constant budget
        pattern = json.loads((Path(cli.trainer.log_dir) / "rank_pattern.json").read_text())
        assert pattern["total_rank"] == 36


@pytest.mark.parametrize(
    "method,extra,per_rank,settings",
    [
        ("adalora", ["--model.orth_reg_weight", "0"], lambda i, o: i + o + 1,
         {"orth_reg_weight": 0.0, "importance": "sensitivity_uncertainty", "allocator": RankAllocator}),
        ("adalora", ["--model.importance", "sensitivity"], lambda i, o: i + o + 1,
         {"orth_reg_weight": 0.1, "importance": "sensitivity", "allocator": RankAllocator}),
        ("adalora", ["--model.importance", "magnitude"], lambda i, o: i + o + 1,
         {"orth_reg_weight": 0.1, "importance": "magnitude", "allocator": RankAllocator}),
        ("prune_lora", [], lambda i, o: i + o,
         {"orth_reg_weight": 0.0, "importance": "sensitivity_uncertainty", "allocator": DoubletPruner}),
    ],
    ids=["no-orth-reg", "sensitivity-only", "magnitude-only", "prune-lora"],
)
def test_ablation_flags_reach_the_callback_and_the_run_prunes_to_the_budget(tmp_path, tiny_backbone, method, extra,
                                                                            per_rank, settings):
    cli = fit_tiny(tmp_path, "cola.yaml", tiny_backbone, write_cola(tmp_path / "CoLA", rows=16),
                   "--model.method", method, *extra)
    # The callback that ran the schedule is the module's, with the ablation's settings (cola.yaml: init_r 3,
    # target_r 1, orth_reg_weight 0.1), and its allocator uses them.
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, AdaLoRACallback)]
    assert callbacks == [cli.model.schedule_callback]
    callback = callbacks[0]
    assert (callback.config.init_r, callback.config.target_r) == (3, 1)
    assert callback.config.orth_reg_weight == settings["orth_reg_weight"]
    assert callback.config.importance == settings["importance"]
    allocator = callback.allocator
    assert type(allocator) is settings["allocator"] and allocator.importance == settings["importance"]
    assert allocator.schedule.target_budget == 12 and allocator.frozen
    # What each variant keeps: magnitude no averages, sensitivity no uncertainty, the paper's score both.
    sizes = (allocator.exp_avg_ipt.numel() > 0, allocator.exp_avg_unc.numel() > 0)
    assert sizes == {"magnitude": (False, False), "sensitivity": (True, False),
                     "sensitivity_uncertainty": (True, True)}[settings["importance"]]
    log_dir = Path(cli.trainer.log_dir)
    pattern = json.loads((log_dir / "rank_pattern.json").read_text())
    assert pattern["total_rank"] == 12  # target_r 1 x 12 matrices
    assert cli.model.adapter_param_count() == hand_count_from_pattern(log_dir, per_rank)


def test_pruned_lora_doublet_stays_zero_without_gradient_but_svd_triplet_recovers():
    torch.manual_seed(0)
    # prune LoRA: one layer, doublet 0 pruned at the first mask event
    lora = PrunableLoRALinear(nn.Linear(4, 4), r=2, lora_alpha=2)
    with torch.no_grad():
        lora.lora_B.normal_()
    pruner = DoubletPruner({"l": lora}, target_r=1, tinit=0, tfinal=1, total_step=6)
    opt = torch.optim.AdamW([lora.lora_A, lora.lora_B], lr=0.1)
    x = torch.randn(8, 4)
    checked = 0
    for step in range(6):
        dead = (~lora.rank_mask).nonzero().flatten()
        lora(x).pow(2).sum().backward()
        if dead.numel():
            checked += 1
            assert torch.count_nonzero(lora.lora_A.grad[dead]) == 0  # no gradient for a pruned doublet
            assert torch.count_nonzero(lora.lora_B.grad[:, dead]) == 0
        opt.step()  # AdamW momentum would move it; the pruner re-zeroes after every step
        pruner.update_and_allocate(step)
        opt.zero_grad()
        dead = (~lora.rank_mask).nonzero().flatten()
        assert torch.count_nonzero(lora.lora_A[dead]) == 0 and torch.count_nonzero(lora.lora_B[:, dead]) == 0
    assert checked >= 3
    assert lora.kept_rank == 1

    # AdaLoRA: a masked triplet keeps A and B and its E gets gradient, so it can come back
    svd = SVDLinear(nn.Linear(4, 4), r=2, lora_alpha=2)
    allocator = RankAllocator({"l": svd}, target_r=1, tinit=0, tfinal=1, total_step=10, importance="magnitude")
    with torch.no_grad():
        svd.lora_E.copy_(torch.tensor([[0.1], [1.0]]))
    allocator.mask_to_budget(1)
    assert svd.lora_E[0, 0] == 0 and svd.lora_A[0].abs().sum() > 0
    opt = torch.optim.SGD([svd.lora_E], lr=0.5)
    svd(x).pow(2).sum().backward()
    assert svd.lora_E.grad[0, 0] != 0
    opt.step()
    assert svd.lora_E[0, 0] != 0  # revived before the next mask event


def test_budget_helper_reproduces_the_papers_lora_count():
    """LoRA r=8 on the six matrices of DeBERTaV3-base's 12 layers: the paper's "1.33M"."""
    deberta = [(768, 768)] * 4 + [(768, 3072), (3072, 768)]
    assert params_for_rank(deberta * 12, "lora", 8) == 1_327_104
    r, actual = match_budget(deberta * 12, "lora", 1_330_000)
    assert (r, actual) == (8, 1_327_104)
    # bottleneck adapters after attention and FFN (24 sites of width 768), matched to the same budget
    m, count = match_budget([(768, 768)] * 24, "bottleneck", 1_327_104)
    assert count == 24 * (2 * m * 768 + m + 768)
    assert abs(count - 1_327_104) <= 24 * (2 * 768 + 1) // 2
    with pytest.raises(ValueError, match="target_params must be > 0, got 0"):
        match_budget(deberta, "lora", 0)


@pytest.mark.parametrize(
    ("method", "sites"),
    [
        ("houlsby", ["decoder.layers.0.encoder_attn.out_proj", "decoder.layers.0.fc2",
                     "decoder.layers.0.self_attn.out_proj", "encoder.layers.0.fc2",
                     "encoder.layers.0.self_attn.out_proj"]),
        ("pfeiffer", ["decoder.layers.0.fc2", "encoder.layers.0.fc2"]),
    ],
)
def test_bottleneck_adapters_on_a_bart_classifier_leave_its_head_alone(tmp_path, method, sites):
    """BART's classification head has an ``out_proj`` too: the adapters go after the attention and FFN sublayers
    of the encoder and decoder layers only, and the head is trained in full as a plain linear layer."""
    from adalora_pl.baselines import BottleneckAdapter
    from adalora_pl.tasks.glue_module import GLUEClassifier
    from tests.builders import make_batch, tiny_bart_classifier

    tiny_bart_classifier().save_pretrained(tmp_path / "bart")
    module = GLUEClassifier(task_name="cola", backbone=str(tmp_path / "bart"), method=method, bottleneck_size=4)
    adapted = sorted(n for n, m in module.model.named_modules() if isinstance(m, BottleneckAdapter))
    assert adapted == [f"model.{s}" for s in sites]
    head = module.model.classification_head
    assert type(head.out_proj) is nn.Linear and type(head.dense) is nn.Linear
    out = module(**make_batch(labels=True))
    out.loss.backward()
    for name, param in module.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
            assert "classification_head" in name or "adapter_" in name, name
    assert head.out_proj.weight.grad.abs().sum() > 0
    for site in adapted:  # adapter_up starts at zero; its gradient is what moves it first
        assert module.model.get_submodule(site).adapter_up.weight.grad.abs().sum() > 0
