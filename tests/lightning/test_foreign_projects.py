"""AdaLoRACallback dropped into Lightning projects that know nothing about it (tests/foreign_projects.py).

One test per project shape that once broke the callback: datasets built in the module's ``setup``,
``fast_dev_run``, a stop between mask events (EarlyStopping), manual optimization, DDP with a "bf16-true" Trainer,
a resume with changed settings; and what a user must be told: an optimizer without the adapters, a model built in
``setup``, a loss that turns NaN.
"""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch

from adalora_pl import AdaLoRACallback, find_adapters
from tests.builders import BERT_TARGETS
from tests.foreign_projects import (
    AdapterDump,
    AutomaticTwin,
    HeadOnlyOptimizerProject,
    ManualOptimizationProject,
    SetupDataProject,
    SetupModelProject,
)
from tests.lightning_modules import OrderlyDistributedTeardown

TRAINABLE = ["classifier", "pooler"]


def callback(**overrides) -> AdaLoRACallback:
    settings = dict(target_modules=BERT_TARGETS, trainable_modules=TRAINABLE, init_r=3, target_r=1, tinit=0.1,
                    tfinal=0.3, delta_t=2)
    settings.update(overrides)
    return AdaLoRACallback(**settings)


def trainer_for(tmp_path, *callbacks, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                    num_sanity_val_steps=0)
    defaults.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **defaults)


def data_in_init(project: type[SetupDataProject] = SetupDataProject, **kwargs) -> SetupDataProject:
    """The project with its datasets built in ``__init__``: each test but the first shows its own pattern only."""
    return project(data_in_setup=False, **kwargs)


def adalora_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "AdaLoRA" in str(w.message)]


def test_datasets_built_in_the_modules_setup(tmp_path):
    """The schedule's total comes from the Trainer once the module's setup has built its datasets."""
    module, cb = SetupDataProject(), callback()
    trainer_for(tmp_path, cb, max_epochs=5).fit(module)  # 4 batches x 5 epochs
    s = cb.allocator.schedule
    assert (s.total_step, s.tinit, s.tfinal) == (20, 2, 6)
    assert cb.allocator.frozen and sum(m.kept_rank for m in cb.allocator.layers) == 12  # target_r x 12 adapters


def test_fast_dev_run_trains_without_pruning_after_one_warning(tmp_path):
    """The configs' integer tinit/tfinal (800/3500) and fast_dev_run's single step: no crash, one warning."""
    module, cb = data_in_init(), callback(tinit=800, tfinal=3500)
    with pytest.warns(UserWarning) as record:
        trainer_for(tmp_path, cb, fast_dev_run=True).fit(module)
    messages = adalora_warnings(record)
    assert len(messages) == 1 and "fast_dev_run=True" in messages[0] and "without pruning" in messages[0]
    assert cb.allocator is None
    adapters = find_adapters(module)
    assert len(adapters) == 12 and all(bool(m.rank_mask.all()) for m in adapters.values())
    assert all(torch.count_nonzero(m.lora_E) > 0 for m in adapters.values())  # E trained from zero: one step ran


def test_a_run_shorter_than_the_schedule_trains_without_pruning(tmp_path):
    module, cb = data_in_init(), callback(tinit=800, tfinal=3500)
    with pytest.warns(UserWarning) as record:
        trainer_for(tmp_path, cb, max_steps=4).fit(module)
    messages = adalora_warnings(record)
    assert len(messages) == 1 and "4 optimizer steps leave no budgeting phase" in messages[0]
    assert cb.allocator is None and module.global_step == 4


def test_a_stop_between_mask_events_leaves_checkpoints_with_the_reported_ranks(tmp_path):
    """EarlyStopping ends the fit at step 8 (two epochs of 4); the last mask was at step 6, and step 7 trained the
    masked singular values back to nonzero. last.ckpt (written at the epoch end, before on_train_end) must still
    hold exactly the kept ranks, and the progress bar shows the kept count."""
    module = data_in_init()
    cb = callback(tinit=2, tfinal=20, delta_t=3)  # T = 40 (10 epochs): mask events at steps 3, 6, 9, ...
    stop = pl.callbacks.EarlyStopping(monitor="val_score", mode="min", patience=0)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = trainer_for(tmp_path, cb, stop, ckpt, max_epochs=10, enable_checkpointing=True)
    trainer.fit(module)
    assert trainer.global_step == 8 and cb.allocator.last_step == 7
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    state = saved["state_dict"]
    masks = {k.removesuffix(".rank_mask"): v for k, v in state.items() if k.endswith(".rank_mask")}
    assert len(masks) == 12 and sum(int(m.sum()) for m in masks.values()) < 36  # some triplets are masked
    # The checkpoint's weights have the masked singular values at zero, like the model fit returns ...
    for name, mask in masks.items():
        assert torch.count_nonzero(state[f"{name}.lora_E"][~mask]) == 0, name
        assert torch.count_nonzero(find_adapters(module)[name].lora_E[~mask]) == 0, name
    # ... though their live values were nonzero at the save (they trained since step 6): what the premise needs.
    live = saved["callbacks"]["AdaLoRACallback"]["live_lora_E"]
    assert any(torch.count_nonzero(live[name][~mask]) > 0 for name, mask in masks.items())
    kept = int(cb.allocator.kept_total())
    assert trainer.progress_bar_metrics["adalora/rank"] == kept == sum(int(m.sum()) for m in masks.values())
    assert cb.allocator.schedule.budget_at(7) != kept  # what the progress bar used to show instead


@pytest.mark.parametrize("zero_grad_first", [False, True], ids=["step-then-zero_grad", "zero_grad-then-step"])
def test_manual_optimization_collects_the_same_importance_as_automatic(tmp_path, zero_grad_first):
    """``opt.step(); opt.zero_grad()`` inside training_step empties the gradients before any batch-end hook.
    The importance is read right after the optimizer step, so a manual run equals the automatic run bitwise."""
    runs = {}
    for name, project in (("manual", lambda: data_in_init(ManualOptimizationProject, zero_grad_first=zero_grad_first)),
                          ("automatic", lambda: data_in_init(AutomaticTwin))):
        module = project()
        torch.manual_seed(1)  # the adapters' initial values are drawn at injection
        cb = callback(tinit=2, tfinal=4, delta_t=1)  # T = 16 (4 epochs): cubic phase at steps 3..12
        trainer_for(tmp_path / name, cb, max_epochs=4).fit(module)
        runs[name] = (cb, {n: p.detach().clone() for n, p in module.named_parameters() if ".lora_" in n})
    manual, automatic = runs["manual"][0].allocator, runs["automatic"][0].allocator
    assert sum(m.kept_rank for m in manual.layers) == 12  # not 0: scores that all tie at zero mask everything
    assert manual.rank_pattern() == automatic.rank_pattern()
    assert manual.importance_steps == automatic.importance_steps == 12  # every step before the pattern is fixed
    for key, value in runs["automatic"][1].items():
        assert torch.equal(runs["manual"][1][key], value), key


def test_an_optimizer_without_the_adapters_is_refused_before_training(tmp_path):
    module = data_in_init(HeadOnlyOptimizerProject)
    with pytest.raises(RuntimeError, match="one optimizer holding all 36 adapter parameters; none of the Trainer's"):
        trainer_for(tmp_path, callback(), max_epochs=5).fit(module)
    assert module.global_step == 0


def test_a_model_built_in_setup_gets_a_message_that_says_where_to_build_it(tmp_path):
    with pytest.raises(ValueError, match="found no parameters in SetupModelProject.*Build the model in __init__ or"):
        trainer_for(tmp_path, callback(), max_epochs=5).fit(SetupModelProject())


def test_a_nan_loss_stops_the_fit_before_the_optimizer_writes_it(tmp_path):
    module = data_in_init(nan_loss_at_step=3)
    with pytest.raises(FloatingPointError, match="inf/NaN gradients at optimizer step 3"):
        trainer_for(tmp_path, callback(), max_epochs=5).fit(module)
    assert module.global_step == 3
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_regularizer_gradient_enters_before_gradient_clipping(tmp_path):
    """With gradient_clip_val the clipped gradient is (task + w * dR) scaled as a whole: the regularizer's gradient
    is part of what is clipped, as in ``loss + w * R``."""
    full, clipped = {}, {}

    class BeforeClipping(pl.Callback):  # after AdaLoRACallback in the list: sees the regularizer's gradient
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            full.update({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})

    class AfterClipping(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            names = {id(p): n for n, p in pl_module.named_parameters()}

            def grab(optimizer, args, kwargs):
                if not clipped:
                    clipped.update({names[id(p)]: p.grad.clone() for g in optimizer.param_groups
                                    for p in g["params"] if p.grad is not None})

            # Lightning runs the closure (backward, hooks, clipping) inside optimizer.step(): after it, the
            # gradients are the clipped ones the update used.
            trainer.optimizers[0].register_step_post_hook(grab)

    clip = 1e-3
    cb = callback(orth_reg_weight=0.5, tinit=0, tfinal=0, total_step=10)
    trainer = trainer_for(tmp_path, cb, BeforeClipping(), AfterClipping(), max_steps=1, gradient_clip_val=clip)
    trainer.fit(data_in_init())
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in full.values()]))
    coefficient = clip / (total + 1e-6)  # torch.nn.utils.clip_grad_norm_
    assert total > clip and clipped.keys() == full.keys()
    for name, grad in full.items():
        torch.testing.assert_close(clipped[name], grad * coefficient, rtol=1e-6, atol=0)
    # The regularizer's part is in what was clipped: at step 0 E = 0, so the task gives A no gradient at all.
    a_grads = [g for n, g in full.items() if n.endswith("lora_A")]
    assert all(torch.count_nonzero(g) > 0 for g in a_grads)


# ----------------------------------------------------------------------------- resume with changed settings
def _first_fit(tmp_path) -> str:
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "first", save_last=True)
    trainer_for(tmp_path / "first", callback(tinit=2, tfinal=6), ckpt, max_epochs=4, enable_checkpointing=True).fit(
        data_in_init())
    return str(tmp_path / "first" / "last.ckpt")


@pytest.mark.parametrize(
    "overrides,trainer_kwargs,named",
    [
        (dict(target_r=2), dict(max_epochs=4), "target_r 1 -> 2"),
        (dict(importance="sensitivity"), dict(max_epochs=4), "importance 'sensitivity_uncertainty' -> 'sensitivity'"),
        ({}, dict(max_epochs=6), "total_step 16 -> 24 (total_step counts the optimizer steps of max_epochs/max_steps"),
    ],
    ids=["target_r", "importance", "max_epochs"],
)
def test_a_resume_with_changed_settings_is_refused_naming_them(tmp_path, overrides, trainer_kwargs, named):
    ckpt = _first_fit(tmp_path)
    module = data_in_init()
    with pytest.raises(ValueError, match="cannot resume AdaLoRA from this checkpoint.*" + _escape(named)):
        trainer_for(tmp_path / "second", callback(tinit=2, tfinal=6, **overrides), **trainer_kwargs).fit(
            module, ckpt_path=ckpt)


def _escape(text: str) -> str:
    import re

    return re.escape(text)


# ----------------------------------------------------------------------------- half-precision Trainers
def test_bf16_true_resume_and_evaluation_keep_the_float32_adapters_exactly(tmp_path):
    """A "bf16-true" Trainer converts the module after the checkpoint is restored: the float32 adapters must reach
    the resumed fit and a fresh validate unrounded (bit for bit the checkpoint's values)."""
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "first", save_last=True)
    settings = dict(tinit=2, tfinal=6, total_step=16)  # the first fit stops after 8 of them
    trainer_for(tmp_path / "first", callback(**settings), ckpt_cb, max_epochs=2, precision="bf16-true",
                enable_checkpointing=True).fit(data_in_init())
    saved = torch.load(tmp_path / "first" / "last.ckpt", weights_only=False)
    weights = {k: v for k, v in saved["state_dict"].items() if ".lora_" in k}
    assert {v.dtype for v in weights.values()} == {torch.float32}
    assert saved["state_dict"]["net.bert.encoder.layer.0.attention.self.query.base_layer.weight"].dtype == \
        torch.bfloat16

    fresh = data_in_init(seed=7)
    trainer_for(tmp_path / "validate", callback(**settings), precision="bf16-true").validate(
        fresh, ckpt_path=str(tmp_path / "first" / "last.ckpt"))
    restored = {n: p for n, p in fresh.named_parameters() if ".lora_" in n}
    assert restored.keys() == weights.keys()
    for key, value in weights.items():
        assert restored[key].dtype == torch.float32 and torch.equal(restored[key], value), key

    seen = {}

    class AtTrainStart(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update({n: p.detach().clone() for n, p in pl_module.named_parameters() if ".lora_" in n})

    trainer_for(tmp_path / "resumed", callback(**settings), AtTrainStart(), max_epochs=4,
                precision="bf16-true").fit(data_in_init(), ckpt_path=str(tmp_path / "first" / "last.ckpt"))
    live_E = saved["callbacks"]["AdaLoRACallback"]["live_lora_E"]
    assert seen.keys() == weights.keys()
    for key, value in weights.items():
        expected = live_E[key.removesuffix(".lora_E")] if key.endswith(".lora_E") else value
        assert seen[key].dtype == torch.float32 and torch.equal(seen[key], expected), key


@pytest.mark.slow
def test_ddp_with_a_bf16_true_trainer_keeps_the_ranks_in_step(tmp_path):
    """Two DDP processes with precision="bf16-true": the adapters stay float32 parameters that DDP registered, so
    gradients are all-reduced and both ranks hold bitwise the same adapters after steps spanning mask events."""
    module = data_in_init(num_examples=32, batch_size=4)  # 8 batches, 4 per rank: 4 steps per epoch
    cb = callback(tinit=1, tfinal=2, delta_t=1)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", precision="bf16-true", max_epochs=2,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
                         callbacks=[cb, AdapterDump(str(tmp_path)), OrderlyDistributedTeardown()])
    trainer.fit(module)
    ranks = [torch.load(tmp_path / f"adapters_rank{r}.pt") for r in (0, 1)]
    dtypes = json.loads((tmp_path / "dtypes_rank1.json").read_text())
    assert len(ranks[0]) == 36 and set(dtypes.values()) == {"torch.float32"}
    assert any(torch.count_nonzero(v) > 0 for k, v in ranks[0].items() if k.endswith("lora_E"))
    for key, value in ranks[0].items():
        assert torch.equal(ranks[1][key], value), key
