"""On CUDA (skipped elsewhere, also under ADALORA_NO_SKIP): what the CPU tests of tests/quant cannot prove, because
bitsandbytes runs other code there. On the CPU, bitsandbytes 0.50 dequantizes each 4-bit weight and runs a plain
matmul, and LLM.int8() has no outlier decomposition; on CUDA the fused 4-bit kernels, the int8 matmul with its
fp16 outlier columns and the CUDA 8-bit optimizer run. ``benchmarks/gpu_check.py`` runs this file on a lent GPU.

Checked on the tiny Llama of tests/builders.py, loaded by ``CausalLMModule(quantization=...)`` on the GPU: a short fit
with the callback in bf16-mixed reaches the budget and leaves every base tensor bit-identical; ``adamw8bit`` keeps
8-bit moments on the device; and merging a trained nf4 model gives the logits of the adapted model.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from adalora_pl.injection import find_adapters
from adalora_pl.tasks.causal_lm_module import CausalLMModule
from datamodules.instruction import InstructionDataModule
from tests.builders import QUANTIZED_BASES

# The CPU tests' schedule and module builder; the tiny Llama and its data are fixtures of tests/quant/conftest.py.
from tests.quant.test_quantized_modules import LAYERS, SCHEDULE, build

pytest.importorskip("bitsandbytes")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BNB_KINDS = [k for k in QUANTIZED_BASES if QUANTIZED_BASES[k][0] in ("nf4", "fp4", "int8")]


def fit(tmp_path, module: CausalLMModule, data: InstructionDataModule) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=4, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=data)
    return trainer


def base_state(module: CausalLMModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()
            if not any(part in k for part in (".lora_", ".ranknum", ".rank_mask"))}


@pytest.mark.parametrize("kind_id", BNB_KINDS)
def test_a_fit_on_cuda_kernels_reaches_the_budget_and_leaves_the_base_bit_identical(tmp_path, llama, data, kind_id):
    module = build(llama, kind_id)
    adapters = find_adapters(module.model)
    weight = next(iter(adapters.values())).base_layer.weight
    assert weight.device.type == "cuda"  # quantized as it loaded, on the GPU: the CUDA kernels run
    before = base_state(module)
    fit(tmp_path, module, data)
    assert sum(int(a.rank_mask.sum()) for a in adapters.values()) == SCHEDULE["target_r"] * LAYERS
    assert all(a.lora_E.dtype == torch.float32 and torch.isfinite(a.lora_E).all() for a in adapters.values())
    after = base_state(module)
    assert [k for k in before if not torch.equal(before[k], after[k])] == []


def test_adamw8bit_on_cuda_keeps_8bit_moments_on_the_device(tmp_path, llama, data):
    module = build(llama, "nf4", optimizer="adamw8bit", trainable_modules=["lm_head"], head_learning_rate=1e-3)
    head = module.model.lm_head.weight
    start = head.detach().clone()
    trainer = fit(tmp_path, module, data)
    state = trainer.optimizers[0].state[head]
    assert state["state1"].dtype == torch.uint8 and state["state1"].device.type == "cuda"
    assert not torch.equal(start, head.detach())


def test_merged_nf4_model_on_cuda_gives_its_logits(tmp_path, llama, data):
    """``merge_adapters`` on a model trained on the GPU (each nf4 weight dequantized, the update added in float32)
    gives a plain float32 model whose logits, on the CPU, equal the trained nf4-plus-adapters model's on the GPU up to
    the kernels' summation order: both multiply by the same dequantized weights in float32 (compute dtype float32),
    so what differs is a few float32 ulps per dot product, through two blocks (the CPU test derives the bound per
    layer; here the logits are checked at the unquantized merge test's tolerance, 1e-5, times ten for the CUDA
    kernels' blocking)."""
    from adalora_pl import merge_adapters

    module = build(llama, "nf4", quantization_compute_dtype="float32")
    fit(tmp_path, module, data)
    model = module.model.eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(input_ids=ids.cuda()).logits.float().cpu()
        merged = merge_adapters(model).to("cpu").float()
        assert not find_adapters(merged)
        theirs = merged(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
