"""AdaLoRACallback on a user's own LightningModule: injection, schedule, resume, accumulation, AMP, DDP."""

from __future__ import annotations

import copy
import json

import lightning.pytorch as pl
import pytest
import torch

from adalora_pl import AdaLoRACallback, compact_adapters, find_adapters
from adalora_pl.baselines import PruneLoRACallback
from tests.builders import BERT_TARGETS, max_adapter_diff, peft_layers, peft_twin
from tests.lightning_modules import (
    LazyClassifier,
    MaskWriter,
    OrderlyDistributedTeardown,
    PerturbedScoresOnRankOne,
    PlainClassifier,
    RandomTokens,
)

TRAINABLE = ["classifier", "pooler"]


def make_trainer(tmp_path, callback, **kwargs):
    defaults = dict(
        accelerator="cpu", devices=1, logger=pl.loggers.TensorBoardLogger(tmp_path, name="logs"),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, deterministic=True,
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=[callback], **defaults)


def test_plain_module_trains_with_the_callback(tmp_path):
    module = PlainClassifier(num_examples=32, batch_size=8)
    cb = AdaLoRACallback(target_modules=BERT_TARGETS, trainable_modules=TRAINABLE, init_r=4, target_r=2,
                         tinit=0.1, tfinal=0.3, delta_t=2)
    trainer = make_trainer(tmp_path, cb, max_epochs=5)  # 4 batches x 5 epochs = 20 optimizer steps
    trainer.fit(module)
    alloc = cb.allocator
    assert alloc.schedule.total_step == 20 and (alloc.schedule.tinit, alloc.schedule.tfinal) == (2, 6)
    assert len(alloc.layers) == 12
    frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
    assert all(".lora_" not in n for n in frozen) and any("encoder.layer.0.attention.self.query.base_layer" in n
                                                         for n in frozen)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or ".classifier." in n or ".pooler." in n for n in trainable)
    assert alloc.frozen
    assert sum(m.kept_rank for m in alloc.layers) == alloc.schedule.target_budget == 24
    nonzero_E = sum(int((m.lora_E != 0).sum()) for m in alloc.layers)
    assert nonzero_E <= 24
    payload = json.loads((tmp_path / "logs" / "version_0" / "rank_pattern.json").read_text())
    assert payload["total_rank"] == 24 and len(payload["modules"]) == 12
    first = next(iter(payload["modules"].values()))
    assert first["rank"] == sum(first["mask"]) and len(first["mask"]) == 4
    # budget and orth reg reached the logger
    assert "adalora/budget" in trainer.logged_metrics and "adalora/orth_reg" in trainer.logged_metrics


def test_lightning_run_matches_peft_loop_step_for_step(tmp_path):
    """Trainer + callback against a plain loop with PEFT: identical masks and parameters at every step, bit for bit
    (the regularizer enters as a gradient added to .grad, PEFT's as a term of the loss: the same sums here)."""
    pytest.importorskip("peft")
    total, tinit, tfinal, delta_t = 24, 3, 8, 2  # final step 16 on the delta_t grid
    module = PlainClassifier(num_examples=32, batch_size=8, lr=5e-3)
    base_net = copy.deepcopy(module.net)
    records = []

    class Recorder(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            records.append({n: p.detach().clone() for n, p in pl_module.net.named_parameters() if ".lora_" in n})

    cb = AdaLoRACallback(target_modules=BERT_TARGETS, trainable_modules=TRAINABLE, init_r=3, target_r=1,
                         tinit=tinit, tfinal=tfinal, delta_t=delta_t, orth_reg_weight=0.1, total_step=total)
    trainer = make_trainer(tmp_path, cb, max_steps=total, logger=False)
    trainer.callbacks.append(Recorder())
    # Recorder runs after AdaLoRACallback (callback order), so it sees post-mask parameters.
    initial = {}

    class Initial(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            initial.update({n: p.detach().clone() for n, p in pl_module.net.named_parameters() if ".lora_" in n})

    trainer.callbacks.append(Initial())
    trainer.fit(module)

    # The same run with PEFT in a plain loop, from the same initial adapter values.
    adapters = {n: m for n, m in module.net.named_modules() if hasattr(m, "lora_E")}
    ours_init = copy.deepcopy(module.net)
    with torch.no_grad():
        for n, p in ours_init.named_parameters():
            if n in initial:
                p.copy_(initial[n])
    init_adapters = {n: m for n, m in ours_init.named_modules() if hasattr(m, "lora_E")}
    peft_model = peft_twin(base_net, init_adapters, init_r=3, target_r=1, tinit=tinit, tfinal=tfinal,
                           total_step=total, delta_t=delta_t, orth_reg_weight=0.1)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-3)
    data = torch.utils.data.DataLoader(RandomTokens(32), batch_size=8)
    theirs = peft_layers(peft_model)
    worst = 0.0
    step = 0
    for _epoch in range(total // len(data)):
        for batch in data:
            peft_model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.backward()
            opt.step()
            peft_model.base_model.update_and_allocate(step)
            opt.zero_grad()
            ours = records[step]
            for name in adapters:
                assert torch.equal(ours[f"{name}.lora_E"] == 0, theirs[name].lora_E["default"] == 0), (step, name)
                for key in ("lora_A", "lora_E", "lora_B"):
                    diff = (ours[f"{name}.{key}"] - getattr(theirs[name], key)["default"]).abs().max().item()
                    worst = max(worst, diff)
            step += 1
    assert step == total
    assert worst == 0.0, worst
    assert max_adapter_diff(peft_model, adapters) == 0.0


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    module = PlainClassifier(num_examples=32, batch_size=2)  # 16 batches per epoch -> 4 optimizer steps
    cb = AdaLoRACallback(target_modules=BERT_TARGETS, trainable_modules=TRAINABLE, init_r=3, target_r=1,
                         tinit=1, tfinal=3, delta_t=1)
    allocated, updated = [], []

    class Spy(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            allocate, update = cb.allocator.allocate, cb.allocator.update_importance

            def counting_allocate(step):
                allocated.append(step)
                return allocate(step)

            def counting_update(applied=None):
                updated.append(trainer.global_step)
                return update(applied)

            cb.allocator.allocate, cb.allocator.update_importance = counting_allocate, counting_update

    trainer = make_trainer(tmp_path, cb, max_epochs=3, accumulate_grad_batches=4, logger=False)
    trainer.callbacks.insert(0, Spy())
    trainer.fit(module)
    assert cb.allocator.schedule.total_step == 12  # 3 epochs x 16 batches / 4
    assert allocated == list(range(12))  # once per optimizer step, 0-based, in order
    assert updated == list(range(9))  # importance until the pattern is fixed at total_step - tfinal = 9
    assert trainer.global_step == 12


def run_to(tmp_path, name, max_steps, ckpt_in=None, snapshot_steps=(), total=48):
    """Train to ``max_steps`` (a whole number of 4-batch epochs) and keep the end-of-epoch checkpoint.

    The checkpoint comes from ModelCheckpoint at the end of the training epoch: one written by
    ``trainer.save_checkpoint`` after ``max_steps`` stops mid-loop, and Lightning then replays a batch on
    resume (a non-stateful DataLoader restarts its epoch).
    """
    snap = tmp_path / "snapshots" / name
    snap.mkdir(parents=True, exist_ok=True)
    module = PlainClassifier(num_examples=16, batch_size=4, snapshot_steps=snapshot_steps, snapshot_dir=str(snap))
    cb = AdaLoRACallback(target_modules=BERT_TARGETS, trainable_modules=TRAINABLE, init_r=3, target_r=1,
                         tinit=4, tfinal=28, delta_t=2, total_step=total)
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / name, save_last=True, save_on_train_epoch_end=True)
    trainer = make_trainer(tmp_path / name, cb, max_epochs=max_steps // 4, logger=False, enable_checkpointing=True)
    trainer.callbacks.append(ckpt_cb)
    trainer.fit(module, ckpt_path=ckpt_in)
    assert trainer.global_step == max_steps
    return module, cb, tmp_path / name / "last.ckpt", snap


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [8, 24], ids=["mid-cubic", "after-freeze"])
def test_resume_is_bitwise_identical(tmp_path, stop_at):
    """Stop at N, resume from the checkpoint to 2N: adapters and masks equal an uninterrupted run."""
    _, full_cb, _, full_snap = run_to(tmp_path, "full", 2 * stop_at, snapshot_steps=(2 * stop_at,))
    _, first_cb, ckpt, _ = run_to(tmp_path, "first", stop_at)
    assert first_cb.allocator.frozen == (stop_at > 20)
    _, resumed_cb, _, resumed_snap = run_to(tmp_path, "resumed", 2 * stop_at, ckpt_in=str(ckpt),
                                            snapshot_steps=(2 * stop_at,))
    full = torch.load(full_snap / f"step{2 * stop_at}.pt")
    resumed = torch.load(resumed_snap / f"step{2 * stop_at}.pt")
    assert full.keys() == resumed.keys() and len(full) == 12 * 4  # A, E, B, rank_mask
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    assert torch.equal(full_cb.allocator.exp_avg_ipt, resumed_cb.allocator.exp_avg_ipt)
    assert torch.equal(full_cb.allocator.exp_avg_unc, resumed_cb.allocator.exp_avg_unc)
    assert full_cb.allocator.frozen == resumed_cb.allocator.frozen


def test_weights_only_checkpoint_carries_the_masks(tmp_path):
    module, cb, ckpt, _ = run_to(tmp_path, "w", 24)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    masks = {k: v for k, v in state.items() if k.endswith("rank_mask")}
    assert len(masks) == 12 and sum(int(v.sum()) for v in masks.values()) == 12  # target_r=1 x 12


def test_bf16_mixed_runs_on_cpu(tmp_path):
    module = PlainClassifier(num_examples=32, batch_size=8)
    cb = AdaLoRACallback(target_modules=BERT_TARGETS, trainable_modules=TRAINABLE, init_r=3, target_r=1,
                         tinit=2, tfinal=4, delta_t=1)
    trainer = make_trainer(tmp_path, cb, max_epochs=3, precision="bf16-mixed", logger=False)
    trainer.fit(module)
    assert cb.allocator.frozen and sum(m.kept_rank for m in cb.allocator.layers) == 12
    assert cb.allocator.exp_avg_ipt.dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_inf_gradient_step_is_left_out_of_the_averages(tmp_path):
    """16-mixed on CPU with a GradScaler: an inf gradient at step 3 is skipped by the scaler and by the
    importance averages (they are identical before and after that step; the next step counts again)."""
    snapshots = {}

    class Snap(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            snapshots[trainer.global_step - 1] = (cb.allocator.exp_avg_ipt.clone(), cb.allocator.importance_steps)

    module = PlainClassifier(num_examples=32, batch_size=8, inf_grad_at_step=3)
    cb = AdaLoRACallback(target_modules=BERT_TARGETS, trainable_modules=TRAINABLE, init_r=3, target_r=1,
                         tinit=6, tfinal=2, delta_t=1, total_step=12)
    # Lightning maps precision="16-mixed" to bf16 on CPU; build the fp16 + GradScaler plugin explicitly.
    amp = pl.plugins.precision.MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = make_trainer(tmp_path, cb, max_steps=6, plugins=[amp], logger=False)
    trainer.callbacks.append(Snap())
    trainer.fit(module)
    # The scaler did not call optimizer.step() at step 3, so the importance hook never ran for it.
    assert [snapshots[step][1] for step in range(5)] == [1, 2, 3, 3, 4]
    assert torch.equal(snapshots[2][0], snapshots[3][0])  # step 3 left out
    assert not torch.equal(snapshots[3][0], snapshots[4][0])  # the next finite step counts
    assert torch.isfinite(cb.allocator.exp_avg_ipt).all() and torch.isfinite(cb.allocator.exp_avg_unc).all()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(tinit=10, tfinal=10, total_step=20), r"tinit \+ tfinal must be < total_step.*total_step=20"),
        (dict(init_r=2, target_r=4), r"target_r \(4\) must not exceed init_r \(2\)"),
        (dict(target_modules=["query_proj"]), r"target_modules \['query_proj'\] match no module"),
        (dict(tinit=1.5), r"tinit as a fraction of training must be in \[0, 1\), got 1.5"),
    ],
)
def test_bad_settings_fail_before_the_first_batch(tmp_path, kwargs, message):
    module = PlainClassifier(num_examples=32, batch_size=8)
    settings = dict(target_modules=BERT_TARGETS, trainable_modules=TRAINABLE, init_r=3, target_r=1, tinit=2,
                    tfinal=2)
    settings.update(kwargs)
    with pytest.raises(ValueError, match=message):
        cb = AdaLoRACallback(**settings)
        make_trainer(tmp_path, cb, max_epochs=5, logger=False).fit(module)
    assert module.losses == []  # no training batch ran


def test_orth_reg_weight_zero_and_regularizer_gradient(tmp_path):
    """At step 0 E = 0, so the task gives A no gradient: with weight 0 A's gradient is exactly zero, with
    weight w it is exactly w * dR/dA (the regularizer reaches a loss the callback never sees)."""
    from adalora_pl import orthogonal_regularizer

    seen = {}

    class Grab(pl.Callback):  # runs after the AdaLoRA callback, before the optimizer step
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            layers = cb.allocator.layers
            factors = [(m.lora_A, m.lora_B) for m in layers]
            with torch.enable_grad():
                expected = torch.autograd.grad(weight * orthogonal_regularizer(factors), layers[0].lora_A)[0]
            seen[weight] = (layers[0].lora_A.grad.clone(), expected)

    for weight in (0.0, 0.5):
        module = PlainClassifier(num_examples=8, batch_size=8)
        cb = AdaLoRACallback(target_modules=BERT_TARGETS, trainable_modules=TRAINABLE, init_r=3, target_r=1,
                             tinit=0, tfinal=0, total_step=10, orth_reg_weight=weight)
        trainer = make_trainer(tmp_path, cb, max_steps=1, logger=False)
        trainer.callbacks.append(Grab())
        trainer.fit(module)
    assert torch.count_nonzero(seen[0.0][0]) == 0
    assert torch.count_nonzero(seen[0.5][0]) > 0
    torch.testing.assert_close(seen[0.5][0], seen[0.5][1], rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("callback_class", [AdaLoRACallback, PruneLoRACallback], ids=["adalora", "prune-lora"])
def test_ddp_ranks_end_with_rank_zero_masks_even_with_other_scores(tmp_path, callback_class):
    """Two DDP processes; rank 1 scrambles its own importance before every allocation, so the masks it would
    compute differ from rank 0's. It still ends with rank 0's masks: they are broadcast at every mask event."""
    module = PlainClassifier(num_examples=32, batch_size=4)
    cb = callback_class(target_modules=BERT_TARGETS, trainable_modules=TRAINABLE, init_r=3, target_r=1,
                        tinit=2, tfinal=3, delta_t=1)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[PerturbedScoresOnRankOne(str(tmp_path)), cb, MaskWriter(str(tmp_path)),
                                    OrderlyDistributedTeardown()],
                         default_root_dir=tmp_path)
    trainer.fit(module)
    rank0 = json.loads((tmp_path / "masks_rank0.json").read_text())
    rank1 = json.loads((tmp_path / "masks_rank1.json").read_text())
    perturbed = json.loads((tmp_path / "perturbed_rank1.json").read_text())
    assert perturbed["events"] >= 5 and perturbed["differing"] >= 1  # rank 1's own masks were different
    assert rank0["masks"] == rank1["masks"]
    assert sum(sum(m) for m in rank0["masks"].values()) == 12  # target_r=1 x 12 adapters
    if callback_class is AdaLoRACallback:
        for name, mask in rank0["masks"].items():  # a pruned triplet has E == 0 on exit
            nonzero = rank0["nonzero_E"][name.replace("rank_mask", "lora_E")]
            assert all(keep or not nz for keep, nz in zip(mask, nonzero, strict=True)), name


def test_mask_broadcast_sends_a_tensor_not_a_pickle(monkeypatch):
    """The keep-mask goes through torch.distributed.broadcast as uint8 on the group's device."""
    import adalora_pl.allocator as callback_module

    sent = []
    monkeypatch.setattr(callback_module.dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(callback_module.dist, "broadcast", lambda t, src: sent.append((t.dtype, t.device, src)))
    keep = torch.tensor([True, False, True])
    assert torch.equal(callback_module.broadcast_keep_mask(keep), keep)
    assert sent == [(torch.uint8, torch.device("cpu"), 0)]


def test_tfinal_zero_model_at_the_end_has_the_ranks_of_the_pattern(tmp_path):
    """tfinal=0, delta_t=6 over 20 steps: the last mask event is step 18, step 19 trains masked triplets back.
    The model fit returns has E == 0 wherever rank_mask is False, and compaction does not change its output."""
    module = PlainClassifier(num_examples=40, batch_size=8)  # 5 batches x 4 epochs = 20 steps
    cb = AdaLoRACallback(target_modules=BERT_TARGETS, trainable_modules=TRAINABLE, init_r=4, target_r=2,
                         tinit=2, tfinal=0, delta_t=6)
    trainer = make_trainer(tmp_path, cb, max_epochs=4, enable_checkpointing=True)
    trainer.callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True))
    trainer.fit(module)
    assert not cb.allocator.frozen and cb.allocator.last_step == 19
    for name, layer in find_adapters(module).items():
        assert torch.count_nonzero(layer.lora_E[~layer.rank_mask]) == 0, name
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]  # written at the last epoch's end
    for key, mask in saved.items():
        if key.endswith("rank_mask"):
            assert torch.count_nonzero(saved[key.replace("rank_mask", "lora_E")][~mask]) == 0, key
    payload = json.loads((tmp_path / "logs" / "version_0" / "rank_pattern.json").read_text())
    assert payload["total_rank"] == sum(int((m.lora_E != 0).sum()) for m in find_adapters(module).values())
    ids = RandomTokens(8, seed=3).ids
    module.eval()
    with torch.no_grad():
        before = module.net(input_ids=ids).logits
        compact_adapters(module)
        after = module.net(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_evaluation_stages_restore_a_fit_checkpoint_into_a_plain_module(tmp_path, stage):
    """A fresh PlainClassifier (no adapters) + the callback: validate/test/predict with ckpt_path load the
    fit's adapters strictly; the allocator is built only for fit."""
    module = PlainClassifier(num_examples=16, batch_size=4)
    settings = dict(target_modules=BERT_TARGETS, trainable_modules=TRAINABLE, init_r=3, target_r=1, tinit=1,
                    tfinal=1)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = make_trainer(tmp_path, AdaLoRACallback(**settings), max_epochs=2, logger=False,
                           enable_checkpointing=True)
    trainer.callbacks.append(ckpt)
    trainer.fit(module)
    trained = {k: v.clone() for k, v in module.state_dict().items() if "lora_" in k or "rank_mask" in k}

    fresh, cb = PlainClassifier(num_examples=16, batch_size=4, seed=7), AdaLoRACallback(**settings)
    evaluator = make_trainer(tmp_path / stage, cb, logger=False)
    getattr(evaluator, stage)(fresh, ckpt_path=str(tmp_path / "last.ckpt"))
    restored = {k: v for k, v in fresh.state_dict().items() if "lora_" in k or "rank_mask" in k}
    assert restored.keys() == trained.keys() and len(restored) == 48
    assert all(torch.equal(restored[k], trained[k]) for k in trained)
    assert cb.allocator is None


@pytest.mark.parametrize("idempotent", [True, False])
def test_module_that_builds_its_model_in_configure_model(tmp_path, idempotent):
    """No target_modules: the preset is looked up on the model configure_model builds."""
    module = LazyClassifier(idempotent=idempotent, num_examples=16, batch_size=8)
    cb = AdaLoRACallback(init_r=3, target_r=1, tinit=1, tfinal=1)
    trainer = make_trainer(tmp_path, cb, max_epochs=2, logger=False)
    if not idempotent:
        with pytest.raises(RuntimeError, match="Make configure_model idempotent"):
            trainer.fit(module)
        return
    trainer.fit(module)
    assert len(cb.allocator.layers) == 12 and cb.allocator.frozen
    assert len(find_adapters(module.net)) == 12


def test_a_dtype_change_after_setup_keeps_float32_averages_and_trains(tmp_path):
    """The module turns float64 after the callback's setup: the allocator (built at fit start) reads the float64
    parameters, its averages stay float32, and regularizer, importance and masks work. Following the parameters to
    another device is tested where a device exists: tests/core/test_allocator.py (the meta device) and
    tests/lightning/test_gpu.py (CUDA)."""

    class MoveAfterSetup(pl.Callback):
        def setup(self, trainer, pl_module, stage):
            pl_module.double()

    module = PlainClassifier(num_examples=16, batch_size=8)
    module.training_step = lambda batch, *args: torch.nn.functional.cross_entropy(
        module.net(input_ids=batch["input_ids"]).logits, batch["labels"])
    cb = AdaLoRACallback(target_modules=BERT_TARGETS, trainable_modules=TRAINABLE, init_r=3, target_r=1,
                         tinit=1, tfinal=2, delta_t=1, total_step=8)
    trainer = make_trainer(tmp_path, cb, max_steps=8, logger=False)
    trainer.callbacks.append(MoveAfterSetup())
    trainer.fit(module)
    assert all(p.dtype == torch.float64 for p in cb.allocator.params)
    assert cb.allocator.exp_avg_ipt.dtype == torch.float32 and cb.allocator.frozen
    assert sum(m.kept_rank for m in cb.allocator.layers) == 12


def _fp16_trainer(tmp_path, cb, **kwargs):
    # Lightning maps precision="16-mixed" to bf16 on CPU; build the fp16 + GradScaler plugin explicitly.
    amp = pl.plugins.precision.MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    return make_trainer(tmp_path, cb, plugins=[amp], logger=False, **kwargs)


def test_fused_optimizer_under_fp16_sees_unscaled_gradients(tmp_path):
    """AdamW(fused=True) unscales inside its own step, so Lightning does not call unscale_: the callback does,
    and the regularizer and importance of step 0 equal those of a plain AdamW run."""
    seen = {}

    class Grab(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step == 1:
                alloc = next(c for c in trainer.callbacks if isinstance(c, AdaLoRACallback)).allocator
                seen[fused] = (alloc.exp_avg_ipt.clone(), alloc.exp_avg_unc.clone())

    for fused in (False, True):
        module = PlainClassifier(num_examples=16, batch_size=8, fused=fused)
        cb = AdaLoRACallback(target_modules=BERT_TARGETS, trainable_modules=TRAINABLE, init_r=3, target_r=1,
                             tinit=2, tfinal=1, total_step=6)
        trainer = _fp16_trainer(tmp_path, cb, max_steps=2)
        trainer.callbacks.append(Grab())
        trainer.fit(module)
        assert all(torch.isfinite(p).all() for p in module.parameters())
    assert seen[False][0].abs().max() > 0
    torch.testing.assert_close(seen[True][0], seen[False][0], rtol=1e-6, atol=0)
    torch.testing.assert_close(seen[True][1], seen[False][1], rtol=1e-6, atol=0)


def test_step_skipped_for_an_inf_in_the_head_is_left_out_of_the_averages(tmp_path):
    """The GradScaler skips step 3 for an inf in the classifier's gradient (adapter gradients are finite):
    the importance averages do not move at that step."""
    snapshots = {}

    class Snap(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            snapshots[trainer.global_step - 1] = cb.allocator.exp_avg_ipt.clone()

    module = PlainClassifier(num_examples=32, batch_size=8, inf_grad_at_step=3, inf_grad_param="classifier.weight")
    cb = AdaLoRACallback(target_modules=BERT_TARGETS, trainable_modules=TRAINABLE, init_r=3, target_r=1,
                         tinit=6, tfinal=2, delta_t=1, total_step=12)
    trainer = _fp16_trainer(tmp_path, cb, max_steps=6)
    trainer.callbacks.append(Snap())
    trainer.fit(module)
    assert torch.equal(snapshots[2], snapshots[3])  # step 3 left out
    assert not torch.equal(snapshots[3], snapshots[4]) and not torch.equal(snapshots[1], snapshots[2])


def test_training_step_returning_none_leaves_the_averages_alone(tmp_path):
    snapshots = {}

    class Snap(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            snapshots[trainer.global_step - 1] = cb.allocator.exp_avg_ipt.clone()

    module = PlainClassifier(num_examples=32, batch_size=8, skip_steps=(2,))
    cb = AdaLoRACallback(target_modules=BERT_TARGETS, trainable_modules=TRAINABLE, init_r=3, target_r=1,
                         tinit=6, tfinal=2, delta_t=1, total_step=12)
    trainer = make_trainer(tmp_path, cb, max_steps=4, logger=False)
    trainer.callbacks.append(Snap())
    trainer.fit(module)
    assert torch.equal(snapshots[1], snapshots[2]) and snapshots[2].abs().max() > 0
    assert not torch.equal(snapshots[2], snapshots[3])


def test_bf16_true_trainer_keeps_float32_adapters(tmp_path):
    """A "bf16-true" Trainer converts the whole module after setup; adapters go back to float32 (the base stays
    bf16) and train; with autocast_adapter_dtype=False they stay bf16."""
    for autocast in (True, False):
        module = PlainClassifier(num_examples=16, batch_size=8)
        module.training_step = lambda batch, *args, m=module: torch.nn.functional.cross_entropy(
            m.net(input_ids=batch["input_ids"]).logits.float(), batch["labels"])
        cb = AdaLoRACallback(target_modules=BERT_TARGETS, trainable_modules=TRAINABLE, init_r=3, target_r=1,
                             tinit=1, tfinal=1, total_step=6, autocast_adapter_dtype=autocast)
        trainer = make_trainer(tmp_path, cb, max_steps=6, precision="bf16-true", logger=False)
        trainer.fit(module)
        layer = cb.allocator.layers[0]
        assert layer.base_layer.weight.dtype == torch.bfloat16
        expected = torch.float32 if autocast else torch.bfloat16
        assert {p.dtype for p in cb.allocator.params} == {expected}
        assert cb.allocator.frozen and torch.count_nonzero(layer.lora_E) > 0


def test_mask_events_log_ranks_and_setup_logs_the_schedule(tmp_path, caplog):
    from lightning.pytorch.loggers.logger import DummyLogger

    class Recorder(DummyLogger):
        def __init__(self):
            super().__init__()
            self.records = []

        def log_metrics(self, metrics, step=None):
            self.records.append((step, dict(metrics)))

    ranks_after = {}

    class Ranks(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            ranks_after[trainer.global_step] = cb.allocator.kept_ranks()

    module = PlainClassifier(num_examples=32, batch_size=8)  # 4 batches x 5 epochs = 20 steps
    cb = AdaLoRACallback(target_modules=BERT_TARGETS, trainable_modules=TRAINABLE, init_r=3, target_r=1,
                         tinit=2, tfinal=6, delta_t=4)
    recorder = Recorder()
    trainer = make_trainer(tmp_path, cb, max_epochs=5, logger=recorder, log_every_n_steps=1)
    trainer.callbacks.append(Ranks())
    with caplog.at_level("INFO"):
        trainer.fit(module)
    assert ("AdaLoRA schedule: b0=36 -> bT=12 triplets; T=20 optimizer steps, tinit=2, tfinal=6 "
            "(pattern frozen at step 14), delta_t=4; 12 adapters") in caplog.text
    events = {step: m for step, m in recorder.records if "adalora/total_rank" in m}
    assert sorted(events) == [5, 9, 13, 15]  # steps 4, 8, 12 and the final step 14, logged after them
    for step, metrics in events.items():
        per_layer = {k.removeprefix("adalora_rank/"): v for k, v in metrics.items() if k.startswith("adalora_rank/")}
        assert per_layer == {k: float(v) for k, v in ranks_after[step].items()} and len(per_layer) == 12
        assert metrics["adalora/total_rank"] == sum(per_layer.values())
        assert metrics["adalora/total_rank"] <= cb.allocator.schedule.budget_at(step - 1)
    assert events[15]["adalora/total_rank"] == 12.0 and events[15]["adalora/mask_threshold"] > 0


def test_per_layer_ranks_are_logged_at_the_trainers_rate(tmp_path):
    """delta_t=1 masks at every step of the cubic phase; with log_every_n_steps=4 the per-layer ranks reach the
    logger at the first mask event, then at the first event at least 4 steps after the last logged one, and at
    the event that fixes the pattern: not at every event."""
    from lightning.pytorch.loggers.logger import DummyLogger

    class Recorder(DummyLogger):
        def __init__(self):
            super().__init__()
            self.steps = []

        def log_metrics(self, metrics, step=None):
            if "adalora/total_rank" in metrics:
                self.steps.append(step)

    module = PlainClassifier(num_examples=32, batch_size=8)  # 20 steps; cubic phase steps 3..14, fixed at 14
    cb = AdaLoRACallback(target_modules=BERT_TARGETS, trainable_modules=TRAINABLE, init_r=3, target_r=1,
                         tinit=2, tfinal=6, delta_t=1)
    recorder = Recorder()
    make_trainer(tmp_path, cb, max_epochs=5, logger=recorder, log_every_n_steps=4).fit(module)
    # Events at steps 3..14 (logged with global_step = step + 1): 3, 7, 11 on the grid, 14 the final one.
    assert recorder.steps == [4, 8, 12, 15]


@pytest.mark.parametrize("strategy_class", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_fsdp1_and_deepspeed_are_refused_at_setup_naming_the_strategy_that_works(strategy_class):
    from types import SimpleNamespace

    import lightning.pytorch.strategies as strategies

    strategy = object.__new__(getattr(strategies, strategy_class))  # no process group or deepspeed needed
    cb = AdaLoRACallback(target_modules=BERT_TARGETS)
    with pytest.raises(RuntimeError, match=f"does not support {strategy_class}: use ModelParallelStrategy"):
        cb.setup(SimpleNamespace(strategy=strategy), PlainClassifier(), "fit")


def test_a_failing_report_does_not_fail_the_fit(tmp_path, monkeypatch):
    import adalora_pl.io.report

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts on this machine")

    monkeypatch.setattr(adalora_pl.io.report, "save_rank_heatmap", broken)
    module = PlainClassifier(num_examples=16, batch_size=8)
    cb = AdaLoRACallback(target_modules=BERT_TARGETS, trainable_modules=TRAINABLE, init_r=3, target_r=1,
                         tinit=1, tfinal=1)
    with pytest.warns(UserWarning, match="could not draw the allocation report.*no fonts on this machine"):
        make_trainer(tmp_path, cb, max_epochs=2).fit(module)
    assert (tmp_path / "logs" / "version_0" / "rank_pattern.json").is_file()


def test_rank_pattern_file_names_the_written_pattern(tmp_path):
    module = PlainClassifier(num_examples=16, batch_size=8)
    cb = AdaLoRACallback(target_modules=BERT_TARGETS, trainable_modules=TRAINABLE, init_r=3, target_r=1,
                         tinit=1, tfinal=1, rank_pattern_file="ranks_of_this_run.json")
    make_trainer(tmp_path, cb, max_epochs=2).fit(module)
    log_dir = tmp_path / "logs" / "version_0"
    assert not (log_dir / "rank_pattern.json").exists()
    payload = json.loads((log_dir / "ranks_of_this_run.json").read_text())
    assert payload["total_rank"] == 12 == sum(m.kept_rank for m in cb.allocator.layers)
    assert {n: e["mask"] for n, e in payload["modules"].items()} == cb.allocator.rank_pattern()
