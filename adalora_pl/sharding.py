"""What AdaLoRA needs from parameters that FSDP2 (``fully_shard``) splits across ranks: the local shard of a
``DTensor``, where it sits in the whole tensor, and the reductions that make a global decision from local pieces.

A triplet's score needs its row of A, its entry of E and its column of B, which can lie on different ranks. Each
rank adds what it holds into one vector with a slot per triplet (:func:`scatter_partial_scores`); one all-reduce
of that vector (one float per triplet and rank) gives every rank the same scores, so the global top-k, the threshold
and the masks agree everywhere (docs/method.md §12). Plain tensors pass through unchanged: a single process, or DDP,
where every rank holds whole adapters.

No Lightning here: the allocator uses these functions, and they work with any process group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "adapter_shard_placement", "add_sharded_orthogonal_regularizer_grad_", "all_finite", "global_offsets",
    "is_sharded", "local", "masked_rows", "scatter_partial_scores", "shard_group", "sum_across_ranks", "whole",
]


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter or gradient that FSDP2 splits across ranks)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this rank holds: its local shard for a ``DTensor`` (a view), ``t`` itself otherwise."""
    return t.to_local() if is_sharded(t) else t


def global_offsets(t: torch.Tensor) -> tuple[int, ...]:
    """Where the local shard of ``t`` starts in the whole tensor, per dimension (zeros for a plain tensor)."""
    if not is_sharded(t):
        return (0,) * t.dim()
    # DTensor's own bookkeeping (the one torch.distributed.checkpoint uses to place shards): uneven shards included.
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(offsets)


def all_finite(tensors: Sequence[torch.Tensor], group: dist.ProcessGroup | None) -> bool:
    """Whether every element of ``tensors`` (this rank's shards) is finite on every rank of ``group``: one host
    sync, and under FSDP2 one all-reduce, so that all ranks take the same decision whichever holds the inf/NaN."""
    parts = [local(t) for t in tensors]
    # The largest |x| of each tensor: finite for any finite tensor (a norm could overflow), NaN propagates.
    finite = torch.stack(torch._foreach_norm(parts, float("inf"))).isfinite().all().float() if parts else None
    if finite is None:
        finite = torch.ones(())
    return bool(sum_across_ranks(finite, group) == (group.size() if group is not None else 1))


def whole(t: torch.Tensor) -> torch.Tensor:
    """``t`` at its whole shape on every rank: gathered for a ``DTensor`` (a collective), a copy otherwise."""
    return t.full_tensor() if is_sharded(t) else t.clone()


def masked_rows(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``t`` (r, ...) with the rows that ``keep`` (r,) marks False set to zero, out of place; a ``DTensor`` keeps its
    sharding (each rank zeroes the rows it holds)."""
    part = local(t)
    row = global_offsets(t)[0]
    rows = keep[row:row + part.shape[0]].to(part.device).view(-1, *([1] * (part.dim() - 1)))
    zeroed = part.masked_fill(~rows, 0.0)
    if not is_sharded(t):
        return zeroed
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(zeroed, t.device_mesh, t.placements, shape=t.shape, stride=t.stride())


def shard_group(tensors: Sequence[torch.Tensor]) -> dist.ProcessGroup | None:
    """The process group the ``DTensor`` among ``tensors`` are sharded over (None when none is sharded).

    Only one-dimensional meshes are supported (FSDP2 over the data-parallel dimension): a 2-D mesh (HSDP, or tensor
    parallelism) is refused here, naming what was found.
    """
    sharded = [t for t in tensors if is_sharded(t)]
    if not sharded:
        return None
    meshes = {id(t.device_mesh): t.device_mesh for t in sharded}
    if len(meshes) > 1 or any(mesh.ndim != 1 for mesh in meshes.values()):
        shapes = sorted({tuple(mesh.shape) for mesh in meshes.values()})
        raise RuntimeError(f"AdaLoRA supports adapters sharded over one 1-D device mesh (FSDP2 data parallelism); "
                           f"found meshes of shapes {shapes}")
    return next(iter(meshes.values())).get_group()


def sum_across_ranks(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """``t`` summed over the ranks of ``group``, in place (a no-op without a group)."""
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def scatter_partial_scores(
    score_E: torch.Tensor, score_A: torch.Tensor, score_B: torch.Tensor,
    offsets_E: Sequence[int], offsets_A: Sequence[int], offsets_B: Sequence[int],
    rank: int, in_features: int, out_features: int,
) -> torch.Tensor:
    """This rank's part of one layer's triplet scores S_i = s(E_i) + mean_j s(A_ij) + mean_k s(B_ki), shape (r,).

    Args:
        score_E, score_A, score_B: element scores of the local shards of E (r_loc, 1), A (r_loc, in_loc) and
            B (out_loc, r_loc).
        offsets_E, offsets_A, offsets_B: where each shard starts in its whole tensor (:func:`global_offsets`).
        rank: the layer's rank r (length of the result).
        in_features, out_features: the whole A's columns and B's rows (the means divide by them).

    Summed over all ranks (:func:`sum_across_ranks`), the results give the scores of the whole tensors: each
    element lies on exactly one rank.
    """
    partial = torch.zeros(rank, dtype=score_A.dtype, device=score_A.device)
    row_E, row_A, col_B = offsets_E[0], offsets_A[0], offsets_B[1]
    partial[row_E:row_E + score_E.shape[0]] += score_E.reshape(-1)
    partial[row_A:row_A + score_A.shape[0]] += score_A.sum(dim=1) / in_features
    partial[col_B:col_B + score_B.shape[1]] += score_B.sum(dim=0) / out_features
    return partial


def adapter_shard_placement(module: torch.nn.Module, world_size: int) -> Callable[[torch.nn.Parameter], Any]:
    """A ``shard_placement_fn`` for ``fully_shard(block, shard_placement_fn=...)`` on a module with AdaLoRA adapters:
    each ``lora_A`` (r, in) of ``module`` is split along its input dimension where ``world_size`` divides it (FSDP2
    shards dims other than 0 only evenly), everything else along dim 0 (``lora_B`` (out, r) along its output rows,
    ``lora_E`` along r, the base weights as FSDP2 does by default).

    Splitting the factors along the dimension their Gram matrices sum over makes the orthogonal regularizer a sum of
    local Grams (:func:`add_sharded_orthogonal_regularizer_grad_`: one all-reduce of r x r per factor); an A split
    along its rows is gathered whole for its Gram instead.
    """
    from torch.distributed.tensor import Shard

    factors_a = {id(p) for name, p in module.named_parameters() if name.endswith("lora_A")}
    return lambda param: Shard(1) if id(param) in factors_a and param.shape[1] % world_size == 0 else Shard(0)


def _contraction_sharded(t: torch.Tensor, dim: int) -> bool:
    """Whether ``t`` is whole on this rank or split only along ``dim`` (the dimension a Gram matrix sums over)."""
    from torch.distributed.tensor import Shard

    return not is_sharded(t) or all(isinstance(p, Shard) and p.dim == dim for p in t.placements)


@torch.no_grad()
def add_sharded_orthogonal_regularizer_grad_(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]], weight: float, group: dist.ProcessGroup
) -> torch.Tensor:
    """:func:`adalora_pl.importance.add_orthogonal_regularizer_grad_` for factors that FSDP2 shards.

    R = mean over all factors of ||A A^T - I||_F and ||B^T B - I||_F. A factor split along the dimension its Gram
    sums over (A along its input columns, B along its output rows: :func:`adapter_shard_placement`) has a Gram that
    is the sum of its shards' Grams: all of those are summed in one all-reduce of r x r matrices. Any other split is
    gathered whole (``full_tensor``) first. The gradient is written into each shard from the identity
    d||X||_F / dA = 2 X A / ||X||_F with X = A A^T - I (symmetric), and 2 B X / ||X||_F for B.

    Returns:
        R, the same on every rank (0-dim tensor).
    """
    shards, grams, summed = [], [], []
    for lora_A, lora_B in factors:
        for param, dim in ((lora_A, 1), (lora_B, 0)):
            sums = _contraction_sharded(param, dim)
            whole = local(param) if sums else param.full_tensor()  # the gather path: rows of A on several ranks
            shards.append(whole)
            grams.append(whole @ whole.T if dim == 1 else whole.T @ whole)
            summed.append(sums)
    sizes = [g.numel() for g, s in zip(grams, summed, strict=True) if s]
    if sizes:
        total = sum_across_ranks(torch.cat([g.reshape(-1) for g, s in zip(grams, summed, strict=True) if s]), group)
        parts = iter(total.split(sizes))
        grams = [next(parts).view_as(g) if s else g for g, s in zip(grams, summed, strict=True)]
    count = len(grams)
    reg = torch.zeros((), dtype=grams[0].dtype, device=grams[0].device)
    params = [p for pair in factors for p in pair]
    for k, (param, whole, gram, sums) in enumerate(zip(params, shards, grams, summed, strict=True)):
        diff = gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        norm = torch.linalg.matrix_norm(diff)
        reg += norm
        scale = 2 * weight / count / norm if norm > 0 else 0.0
        grad = scale * (diff @ whole if k % 2 == 0 else whole @ diff)
        if not sums:  # the gradient of the whole factor: this rank keeps its rows
            rows = global_offsets(param)[0]
            grad = grad[rows:rows + local(param).shape[0]]
        if param.grad is None:
            from torch.distributed.tensor import DTensor

            param.grad = DTensor.from_local(grad, param.device_mesh, param.placements, shape=param.shape,
                                            stride=param.stride()) if is_sharded(param) else grad
        else:
            local(param.grad).add_(grad)
    return reg / count
