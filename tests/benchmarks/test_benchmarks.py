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
VARIANTS = ["frozen", "peft_lora", "peft_adalora", "lora", "adalora", "adalora_final", "adalora_unfused",
            "adalora_masked", "lora_fused", "adalora_fused", "adalora_masked_fused"]
# Ratios the smoke run must report as finite numbers (the variants above give every one of them but lora_unfused's).
FINITE_RATIOS = ["adalora_vs_peft_adalora", "adalora_vs_lora", "peak_mem_vs_peft_adalora", "adalora_vs_frozen",
                 "adalora_fused_vs_frozen", "adalora_masked_vs_frozen", "adalora_masked_fused_vs_frozen",
                 "lora_fused_vs_frozen", "adalora_fused_vs_peft_adalora", "adalora_fused_vs_adalora",
                 "peak_mem_adalora_fused_vs_peft_adalora"]


def test_step_time_smoke_writes_finite_ratios(tmp_path):
    out = tmp_path / "step_time.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--quiet", "--variants", ",".join(VARIANTS), "--json", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "adalora_vs_peft_adalora" in proc.stdout  # the printed table
    data = json.loads(out.read_text())
    for key in FINITE_RATIOS:
        value = data["ratios"][key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    assert data["ratios"] == data["models"]["tiny"]["ratios"]
    # Every time ratio carries its spread over the rounds; the flat ratios are its medians.
    spread = data["models"]["tiny"]["ratio_spread"]
    assert data["ratio_spread"] == spread
    time_keys = [key for key in data["ratios"] if not key.startswith("peak_mem")]
    assert sorted(spread) == sorted(time_keys)
    assert spread["lora_vs_lora_unfused"] is None and data["ratios"]["lora_vs_lora_unfused"] is None  # not run
    for key, s in spread.items():
        if s is None:
            continue
        assert s["rounds"] == data["config"]["steps"] == 3, key
        assert s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"], (key, s)
        assert s["median"] == data["ratios"][key], key
    assert "adalora_fused_vs_peft_adalora" in proc.stdout
    # The table prints each time ratio as "median [q1, q3]".
    line = next(ln for ln in proc.stdout.splitlines() if ln.strip().startswith("adalora_fused_vs_adalora "))
    s = spread["adalora_fused_vs_adalora"]
    assert line.split(None, 1)[1] == f"{s['median']:.3f} [{s['q1']:.3f}, {s['q3']:.3f}]", line
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


def test_step_time_fused_variants_set_the_kernel_on_their_own_layers_and_freeze_the_final_pattern():
    """``*_fused`` set the fused kernel on their own adapter layers only; ``adalora_masked_fused`` also freezes the
    final pattern on every layer: its masked triplets are left out of the forward (their E gets no gradient), while
    ``adalora_masked`` (reference kernel) still computes them."""
    step_time = _step_time()
    names = ["lora", "lora_fused", "adalora", "adalora_fused", "adalora_masked", "adalora_masked_fused"]
    args = step_time.parse_args(["--smoke", "--variants", ",".join(names)])
    base = step_time.build_base("tiny")
    variants = {name: step_time.build_variant(name, base, args, torch.device("cpu")) for name in args.variants}
    kernels = {name: {layer.kernel for layer in find_adapters(v.model).values()} for name, v in variants.items()}
    assert kernels == {"lora": {"reference"}, "lora_fused": {"fused"}, "adalora": {"reference"},
                       "adalora_fused": {"fused"}, "adalora_masked": {"reference"}, "adalora_masked_fused": {"fused"}}
    for name in ("adalora_masked", "adalora_masked_fused"):
        variant = variants[name]
        layers = list(find_adapters(variant.model).values())
        assert any(not bool(layer.rank_mask.all()) for layer in layers), name  # the final mask event pruned some
        variant.optimizer.zero_grad()
        variant.forward_loss().backward()
        masked_grads = torch.cat([layer.lora_E.grad[~layer.rank_mask].flatten() for layer in layers])
        if name == "adalora_masked_fused":
            assert "pattern frozen" in variant.note
            assert torch.count_nonzero(masked_grads) == 0  # gathered: the masked triplets are not computed
        else:
            assert torch.count_nonzero(masked_grads) > 0
        variant.optimizer.zero_grad()
    for variant in variants.values():
        variant.step()  # each runs with its own kernel, in any order


def test_step_time_ratio_spread_is_median_and_quartiles_of_the_rounds():
    step_time = _step_time()
    times = {"a": [2.0, 3.0, 4.0, 10.0], "b": [1.0, 1.0, 1.0, 1.0], "one": [1.0], "two": [2.0]}
    spread = step_time.ratio_spread_of_rounds(times, "a", "b")
    assert spread == {"median": 3.5, "q1": 2.75, "q3": 5.5, "min": 2.0, "max": 10.0, "rounds": 4}
    assert step_time.ratio_of_rounds(times, "a", "b") == 3.5  # llm_xsum.py reads the median through it
    assert step_time.ratio_spread_of_rounds(times, "one", "two") == {
        "median": 0.5, "q1": None, "q3": None, "min": 0.5, "max": 0.5, "rounds": 1}  # no quartiles of one round
    assert step_time.ratio_spread_of_rounds(times, "a", "missing") is None
    ratios, spreads = step_time.compute_ratios({"adalora": [2.0, 4.0], "peft_adalora": [4.0, 4.0]},
                                               {"adalora": (3, "m"), "peft_adalora": (4, "m")})
    assert list(ratios) == [key for key, *_ in step_time.RATIOS]
    assert ratios["adalora_vs_peft_adalora"] == 0.75 and ratios["peak_mem_vs_peft_adalora"] == 0.75
    assert spreads["adalora_vs_peft_adalora"]["q1"] <= 0.75 <= spreads["adalora_vs_peft_adalora"]["q3"]
    assert "peak_mem_vs_peft_adalora" not in spreads and spreads["adalora_vs_lora"] is None


def test_step_time_smollm2_has_smollm2_135m_shape_and_llama_targets():
    """``smollm2``: SmolLM2-135M's shape as a LlamaForSequenceClassification (built offline from a config; two layers
    here to stay fast), the llama preset's targets, its ``score`` head trained; bf16 autocast on CUDA by default."""
    from adalora_pl.injection import preset_targets

    step_time = _step_time()
    base = step_time.build_base("smollm2", num_layers=2)
    c = base.config
    assert type(base).__name__ == "LlamaForSequenceClassification" and c.model_type == "llama"
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
            c.vocab_size, c.pad_token_id) == (576, 2, 9, 3, 1536, 49152, 2)
    assert step_time.smollm2_config().num_hidden_layers == 30  # the full depth unless told otherwise
    assert preset_targets(base) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert "smollm2" in step_time.BF16_ON_CUDA and "deberta" in step_time.BF16_ON_CUDA
    args = step_time.parse_args(["--models", "smollm2", "--batch-size", "2", "--seq-len", "8", "--warmup", "1"])
    for name in ("frozen", "adalora_fused"):
        variant = step_time.build_variant(name, base, args, torch.device("cpu"))
        trained = {n.split(".")[0] for n, p in variant.model.named_parameters() if p.requires_grad}
        assert "score" in trained, (name, trained)
        variant.step()


def test_gpu_check_step_time_command_parses_with_both_models_and_the_fused_variants(tmp_path):
    """Part 3 of gpu_check.py (run only on a lent GPU): its step_time.py command line is one step_time.py accepts,
    with DeBERTa's and SmolLM2's shapes in bf16 and the fused kernel's variants beside the reference ones."""
    from benchmarks import gpu_check

    step_time = _step_time()
    command = gpu_check.step_time_command(tmp_path / "step_time_cuda.json")
    assert command[1] == "benchmarks/step_time.py"
    args = step_time.parse_args(command[2:])
    assert args.models == ["deberta", "smollm2"] and args.bf16 and args.device == "cuda"
    assert (args.steps, args.warmup) == (10, 3)
    assert args.variants == ["frozen", "peft_adalora", "adalora", "adalora_fused", "adalora_masked",
                             "adalora_masked_fused", "lora", "lora_fused"]


def test_profile_step_splits_the_products_and_sees_the_fused_accumulation(tmp_path):
    """benchmarks/profile_step.py on the tiny BERT: a JSON with each variant's groups; only the fused kernel
    accumulates a rank-sized product into an output (``addmm_``), and the frozen floor has no such product."""
    from benchmarks import profile_step

    out = tmp_path / "profile.json"
    results = profile_step.main(["--model", "tiny", "--variants", "frozen,adalora_fused", "--steps", "1",
                                 "--batch-size", "4", "--seq-len", "16", "--json", str(out)])
    assert json.loads(out.read_text())["seconds_per_step"].keys() == {"frozen", "adalora_fused"}
    assert results["adalora_fused"].get("aten::addmm_ (rank-sized operand)", 0) > 0
    assert "aten::addmm_ (rank-sized operand)" not in results["frozen"]
    assert all(seconds >= 0 for groups in results.values() for seconds in groups.values())
