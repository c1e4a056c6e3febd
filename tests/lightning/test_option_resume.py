"""A fit with the opt-in options (per-factor learning rates, rsLoRA scaling, the weight-SVD and gradient-SVD starts)
resumes bitwise from its adapter-only checkpoint, and ``cli.py export`` of that checkpoint (which rebuilds the module: a
new SVD, the same residual) gives the trained model's outputs in every format. LoRA at a rank pattern resumes bitwise
too."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from adalora_pl.io.checkpoint import WEIGHTS_KEY, export_checkpoint
from adalora_pl.tasks.glue_module import GLUEClassifier
from tests.builders import assert_same_optimizer_state, logits, make_batch, write_cola
from tests.io.test_export import peft_noise
from tests.lightning.test_adapter_checkpoints import EpochOrderedGLUE, read, trained_keys

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 16 rows in batches of 4: 4 steps an epoch; the budget falls from step 2 to step 12 (total 16 - tfinal 4).
SCHEDULE = dict(task_name="cola", init_r=3, target_r=1, tinit=2, tfinal=4, delta_t=1, total_step=16,
                warmup_steps=2, learning_rate=5e-3)
OPTIONS = {
    "adalora": dict(lr_ratio_b=4.0, lr_ratio_e=2.0, scaling="alpha_over_sqrt_r", adapter_init="weight_svd"),
    "lora": dict(method="lora", lr_ratio_b=8.0, scaling="alpha_over_sqrt_r"),
    # The start runs once, in the uninterrupted and the first run; the resumed one takes A and B from the checkpoint.
    "adalora_gradient": dict(adapter_init="gradient_svd", gradient_init_batches=2, lr_ratio_b=4.0, lr_ratio_e=2.0),
}


def fit_epochs(tmp_path: Path, name: str, backbone: str, data: Path, epochs: int, settings: dict,
               ckpt_path: Path | None = None):
    """A GLUEClassifier fit with ``settings`` to ``epochs`` (resumed from ``ckpt_path``); (module, trainer,
    last.ckpt)."""
    pl.seed_everything(0)
    module = GLUEClassifier(backbone=backbone, **{**SCHEDULE, **settings})
    datamodule = EpochOrderedGLUE(task_name="cola", tokenizer=backbone, data_dir=str(data), batch_size=4,
                                  max_seq_length=32)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_progress_bar=False,
        enable_model_summary=False, deterministic=True, limit_val_batches=0, num_sanity_val_steps=0,
        default_root_dir=tmp_path / name,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / name, save_last=True, save_on_train_epoch_end=True)],
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return module, trainer, tmp_path / name / "last.ckpt"


def lora_pattern(tmp_path: Path, backbone: str) -> dict:
    """A rank pattern over the tiny BERT's 12 matrices (ranks 0 to 3), as an AdaLoRA fit writes it."""
    probe = GLUEClassifier(backbone=backbone, **{**SCHEDULE, "method": "lora"})
    modules = {f"model.{path}": {"rank": i % 4, "mask": [j < i % 4 for j in range(3)] + [False] * (i % 4 == 3)}
               for i, path in enumerate(probe.adapters)}
    path = tmp_path / "rank_pattern.json"
    path.write_text(json.dumps({"total_rank": sum(m["rank"] for m in modules.values()), "modules": modules}))
    return {"rank_pattern": str(path)}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(OPTIONS))
@peft_noise
def test_a_fit_with_the_options_resumes_bitwise(tmp_path, tiny_backbone, kind):
    """Stop at 8 steps (mid-schedule), resume to 16: adapters, masks, heads, the residual base, importance averages
    and every optimizer group (with its own learning rate) equal an uninterrupted run's."""
    settings = dict(OPTIONS[kind])
    if kind == "lora":
        settings.update(lora_pattern(tmp_path, tiny_backbone))
    data = write_cola(tmp_path / "CoLA", rows=16)
    whole, whole_trainer, _ = fit_epochs(tmp_path, "whole", tiny_backbone, data, 4, settings)
    _, first_trainer, ckpt = fit_epochs(tmp_path, "first", tiny_backbone, data, 2, settings)
    assert first_trainer.global_step == 8 and read(ckpt)[WEIGHTS_KEY] == "adapters"
    resumed, resumed_trainer, _ = fit_epochs(tmp_path, "resumed", tiny_backbone, data, 4, settings, ckpt_path=ckpt)
    assert whole_trainer.global_step == resumed_trainer.global_step == 16

    expected, got = whole.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:  # the trained tensors and the frozen (residual) base alike
        assert torch.equal(expected[key], got[key]), key
    assert trained_keys(whole)
    groups_a = whole_trainer.optimizers[0].param_groups
    groups_b = resumed_trainer.optimizers[0].param_groups
    assert [g["lr"] for g in groups_a] == [g["lr"] for g in groups_b]
    assert len(groups_a) == (3 if kind == "lora" else 4)  # A, B, (E,) heads
    assert_same_optimizer_state(whole_trainer, resumed_trainer)
    if kind != "lora":
        a, b = whole.schedule_callback.allocator, resumed.schedule_callback.allocator
        assert torch.equal(a.exp_avg_ipt, b.exp_avg_ipt) and torch.equal(a.exp_avg_unc, b.exp_avg_unc)
        check_exports(tmp_path, whole, tmp_path / "whole" / "last.ckpt", tiny_backbone)


def check_exports(tmp_path: Path, module: GLUEClassifier, ckpt: Path, backbone: str) -> None:
    """Every ``cli.py export`` format of the checkpoint gives the trained model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from adalora_pl.io.adapter import load_adapter

    batch = make_batch()
    expected = logits(module.model, batch)
    fresh = AutoModelForSequenceClassification.from_pretrained(backbone).eval()
    for fmt in ("adapter", "peft", "lora", "merged"):
        out = export_checkpoint(ckpt, fmt, tmp_path / f"export_{fmt}")
        if fmt == "merged":
            model = AutoModelForSequenceClassification.from_pretrained(out)
        elif fmt == "adapter":
            model = load_adapter(copy.deepcopy(fresh), out)
        else:  # PEFT loads onto the ORIGINAL pretrained weights
            model = PeftModel.from_pretrained(copy.deepcopy(fresh), str(out))
        torch.testing.assert_close(logits(model, batch), expected, rtol=1e-5, atol=1e-5, msg=fmt)
