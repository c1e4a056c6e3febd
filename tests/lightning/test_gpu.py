"""On CUDA (skipped elsewhere, also under ADALORA_NO_SKIP): the GLUE module with the callback in 16-mixed and
bf16-mixed, a resume and an export; a user's module with fused AdamW under fp16. ``benchmarks/gpu_check.py`` runs
these on a lent GPU."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from adalora_pl import AdaLoRACallback, find_adapters
from cli import main
from tests.builders import BERT_TARGETS, REPO_ROOT, write_cola
from tests.lightning_modules import PlainClassifier

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _fit(root: Path, backbone: str, data: Path, precision: str, *extra: str):
    return main([
        "fit", "--config", str(REPO_ROOT / "configs" / "cola.yaml"),
        "--model.backbone", backbone, "--data.data_dir", str(data), "--data.batch_size", "8",
        "--model.tinit", "2", "--model.tfinal", "4", "--model.delta_t", "1", "--model.total_step", "12",
        "--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.precision", precision,
        "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false", *extra,
    ])


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_glue_fit_resume_and_export_on_cuda(tmp_path, tiny_backbone, precision):
    data = write_cola(tmp_path / "CoLA")
    first = _fit(tmp_path / "first", tiny_backbone, data, precision, "--trainer.max_epochs", "1")
    allocator = next(c for c in first.trainer.callbacks if isinstance(c, AdaLoRACallback)).allocator
    assert allocator.exp_avg_ipt.device.type == "cuda" and first.trainer.global_step == 6
    ckpt = Path(first.trainer.log_dir) / "checkpoints" / "last.ckpt"

    resumed = _fit(tmp_path / "resumed", tiny_backbone, data, precision, "--trainer.max_epochs", "2",
                   "--ckpt_path", str(ckpt))
    callback = next(c for c in resumed.trainer.callbacks if isinstance(c, AdaLoRACallback))
    assert resumed.trainer.global_step == 12 and callback.allocator.frozen
    pattern = json.loads((Path(resumed.trainer.log_dir) / "rank_pattern.json").read_text())
    assert pattern["total_rank"] == 12
    for layer in find_adapters(resumed.model).values():
        assert layer.lora_A.device.type == "cuda" and layer.lora_A.dtype == torch.float32
        assert torch.count_nonzero(layer.lora_E[~layer.rank_mask]) == 0

    final = Path(resumed.trainer.log_dir) / "checkpoints" / "last.ckpt"
    for fmt in ("adapter", "peft", "merged"):
        main(["export", "--ckpt_path", str(final), "--format", fmt, "--output", str(tmp_path / fmt)])
        assert any((tmp_path / fmt).iterdir())


def test_fused_adamw_fp16_on_cuda(tmp_path):
    module = PlainClassifier(num_examples=32, batch_size=8, fused=True)
    cb = AdaLoRACallback(target_modules=BERT_TARGETS, trainable_modules=["classifier", "pooler"], init_r=3,
                         target_r=1, tinit=2, tfinal=3, delta_t=1)
    trainer = pl.Trainer(accelerator="gpu", devices=1, precision="16-mixed", max_epochs=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, callbacks=[cb],
                         default_root_dir=tmp_path)
    trainer.fit(module)
    assert cb.allocator.exp_avg_ipt.device.type == "cuda" and cb.allocator.frozen
    assert sum(m.kept_rank for m in cb.allocator.layers) == 12
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_decoder_llm_bf16_base_with_checkpointing_on_cuda(tmp_path):
    """The LLM path as users run it: bfloat16 base weights, float32 adapters, bf16-mixed autocast, gradient
    checkpointing, generation-based validation, then the PEFT export."""
    from tests.builders import save_tiny_causal_lm, write_jsonl

    backbone = save_tiny_causal_lm(tmp_path / "llama", "llama")
    rows = [{"document": "the cat sat on the mat and the dog ran", "summary": "the cat sat"}] * 8
    data = write_jsonl(tmp_path / "xsum.jsonl", rows)
    cli = main([
        "fit", "--config", str(REPO_ROOT / "configs" / "smollm2_xsum.yaml"),
        "--model.backbone", backbone, "--data.dataset_name", "null", "--data.train_file", str(data),
        "--data.validation_file", str(data), "--data.max_seq_length", "48", "--data.batch_size", "2",
        "--model.init_r", "4", "--model.target_r", "2", "--model.delta_t", "1", "--model.max_new_tokens", "4",
        "--model.torch_dtype", "bfloat16", "--model.gradient_checkpointing", "true",
        "--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.precision", "bf16-mixed",
        "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.enable_progress_bar", "false",
    ])
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["val/loss"]) and "val/rougeL" in metrics
    for layer in find_adapters(cli.model).values():
        assert layer.lora_A.device.type == "cuda" and layer.lora_A.dtype == torch.float32
        assert layer.base_layer.weight.dtype == torch.bfloat16
    ckpt = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    main(["export", "--ckpt_path", str(ckpt), "--format", "peft", "--output", str(tmp_path / "peft")])
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
