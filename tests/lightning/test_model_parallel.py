"""AdaLoRA under Lightning's ModelParallelStrategy (FSDP2) on two CPU processes (gloo), against one process.

Each run is ``tests/lightning/model_parallel_fit.py`` in a subprocess (the strategy starts its other rank by running
the same command again). The GLUE task module shards its backbone in ``configure_model``; the callback keeps the
importance averages on each rank's shards and sums each triplet's partial score across ranks at mask events.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.builders import REPO_ROOT, save_tiny_backbone

pytestmark = pytest.mark.slow

SCRIPT = REPO_ROOT / "tests" / "lightning" / "model_parallel_fit.py"
LR, STEPS = 5e-3, 12


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> str:
    return save_tiny_backbone(tmp_path_factory.mktemp("mp_backbone"))


def fit(out: Path, backbone: str, devices: int, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), "--backbone", backbone, "--out", str(out), "--devices", str(devices),
               *extra]
    done = subprocess.run(command, cwd=out.parent, capture_output=True, text=True, timeout=600)
    if check and done.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return done


def reports(out: Path, world: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def max_difference(a: dict, b: dict) -> float:
    return max((torch.tensor(a[k]) - torch.tensor(b[k])).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, backbone):
    """One process over batches of 8, two sharded processes over 4 rows each: 12 steps spanning mask events."""
    root = tmp_path_factory.mktemp("mp_runs")
    fit(root / "single", backbone, 1, "--save-every", "12")
    fit(root / "sharded", backbone, 2, "--save-every", "12")
    return root


def test_two_sharded_ranks_mask_like_one_process(runs):
    single = reports(runs / "single", 1)[0]
    rank0, rank1 = reports(runs / "sharded", 2)
    assert rank0["sharded"] and rank0["world"] == 2 and not single["sharded"]
    # The same masks, kept ranks per layer and budget on both ranks, and as one process over the whole batch.
    assert rank0["masks"] == rank1["masks"] == single["masks"]
    assert rank0["ranks"] == rank1["ranks"] == single["ranks"] and rank0["budget"] == single["budget"] == 12
    assert rank0["last_step"] == single["last_step"] == STEPS - 1 and rank0["importance_steps"] == STEPS
    assert rank0["adapters"] == rank1["adapters"]  # gathered whole: one model
    # Parameters equal up to the order of reductions (a batch mean as the mean of two half-batch means, Grams and
    # scores as sums of two shards'): a few float32 ulps per gradient, which AdamW turns into ~lr x 1e-7 per step;
    # bounded by lr x 1e-5 per step (measured: 5e-8 after 12 steps).
    assert max_difference(rank0["adapters"], single["adapters"]) < LR * 1e-5 * STEPS


def test_each_rank_holds_half_of_the_frozen_base(runs):
    rank0, rank1 = reports(runs / "sharded", 2)
    total = rank0["frozen_bytes"]
    assert rank0["frozen_bytes_here"] + rank1["frozen_bytes_here"] == total
    for report in (rank0, rank1):
        assert abs(report["frozen_bytes_here"] / total - 0.5) < 0.02, report["frozen_bytes_here"] / total


@pytest.mark.parametrize("consolidated", [False, True], ids=["distributed", "consolidated"])
def test_resume_from_a_checkpoint_in_the_cubic_phase_is_exact(runs, backbone, tmp_path, consolidated):
    """Stop at step 8 (the cubic phase runs from step 3 to 12), resume from the checkpoint to step 12: bitwise the
    uninterrupted sharded run (averages, masks, adapters and optimizer state restored), from Lightning's distributed
    checkpoint folder and from a consolidated file alike."""
    extra = ("--consolidated",) if consolidated else ()
    fit(tmp_path / "first", backbone, 2, "--max-steps", "8", "--save-every", "8", *extra)
    ckpt = next((tmp_path / "first" / "ckpt").iterdir())
    # distributed: a folder with each rank's shards; consolidated: one file with the whole tensors
    assert ckpt.is_dir() == (not consolidated) and (ckpt / ".metadata").is_file() == (not consolidated)
    fit(tmp_path / "resumed", backbone, 2, "--max-steps", "12", "--ckpt-in", str(ckpt), *extra)
    uninterrupted = reports(runs / "sharded", 2)[0]
    resumed = reports(tmp_path / "resumed", 2)[0]
    assert resumed["global_step"] == 12 and resumed["importance_steps"] == uninterrupted["importance_steps"]
    assert resumed["masks"] == uninterrupted["masks"]
    assert resumed["adapters"] == uninterrupted["adapters"]


def test_export_from_the_sharded_checkpoint_equals_the_single_process_export(runs, tmp_path):
    from safetensors.torch import load_file

    from adalora_pl.cli import main

    exported = {}
    for name in ("single", "sharded"):
        ckpt = next((runs / name / "ckpt").iterdir())
        assert ckpt.is_dir() == (name == "sharded")
        main(["export", "--ckpt_path", str(ckpt), "--format", "peft", "--output", str(tmp_path / name)])
        exported[name] = load_file(tmp_path / name / "adapter_model.safetensors")
        exported[name + "_config"] = json.loads((tmp_path / name / "adapter_config.json").read_text())
    assert exported["single_config"] == exported["sharded_config"]  # the same rank pattern and schedule
    assert exported["single"].keys() == exported["sharded"].keys()
    worst = max((exported["single"][k] - exported["sharded"][k]).abs().max().item()
                for k in exported["single"] if exported["single"][k].numel())  # a layer pruned to rank 0 is empty
    assert worst < LR * 1e-5 * STEPS, worst


def test_an_error_on_one_rank_ends_both(backbone, tmp_path):
    """A ConfigError raised on rank 1 only: the run ends (non-zero) instead of leaving rank 0 waiting in a
    collective, and the message is the one line of the error."""
    start = time.monotonic()
    done = fit(tmp_path / "failing", backbone, 2, "--fail-on-rank", "1", check=False)
    assert done.returncode != 0
    assert time.monotonic() - start < 300
    assert "a bad input seen by rank 1 only" in done.stderr


def test_bf16_true_shards_a_bfloat16_base_with_float32_adapters(backbone, tmp_path):
    fit(tmp_path / "bf16", backbone, 2, "--precision", "bf16-true")
    rank0, rank1 = reports(tmp_path / "bf16", 2)
    assert rank0["base_dtypes"] == ["torch.bfloat16"] and rank0["adapter_dtypes"] == ["torch.float32"]
    assert rank0["masks"] == rank1["masks"] and sum(rank0["ranks"].values()) == 12


def test_the_fsdp_recipe_runs_through_the_cli_on_two_cpu_processes(tmp_path):
    """configs/llama_alpaca_fsdp.yaml with a tiny llama and local records: the recipe's strategy, gradient
    checkpointing and schedule run sharded, and the run reaches its budget."""
    from tests.builders import INSTRUCTION_ROWS, save_tiny_llama, write_jsonl

    llama = save_tiny_llama(tmp_path / "llama", tokenizer=True)
    records = write_jsonl(tmp_path / "alpaca.jsonl", INSTRUCTION_ROWS * 4)
    command = [
        sys.executable, str(REPO_ROOT / "cli.py"), "fit",
        "--config", str(REPO_ROOT / "configs" / "llama_alpaca_fsdp.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy.init_args.data_parallel_size",
        "2", "--trainer.precision", "32-true", "--trainer.accumulate_grad_batches", "1", "--model.backbone", llama,
        "--model.torch_dtype", "null", "--data.dataset_name", "null", "--data.train_file", str(records),
        "--data.validation_file", str(records), "--data.batch_size", "2", "--data.max_seq_length", "32",
        "--trainer.max_steps", "4", "--model.tinit", "0", "--model.tfinal", "0", "--model.delta_t", "1",
        "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false",
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sharded over 2 ranks" in done.stdout + done.stderr
    pattern = json.loads(next(tmp_path.glob("lightning_logs/version_0/rank_pattern.json")).read_text())
    assert pattern["total_rank"] == 8 * len(pattern["modules"])  # target_r 8 per matrix
