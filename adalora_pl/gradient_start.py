"""The gradient-SVD start (``adapter_init="gradient_svd"``, docs/method.md §13): A and B of each SVD adapter from the
singular vectors of its base weight's loss gradient, averaged over the first batches.

Plain torch, no Lightning: :class:`~adalora_pl.AdaLoRACallback` feeds it the losses of the module's own
``training_step`` at the start of fit; anyone with a loss can call it directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from adalora_pl.layers import SVDLinear

__all__ = ["base_weight_gradients", "generated_losses", "start_from_gradients"]


def base_weight_gradients(module: nn.Module, layers: Mapping[str, SVDLinear], losses: Iterable[torch.Tensor],
                          loss_scale: float = 1.0) -> tuple[dict[str, torch.Tensor], int]:
    """The mean over ``losses`` of each adapted layer's base-weight gradient ``dL/dW`` (float32, W's layout).

    The base weights are made to require gradients only while ``losses`` is consumed: ``losses`` is iterated lazily,
    so each loss must be computed on demand (a generator running the forward pass), after this function has turned the
    gradients on. Every gradient of ``module`` is cleared afterwards (set to None), also on error, so the first
    optimizer step sees none of this.

    Args:
        module: the model whose ``layers`` these are (its gradients are cleared at the end).
        layers: the SVD adapters by name.
        losses: the losses of the first batches, produced lazily (each is backpropagated before the next is made).
        loss_scale: each loss is multiplied by this before ``backward`` and the gradients divided by it (a
            GradScaler's scale, so float16 gradients do not underflow).

    Returns:
        ``({name: mean gradient}, number of losses)``.

    Raises:
        ValueError: ``losses`` was empty, or a gradient came out inf/NaN (naming the layer).
    """
    weights = {name: layer.base_layer.weight for name, layer in layers.items()}
    flags = {name: w.requires_grad for name, w in weights.items()}
    sums: dict[str, torch.Tensor] = {}
    count = 0
    try:
        for w in weights.values():
            w.requires_grad_(True)
        for loss in losses:
            (loss * loss_scale).backward()
            count += 1
            for name, w in weights.items():
                # Summed per batch in float32 and cleared, so a half-precision weight's gradient never accumulates
                # in half precision.
                g = w.grad.float() if w.grad is not None else torch.zeros(w.shape, device=w.device)
                sums[name] = sums[name].add_(g) if name in sums else g.clone()
                w.grad = None
    finally:
        for name, w in weights.items():
            w.requires_grad_(flags[name])
        module.zero_grad(set_to_none=True)
    if count == 0:
        raise ValueError("the gradient-SVD start got no batch to take the gradient of (an empty train dataloader?)")
    means = {name: total / (count * loss_scale) for name, total in sums.items()}
    for name, g in means.items():
        if not torch.isfinite(g).all():
            raise ValueError(f"the gradient-SVD start's gradient of {name}'s base weight is inf/NaN over the first "
                             f"{count} batches; check the loss, or use another adapter_init")
    return means, count


def start_from_gradients(layers: Mapping[str, SVDLinear], gradients: Mapping[str, torch.Tensor]) -> float:
    """:meth:`SVDLinear.start_from_gradient` on every layer; returns the mean fraction of the gradients' squared
    Frobenius norm that the kept ``r`` singular directions hold (1.0: the gradient is rank <= r), for the log."""
    captured = []
    for name, layer in layers.items():
        s = layer.start_from_gradient(gradients[name]).square()
        total = float(s.sum())
        captured.append(float(s[:layer.r].sum()) / total if total > 0 else 1.0)
    return sum(captured) / max(len(captured), 1)


def generated_losses(batches: Iterable, loss_of: Callable[[object, int], torch.Tensor | None],
                     limit: int) -> Iterable[torch.Tensor]:
    """The losses ``loss_of(batch, index)`` of the first ``limit`` batches, lazily; a batch whose loss is None
    (a skipped training step) does not count."""
    produced = 0
    for index, batch in enumerate(batches):
        loss = loss_of(batch, index)
        if loss is None:
            continue
        yield loss
        produced += 1
        if produced >= limit:  # before fetching another batch
            return
