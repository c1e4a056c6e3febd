"""``benchmarks/step_time.py --smoke`` runs end to end and writes the ratios (no timing asserts).

It runs in a subprocess: the CPU memory measurement pins glibc's malloc thresholds for the whole process,
which should not leak into the rest of the test session.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from adalora_pl import find_adapters, orthogonal_regularizer
from tests.builders import REPO_ROOT

pytest.importorskip("peft")

SCRIPT = REPO_ROOT / "benchmarks" / "step_time.py"
VARIANTS = ["frozen", "peft_lora", "peft_adalora", "lora", "adalora", "adalora_final", "adalora_unfused"]


def test_step_time_smoke_writes_finite_ratios(tmp_path):
    out = tmp_path / "step_time.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--quiet", "--variants", ",".join(VARIANTS), "--json", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "adalora_vs_peft_adalora" in proc.stdout  # the printed table
    data = json.loads(out.read_text())
    for key in ("adalora_vs_peft_adalora", "adalora_vs_lora", "peak_mem_vs_peft_adalora"):
        value = data["ratios"][key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    assert data["ratios"] == data["models"]["tiny"]["ratios"]
    variants = data["models"]["tiny"]["variants"]
    assert list(variants) == VARIANTS
    for name, result in variants.items():
        assert result["median_s"] > 0 and len(result["times_s"]) == data["config"]["steps"], name
        assert result["peak_mem_bytes"] is not None, name
    # Same initial rank: our adapters train as many parameters as PEFT's.
    assert variants["adalora"]["trainable_params"] == variants["peft_adalora"]["trainable_params"]
    assert variants["lora"]["trainable_params"] == variants["peft_lora"]["trainable_params"]
    # The final phase ran compacted: pruned triplets dropped, fewer trainable parameters.
    assert "compacted" in variants["adalora_final"]["note"]
    assert variants["adalora_final"]["trainable_params"] < variants["adalora"]["trainable_params"]


def test_gpu_check_smoke_fits_resumes_and_exports_on_cpu(tmp_path):
    """The GPU script's fit-resume-export path, on the CPU with a tiny model (the GPU parts need a lent GPU)."""
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_check.py"), "--smoke"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OUT": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [f["precision"] for f in report["fits"]] == ["bf16-mixed", "16-mixed"]
    for fit in report["fits"]:
        assert fit["steps"] == 8 and fit["total_rank"] == fit["target_budget"] == 12
        assert fit["masked_triplets_zero"] and fit["adapter_dtype"] == "torch.float32"
    assert (tmp_path / "gpu_check_work" / "bf16-mixed" / "peft" / "adapter_config.json").is_file()


def _step_time():
    """benchmarks/step_time.py as a module (it puts the repo and benchmarks/ on the path itself)."""
    from benchmarks import step_time

    return step_time


def test_step_time_unfused_variants_switch_their_own_layers_only():
    """``*_unfused`` turns the one-pass add off on its own adapter layers, not for the whole process: the fused
    variants built beside it keep it."""
    step_time = _step_time()
    args = step_time.parse_args(["--smoke", "--variants", "lora,lora_unfused,adalora,adalora_unfused"])
    base = step_time.build_base("tiny")
    variants = {name: step_time.build_variant(name, base, args, torch.device("cpu")) for name in args.variants}
    fusion = {name: {layer.fuse_residual_add for layer in find_adapters(v.model).values()}
              for name, v in variants.items()}
    assert fusion == {"lora": {True}, "lora_unfused": {False}, "adalora": {True}, "adalora_unfused": {False}}
    for variant in variants.values():
        variant.step()  # each runs with its own setting, in any order


def test_step_time_grad_mode_adds_the_regularizer_gradient_of_the_library():
    """``--orth-mode grad`` adds ``weight * dR/dA, dR/dB`` after backward (the callback's way): the same gradients
    as the regularizer in the loss."""
    step_time = _step_time()
    args = step_time.parse_args(["--smoke", "--orth-mode", "grad", "--orth-reg-weight", "0.5"])
    variant = step_time.build_variant("adalora", step_time.build_base("tiny"), args, torch.device("cpu"))
    with torch.no_grad():  # B != 0: the regularizer's gradient then differs from zero in both factors
        for layer in find_adapters(variant.model).values():
            layer.lora_B.normal_()
    params = [p for p in variant.model.parameters() if p.requires_grad]
    factors = [(layer.lora_A, layer.lora_B) for layer in find_adapters(variant.model).values()]

    torch.manual_seed(0)  # the same dropout masks in both passes
    (variant.forward_loss() + 0.5 * orthogonal_regularizer(factors)).backward()
    expected = [p.grad.clone() for p in params]
    variant.optimizer.zero_grad()
    torch.manual_seed(0)
    variant.forward_loss().backward()
    variant.extra_grad()
    for p, want in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, want)
