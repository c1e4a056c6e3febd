"""AdaLoRA on adapters that FSDP2 shards (adalora_pl/sharding.py), without Lightning: two CPU processes (gloo).

The sharded run keeps its importance averages on the local shards and sums each triplet's partial score across ranks
at mask events; it must make the same masks as one process over the whole batch, with parameters equal up to the
order of floating-point reductions.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from adalora_pl import RankAllocator, SVDLinear, triplet_scores
from adalora_pl.importance import add_orthogonal_regularizer_grad_
from adalora_pl.sharding import adapter_shard_placement, global_offsets, local

pytestmark = pytest.mark.slow

# Uneven shapes on purpose: r = 3 and 5 split 2/1 and 3/2 over two ranks, 7 and 9 output rows 4/3 and 5/4; A's
# input columns split evenly (8 -> 4/4, 6 -> 3/3) except the middle layer's 7, which FSDP2 can only split by rows of A
# (its Gram is then gathered whole).
SHAPES = [(8, 7, 3), (7, 6, 5), (6, 9, 3)]
STEPS, TINIT, TFINAL, DELTA_T, TARGET_R = 14, 2, 4, 2, 2
BATCH = 8


def build(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for d_in, d_out, r in SHAPES:
        layer = SVDLinear(nn.Linear(d_in, d_out), r=r, lora_alpha=4)
        with torch.no_grad():
            layer.lora_E.normal_()  # nonzero singular values: every factor gets a gradient from the first step
        layers.append(layer)
    return nn.Sequential(*layers)


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(BATCH, SHAPES[0][0], generator=g) for _ in range(STEPS)]


def train(model: nn.Sequential, inputs, rank: int = 0, world: int = 1) -> list[dict]:
    """The reference loop: loss, regularizer gradient, AdamW, importance + mask. Records masks and scores."""
    adapters = {str(i): m for i, m in enumerate(model)}
    allocator = RankAllocator(adapters, target_r=TARGET_R, tinit=TINIT, tfinal=TFINAL, total_step=STEPS,
                              delta_t=DELTA_T)
    opt = torch.optim.AdamW([p for m in model for p in (m.lora_A, m.lora_E, m.lora_B)], lr=1e-2)
    records = []
    for step, x in enumerate(inputs):
        part = x.chunk(world)[rank]
        # The mean over the local half; FSDP2 averages gradients over the ranks: the mean over the whole batch.
        loss = model(part).pow(2).mean()
        loss.backward()
        add_orthogonal_regularizer_grad_([(m.lora_A, m.lora_B) for m in model], 0.1)
        opt.step()
        allocator.update_and_allocate(step)
        opt.zero_grad()
        records.append({"masks": [m.rank_mask.tolist() for m in model], "budget": allocator.schedule.budget_at(step)})
    return records


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_worker(rank: int, world: int, port: int, out: str, mode: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        model = build()
        placement = adapter_shard_placement(model, world)
        for layer in model:
            fully_shard(layer, mesh=mesh, shard_placement_fn=placement)
        fully_shard(model, mesh=mesh)
        if mode == "train":
            records = train(model, batches(), rank, world)
            params = {f"{i}.{k}": full(getattr(m, k)).detach().tolist()
                      for i, m in enumerate(model) for k in ("lora_A", "lora_E", "lora_B")}
            Path(out, f"rank{rank}.json").write_text(json.dumps({"records": records, "params": params}))
        else:  # "scores": constructed averages, scored from shards
            adapters = {str(i): m for i, m in enumerate(model)}
            allocator = RankAllocator(adapters, target_r=TARGET_R, tinit=0, tfinal=0, total_step=10)
            # Every element's average is a small integer given by its global position: exact sums on any split.
            flat = []
            for m in model:
                for p in allocator.layer_params(m):
                    off, loc = global_offsets(p), local(p)
                    rows = torch.arange(off[0], off[0] + loc.shape[0]).view(-1, 1)
                    cols = torch.arange(off[1], off[1] + loc.shape[1]).view(1, -1)
                    flat.append(((rows * 7 + cols * 3) % 11 + 1).float().reshape(-1))
            allocator.exp_avg_ipt.copy_(torch.cat(flat))
            allocator.exp_avg_unc.fill_(1.0)
            scores = [s.tolist() for s in allocator.layer_scores()]
            holders = {str(i): {k: [global_offsets(p), list(local(p).shape)] for k, p in
                                zip(("A", "E", "B"), allocator.layer_params(m), strict=True)}
                       for i, m in enumerate(model)}
            Path(out, f"rank{rank}.json").write_text(json.dumps({"scores": scores, "holders": holders}))
        # Both ranks leave together: a gloo process that tears its group down while the other still finishes its
        # last collective can abort (SIGABRT, seen on a loaded machine).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_sharded(tmp_path: Path, mode: str) -> list[dict]:
    mp.spawn(_sharded_worker, args=(2, _free_port(), str(tmp_path), mode), nprocs=2)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_a_triplet_spread_over_ranks_is_scored_exactly(tmp_path):
    """Row i of A is split over both ranks (its input columns), E_i lies on one, column i of B is split over both
    (its output rows): the summed partial scores equal the scores of the whole tensors, on both ranks."""
    ranks = run_sharded(tmp_path, "scores")
    # The premise: E's rows, A's columns and B's rows are split between the ranks.
    layer0 = [r["holders"]["0"] for r in ranks]
    assert [h["E"][1][0] for h in layer0] == [2, 1] and [h["A"][1][1] for h in layer0] == [4, 4]
    assert [h["B"][1][0] for h in layer0] == [4, 3]
    assert [r["holders"]["1"]["A"][1][0] for r in ranks] == [3, 2]  # the 7-column A: split by rows
    model = build()
    expected = []
    for m in model:
        def avg(p):
            rows = torch.arange(p.shape[0]).view(-1, 1)
            cols = torch.arange(p.shape[1]).view(1, -1)
            return ((rows * 7 + cols * 3) % 11 + 1).float()
        expected.append(triplet_scores(avg(m.lora_E), avg(m.lora_A), avg(m.lora_B)).tolist())
    assert ranks[0]["scores"] == ranks[1]["scores"]
    for got, want in zip(ranks[0]["scores"], expected, strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-6, atol=0)


def test_two_sharded_processes_mask_like_one_process_over_the_whole_batch(tmp_path):
    ranks = run_sharded(tmp_path, "train")
    torch.set_num_threads(1)
    single = build()
    records = train(single, batches())
    assert ranks[0]["records"] == ranks[1]["records"]  # both ranks: the same masks and budgets at every step
    masked_steps = [r["masks"] for r in records]
    assert [r["masks"] for r in ranks[0]["records"]] == masked_steps  # ... and the single process's
    assert sum(map(sum, records[-1]["masks"])) == TARGET_R * len(SHAPES)
    # Parameters: the same updates up to the order of reductions (the batch mean is a mean of two half-batch means
    # there, and each Gram a sum of two shards' Grams). Those change a gradient by a few float32 ulps (relative
    # ~1e-7); AdamW divides it by its own running scale, so an update of size lr moves by ~lr x 1e-7 per step, and
    # the differences add up over the steps at most: lr x 1e-6 x steps leaves a margin of ten (measured: 3e-8).
    worst = 0.0
    for i, m in enumerate(single):
        for k in ("lora_A", "lora_E", "lora_B"):
            diff = (torch.tensor(ranks[0]["params"][f"{i}.{k}"]) - getattr(m, k).detach()).abs().max().item()
            worst = max(worst, diff)
    assert worst < 1e-2 * 1e-6 * STEPS, worst
