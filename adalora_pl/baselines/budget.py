"""#Params as the paper's tables count it, and ranks / bottleneck sizes that match a parameter budget.

The count of a model's adapters is :func:`adalora_pl.injection.count_adapter_parameters` with ``kept_only=True``
(a kept AdaLoRA triplet costs in + out + 1, a kept prune-LoRA doublet in + out, other adapters all their
parameters); the functions here plan ranks before any adapter exists.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from adalora_pl.layers import linear_shape


def params_for_rank(shapes: Iterable[tuple[int, int]], method: str, r: int) -> int:
    """Adapter parameters of ``method`` at rank / bottleneck size ``r`` on layers of (in, out) ``shapes``."""
    shapes = list(shapes)
    if method in ("lora", "prune_lora"):
        return sum(r * (i + o) for i, o in shapes)
    if method == "adalora":
        return sum(r * (i + o + 1) for i, o in shapes)
    if method == "bottleneck":
        return sum(2 * r * o + r + o for _, o in shapes)  # down (o x r + r) and up (r x o + o)
    raise ValueError(f"unknown method {method!r}; expected lora, prune_lora, adalora or bottleneck")


def match_budget(
    shapes: Iterable[tuple[int, int]], method: str, target_params: int, max_r: int = 4096
) -> tuple[int, int]:
    """The rank / bottleneck size whose #Params is closest to ``target_params``: ``(r, actual_params)``."""
    shapes = list(shapes)
    if target_params <= 0:
        raise ValueError(f"target_params must be > 0, got {target_params}")
    best = min(range(1, max_r + 1), key=lambda r: abs(params_for_rank(shapes, method, r) - target_params))
    return best, params_for_rank(shapes, method, best)


def linear_shapes(model: nn.Module, names: Iterable[str]) -> list[tuple[int, int]]:
    """(in, out) of the named linear layers."""
    return [linear_shape(model.get_submodule(n))[:2] for n in names]
