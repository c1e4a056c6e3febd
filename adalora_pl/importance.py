"""AdaLoRA's math as small pure functions: orthogonal regularizer, importance EMAs, triplet scores,
and the global threshold that masks to a budget (docs/method.md §2, §3, §5).

Each expression keeps the reference's operation order so that results match PEFT bitwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch

from adalora_pl.errors import ConfigError
from adalora_pl.sharding import add_sharded_orthogonal_regularizer_grad_, shard_group

Importance = Literal["sensitivity_uncertainty", "sensitivity", "magnitude"]
IMPORTANCE_VARIANTS: tuple[str, ...] = get_args(Importance)


def validate_importance(importance: str) -> None:
    if importance not in IMPORTANCE_VARIANTS:
        raise ConfigError(f"importance must be one of {list(IMPORTANCE_VARIANTS)}, got {importance!r}")


def orthogonal_regularizer(factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean over all A and B of ``||A A^T - I||_F`` and ``||B^T B - I||_F`` (not squared; docs/method.md §2).

    Args:
        factors: ``(lora_A, lora_B)`` pairs, A of shape (r, in) and B of shape (out, r).
    """
    total: torch.Tensor | int = 0
    count = 0
    for lora_A, lora_B in factors:
        for cov in (lora_A @ lora_A.T, lora_B.T @ lora_B):
            eye = torch.eye(*cov.size(), out=torch.empty_like(cov))
            total = total + torch.norm(cov - eye, p="fro")
            count += 1
    if count == 0:
        raise ValueError("orthogonal_regularizer needs at least one (lora_A, lora_B) pair")
    return total / count


def add_orthogonal_regularizer_grad_(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]], weight: float
) -> torch.Tensor:
    """Add ``weight * dR/dA`` and ``weight * dR/dB`` to the ``.grad`` of every factor, in place; return R (detached).

    The gradient ``backward(loss + weight * R)`` would give, for a training loop that never sees the loss (the
    callback adds it once per optimizer step, before gradient clipping; docs/method.md §2, §6).

    Args:
        factors: ``(lora_A, lora_B)`` pairs (leaf tensors that require grad).
        weight: the regularizer's weight (``orth_reg_weight``).
    """
    params = [p for pair in factors for p in pair]
    group = shard_group(params)
    if group is not None:  # FSDP2: Grams summed from the local shards (adalora_pl/sharding.py)
        return add_sharded_orthogonal_regularizer_grad_(factors, weight, group)
    with torch.enable_grad():
        reg = orthogonal_regularizer(factors)
        grads = torch.autograd.grad(reg * weight, params)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
    return reg.detach()


def elementwise_importance(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """``|w * g|`` for every element of every tensor, flattened into one float32 vector."""
    if params and params[0].dtype != torch.float32:
        params = [p.float() for p in params]
        grads = [g.float() for g in grads]
    products = torch._foreach_mul(params, grads)
    torch._foreach_abs_(products)
    return torch.cat([t.reshape(-1) for t in products])


@torch.no_grad()
def update_importance_(
    exp_avg_ipt: torch.Tensor,
    exp_avg_unc: torch.Tensor | None,
    ipt: torch.Tensor,
    beta1: float,
    beta2: float,
    applied: torch.Tensor | None = None,
) -> torch.Tensor:
    """One EMA step of sensitivity (``exp_avg_ipt``) and uncertainty (``exp_avg_unc``), in place.

    ``Ibar = b1 Ibar + (1 - b1) I``; ``U = b2 U + (1 - b2) |I - Ibar|`` with the updated Ibar (docs/method.md §3).
    A step whose ``ipt`` holds inf or NaN, or whose ``applied`` (0-dim bool tensor) is False, leaves both
    averages unchanged. Returns whether the step entered the averages, as a 0-dim bool tensor on the
    device, without a host synchronization.
    """
    finite = torch.isfinite(ipt).all()
    if applied is not None:
        finite = finite & applied.to(finite.device)
    new_avg = beta1 * exp_avg_ipt + (1 - beta1) * ipt
    exp_avg_ipt.copy_(torch.where(finite, new_avg, exp_avg_ipt))
    if exp_avg_unc is not None:
        new_unc = beta2 * exp_avg_unc + (1 - beta2) * (ipt - new_avg).abs()
        exp_avg_unc.copy_(torch.where(finite, new_unc, exp_avg_unc))
    return finite


def triplet_scores(score_E: torch.Tensor, score_A: torch.Tensor, score_B: torch.Tensor) -> torch.Tensor:
    """S_i = s(E_i) + mean_j s(A[i, j]) + mean_j s(B[j, i]) for one layer, shape (r,) (docs/method.md §3).

    Args:
        score_E: (r, 1) element scores of E.
        score_A: (r, in) element scores of A.
        score_B: (out, r) element scores of B.
    """
    mean_A = torch.mean(score_A, dim=1, keepdim=True)
    mean_B = torch.mean(score_B, dim=0, keepdim=False).view(-1, 1)
    return score_E.view(-1) + torch.cat([mean_A, mean_B], dim=1).sum(dim=1).view(-1)


def mask_threshold(scores: torch.Tensor, num_to_mask: int) -> torch.Tensor | None:
    """The ``num_to_mask``-th smallest score (1-indexed): triplets scoring <= it are masked.

    ``None`` when nothing is to be masked. Ties at the threshold are all masked, as in the reference.
    """
    if num_to_mask <= 0:
        return None
    if num_to_mask > scores.numel():
        raise ValueError(f"cannot mask {num_to_mask} of {scores.numel()} triplets")
    return torch.kthvalue(scores, k=num_to_mask).values
