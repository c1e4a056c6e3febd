"""On CUDA (skipped elsewhere, also under ADALORA_NO_SKIP): the GLUE module with the callback in 16-mixed and
bf16-mixed, a resume and an export; a user's module with fused AdamW under fp16. ``benchmarks/gpu_check.py`` runs
these on a lent GPU."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from adalora_pl import AdaLoRACallback, find_adapters, load_adapter
from adalora_pl.cli import main
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


FACTORS = ("lora_A", "lora_E", "lora_B")


def assert_export_holds_the_model(fmt: str, folder: Path, model, backbone: str) -> None:
    """The folder ``cli.py export --format fmt`` wrote for the trained (CUDA) ``model`` holds that model: the format's
    files, loadable by their own loaders on the CPU, with exactly the adapters (A, E, B and masks; PEFT: the kept
    triplets) and trained heads of ``model``, or (merged) base weights with the adapters folded in."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    adapters = find_adapters(model)
    assert adapters
    ours = {path: {name: getattr(layer, name).detach().cpu() for name in FACTORS} for path, layer in adapters.items()}
    masks = {path: layer.rank_mask.cpu() for path, layer in adapters.items()}
    heads = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n}
    assert heads  # the classifier and pooler train in full
    files = {path.name for path in folder.iterdir()}
    if fmt == "adapter":
        assert {"adapter.safetensors", "adapter_config.json"} <= files, files
        base = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=2)
        loaded = load_adapter(base, folder)
        loaded_adapters = find_adapters(loaded)
        assert sorted(loaded_adapters) == sorted(adapters)
        for path, layer in loaded_adapters.items():
            assert torch.equal(layer.rank_mask, masks[path]), path
            for name in FACTORS:
                assert torch.equal(getattr(layer, name), ours[path][name]), (path, name)
        params = dict(loaded.named_parameters())
        assert all(torch.equal(params[n], value) for n, value in heads.items())
    elif fmt == "peft":
        from peft import PeftModel

        assert {"adapter_config.json", "adapter_model.safetensors"} <= files, files
        stored = load_file(str(folder / "adapter_model.safetensors"))
        for path, factors in ours.items():
            keep = masks[path]
            kept = {"lora_A": factors["lora_A"][keep], "lora_E": factors["lora_E"][keep],
                    "lora_B": factors["lora_B"][:, keep]}
            for name, value in kept.items():
                assert torch.equal(stored[f"base_model.model.{path}.{name}"], value), (path, name)
        # PEFT loads it (float32 base: no rounding on the way) into layers of the kept ranks.
        base = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=2)
        loaded = PeftModel.from_pretrained(base, str(folder))
        peft_adapters = {n.removeprefix("base_model.model."): m for n, m in loaded.named_modules()
                         if n.removeprefix("base_model.model.") in ours}
        assert sorted(peft_adapters) == sorted(ours)
        for path, layer in peft_adapters.items():
            keep = masks[path]
            assert torch.equal(layer.lora_A["default"], ours[path]["lora_A"][keep]), path
            assert torch.equal(layer.lora_E["default"], ours[path]["lora_E"][keep]), path
            assert torch.equal(layer.lora_B["default"], ours[path]["lora_B"][:, keep]), path
    else:
        assert {"config.json", "model.safetensors"} <= files, files
        merged = AutoModelForSequenceClassification.from_pretrained(folder)
        assert not any("lora" in n for n, _ in merged.named_parameters())
        for path, layer in adapters.items():
            # The merge runs on the CPU in float32: W + B (A * E) * alpha / (ranknum + 1e-5), rounded once.
            f = ours[path]
            delta = f["lora_B"] @ (f["lora_A"] * f["lora_E"]) * layer.lora_alpha / (layer.ranknum.cpu() + 1e-5)
            expected = layer.base_layer.weight.detach().cpu() + delta
            assert torch.equal(merged.get_submodule(path).weight, expected), path
        params = dict(merged.named_parameters())
        assert all(torch.equal(params[n], value) for n, value in heads.items())


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
        assert_export_holds_the_model(fmt, tmp_path / fmt, resumed.model.model, tiny_backbone)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_fused_kernel_fit_on_cuda(tmp_path, tiny_backbone, precision):
    """``--model.kernel fused`` on CUDA under autocast: every adapter computes with it, the fit reaches the budget
    with the masked triplets zero and the pattern declared final (kept triplets only)."""
    data = write_cola(tmp_path / "CoLA")
    run = _fit(tmp_path / "fused", tiny_backbone, data, precision, "--trainer.max_epochs", "2",
               "--model.kernel", "fused")
    assert run.trainer.global_step == 12
    layers = find_adapters(run.model).values()
    assert {layer.kernel for layer in layers} == {"fused"}
    assert sum(int(layer.rank_mask.sum()) for layer in layers) == 12
    for layer in layers:
        assert layer._kept_index is not None and layer._kept_index.device.type == "cuda"
        assert torch.count_nonzero(layer.lora_E[~layer.rank_mask]) == 0


def test_fused_kernel_matches_the_reference_on_cuda_in_bf16_autocast():
    """One layer on CUDA: the fused kernel under bf16 autocast within bfloat16 rounding of the reference's output,
    and float32 gradients of the factors close to the reference's."""
    import copy

    from adalora_pl import SVDLinear, set_kernel

    torch.manual_seed(0)
    reference = SVDLinear(torch.nn.Linear(256, 384), r=8, lora_alpha=16).cuda()
    with torch.no_grad():
        reference.lora_E.normal_()
    fused = copy.deepcopy(reference)
    set_kernel([fused], "fused")
    x = torch.randn(4, 64, 256, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected, out = reference(x), fused(x)
    assert type(out.grad_fn).__name__ == "_AdaptedLinearBackward"
    scale = float(expected.detach().float().abs().max())
    torch.testing.assert_close(out.float(), expected.float(), rtol=0, atol=4 * 2**-8 * scale)
    expected.float().sum().backward()
    out.float().sum().backward()
    for name in ("lora_A", "lora_E", "lora_B"):
        g_ref, g_fused = getattr(reference, name).grad, getattr(fused, name).grad
        assert g_fused.dtype == torch.float32
        torch.testing.assert_close(g_fused, g_ref, rtol=0.05, atol=0.05 * float(g_ref.abs().max()))


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


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_gradient_svd_start_on_cuda(tmp_path, precision):
    """The gradient-SVD start under autocast (16-mixed: the loss scaled by the GradScaler's scale, the gradient
    unscaled): orthonormal factors on the GPU, E = 0 at the start, a finite fit to the budget."""
    module = PlainClassifier(num_examples=32, batch_size=8)
    starts = {}

    class Peek(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            starts.update({n: (m.lora_A.detach().clone(), m.lora_B.detach().clone(), m.lora_E.detach().clone())
                           for n, m in find_adapters(pl_module).items()})

    cb = AdaLoRACallback(target_modules=BERT_TARGETS, trainable_modules=["classifier", "pooler"], init_r=3,
                         target_r=1, tinit=2, tfinal=3, delta_t=1, adapter_init="gradient_svd", gradient_init_batches=2)
    trainer = pl.Trainer(accelerator="gpu", devices=1, precision=precision, max_epochs=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, callbacks=[cb, Peek()],
                         default_root_dir=tmp_path)
    trainer.fit(module)
    for name, (a, b, e) in starts.items():
        assert a.device.type == "cuda" and torch.count_nonzero(e) == 0
        eye = torch.eye(3, device=a.device)
        torch.testing.assert_close(a @ a.T, eye, rtol=0, atol=1e-4, msg=name)
        torch.testing.assert_close(b.T @ b, eye, rtol=0, atol=1e-4, msg=name)
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


def test_fsdp1_on_cuda_is_refused_naming_the_strategy_that_works(tmp_path):
    """FSDPStrategy (FSDP1) flattens parameters; the callback refuses it at setup, before any step, naming
    ModelParallelStrategy."""
    module = PlainClassifier(num_examples=16, batch_size=8)
    cb = AdaLoRACallback(target_modules=BERT_TARGETS, trainable_modules=["classifier", "pooler"], init_r=3, target_r=1,
                         tinit=1, tfinal=1)
    trainer = pl.Trainer(accelerator="gpu", devices=1, strategy="fsdp", max_steps=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path,
                         callbacks=[cb])
    with pytest.raises(RuntimeError, match="does not support FSDPStrategy: use ModelParallelStrategy"):
        trainer.fit(module)
    assert module.losses == []


def test_model_parallel_strategy_on_cuda_reaches_the_budget(tmp_path):
    """The GLUE module sharded by ModelParallelStrategy (FSDP2, NCCL) on the GPUs there are."""
    import subprocess
    import sys

    from tests.builders import save_tiny_backbone

    backbone = save_tiny_backbone(tmp_path / "bb")
    devices = torch.cuda.device_count()
    command = [sys.executable, str(REPO_ROOT / "tests" / "lightning" / "model_parallel_fit.py"), "--backbone",
               backbone, "--out", str(tmp_path / "run"), "--devices", str(devices), "--accelerator", "cuda",
               "--strategy", "model_parallel"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "rank0.json").read_text())
    assert report["sharded"] and sum(report["ranks"].values()) == 12 and report["adapter_dtypes"] == ["torch.float32"]
