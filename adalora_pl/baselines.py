"""Baselines and ablations that AdaLoRA is compared with (paper §5 and Table 1/ablations):

- bottleneck adapters (Houlsby et al. 2019: after attention and FFN; Pfeiffer et al. 2021: after FFN only),
- "prune LoRA": LoRA doublets pruned by importance on AdaLoRA's schedule, without recovery (paper §3.2:
  a pruned doublet of LoRA loses its singular vectors, a masked SVD triplet keeps them),
- a budget helper that counts adapter parameters the way the paper's tables do (#Params) and picks
  ranks / bottleneck sizes to match a budget.

The other ablations need no code of their own: SVD-LoRA is ``method=adalora`` with ``target_r == init_r``
(nothing is masked), AdaLoRA without the regularizer is ``orth_reg_weight=0``, and the importance
variants are ``importance="sensitivity"`` / ``"magnitude"``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from adalora_pl.allocator import MaskEvent, RankAllocator
from adalora_pl.callback import AdaLoRACallback
from adalora_pl.injection import is_linear, name_matches, register_adapter
from adalora_pl.layers import AdapterLayer, LoRALinear, linear_shape

# --------------------------------------------------------------------------- bottleneck adapters


class BottleneckAdapter(AdapterLayer):
    """A sublayer output followed by a residual bottleneck: ``h + up(act(down(h)))``, ``h = base(x)``.

    Wrapping the output projection of a sublayer puts the adapter where Houlsby et al. place it: on the
    sublayer's output, before the residual connection and layer norm of the block.

    Args:
        base_layer: the sublayer's output projection (frozen).
        r: bottleneck size.
        lora_alpha: unused (kept for the common adapter signature).
        lora_dropout: dropout on the adapter's input.
    """

    def __init__(
        self, base_layer: nn.Module, r: int, lora_alpha: float = 1.0, lora_dropout: float = 0.0,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        if r <= 0:
            raise ValueError(f"bottleneck size must be > 0, got {r}")
        super().__init__(base_layer, r, lora_alpha, lora_dropout, autocast_adapter_dtype)
        factory = self.adapter_factory()
        self.adapter_down = nn.Linear(self.out_features, r, **factory)
        self.adapter_up = nn.Linear(r, self.out_features, **factory)
        nn.init.normal_(self.adapter_down.weight, std=0.02)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)  # starts as the identity: the model equals the base model
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)
        z = self.adapter_down(self.lora_dropout(h).to(self.adapter_down.weight.dtype))
        return h + self.adapter_up(nn.functional.gelu(z)).to(h.dtype)

    def merge(self) -> None:  # a non-linear adapter cannot be folded into the weight
        raise NotImplementedError("bottleneck adapters are non-linear and cannot be merged into the base weight")


# Output projections of the attention and FFN sublayers, per model type. "ffn" names are matched after
# removing the "attention" matches (BERT's FFN "output.dense" is also a suffix of "attention.output.dense").
BOTTLENECK_SITES: dict[str, dict[str, list[str]]] = {
    "bert": {"attention": ["attention.output.dense"], "ffn": ["output.dense"]},
    "roberta": {"attention": ["attention.output.dense"], "ffn": ["output.dense"]},
    "deberta-v2": {"attention": ["attention.output.dense"], "ffn": ["output.dense"]},
    "mpnet": {"attention": ["attn.o"], "ffn": ["output.dense"]},
    "bart": {"attention": ["out_proj"], "ffn": ["fc2"]},
    "llama": {"attention": ["o_proj"], "ffn": ["down_proj"]},
}


def bottleneck_targets(model: nn.Module, variant: str) -> list[str]:
    """Full module paths for ``"houlsby"`` (attention + FFN outputs) or ``"pfeiffer"`` (FFN outputs)."""
    if variant not in ("houlsby", "pfeiffer"):
        raise ValueError(f"bottleneck variant must be 'houlsby' or 'pfeiffer', got {variant!r}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in BOTTLENECK_SITES:
        raise ValueError(
            f"no bottleneck adapter sites for model_type {model_type!r}; known: {sorted(BOTTLENECK_SITES)}"
        )
    sites = BOTTLENECK_SITES[model_type]
    linears = [n for n, m in model.named_modules() if is_linear(m)]
    attention = [n for n in linears if any(name_matches(n, s) for s in sites["attention"])]
    ffn = [n for n in linears if any(name_matches(n, s) for s in sites["ffn"]) and n not in attention]
    return sorted(ffn + attention) if variant == "houlsby" else sorted(ffn)


# --------------------------------------------------------------------------- prune LoRA


class PrunableLoRALinear(LoRALinear):
    """LoRA whose doublets (row i of A, column i of B) can be pruned for good.

    A pruned doublet is zeroed and its gradient is masked by a tensor hook, so it gets no gradient and
    stays at zero (the pruner also re-zeroes it after every optimizer step, against momentum).
    """

    def __init__(
        self, base_layer: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        super().__init__(base_layer, r, lora_alpha, lora_dropout, autocast_adapter_dtype)
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=self.lora_A.device))
        self.lora_A.register_hook(lambda g: g * self.rank_mask.view(-1, 1).to(g.dtype))
        self.lora_B.register_hook(lambda g: g * self.rank_mask.view(1, -1).to(g.dtype))

    @torch.no_grad()
    def apply_rank_mask(self) -> None:
        self.lora_A.masked_fill_(~self.rank_mask.view(-1, 1), 0.0)
        self.lora_B.masked_fill_(~self.rank_mask.view(1, -1), 0.0)

    @property
    def kept_rank(self) -> int:
        return int(self.rank_mask.sum())


register_adapter("prune_lora", PrunableLoRALinear)
register_adapter("bottleneck", BottleneckAdapter)


class DoubletPruner(RankAllocator):
    """AdaLoRA's schedule and importance applied to LoRA doublets, without recovery.

    Score of doublet i: mean_j s(A[i, j]) + mean_j s(B[j, i]) with s = Ibar * U (docs/method.md §3). Pruned doublets
    score -inf at later events, so they count against the budget and never come back. Everything else
    (schedule, averages, DDP mask broadcast, device following, state and its checks) is
    :class:`~adalora_pl.allocator.RankAllocator`'s; ``importance`` is always sensitivity x uncertainty.
    """

    layer_type = PrunableLoRALinear

    def __init__(self, adapters: Mapping[str, PrunableLoRALinear], **kwargs) -> None:
        importance = kwargs.pop("importance", "sensitivity_uncertainty")
        if importance != "sensitivity_uncertainty":
            raise ValueError(f"DoubletPruner scores doublets by sensitivity x uncertainty, got {importance!r}")
        super().__init__(adapters, importance=importance, **kwargs)

    @staticmethod
    def layer_params(layer: nn.Module) -> tuple[torch.Tensor, ...]:
        return layer.lora_A, layer.lora_B

    @torch.no_grad()
    def update_and_allocate(self, step: int, applied: torch.Tensor | None = None) -> MaskEvent:
        event = super().update_and_allocate(step, applied)
        self.apply_rank_pattern()  # against momentum: a pruned doublet stays exactly zero
        return event

    def layer_scores(self) -> list[torch.Tensor]:
        scores = self.element_scores()
        out = []
        for i, layer in enumerate(self.layers):
            score = scores[2 * i].mean(dim=1) + scores[2 * i + 1].mean(dim=0)
            out.append(score.masked_fill(~layer.rank_mask, float("-inf")))
        return out

    def magnitude_scores(self) -> list[torch.Tensor]:
        """||A_i|| * ||B_:,i|| of every doublet."""
        return [(m.lora_A.detach().float().norm(dim=1) * m.lora_B.detach().float().norm(dim=0)) for m in self.layers]

    @torch.no_grad()
    def set_rank_masks(self, keeps) -> None:
        for layer, layer_keep in zip(self.layers, keeps, strict=True):
            layer.rank_mask &= layer_keep  # no recovery

    @torch.no_grad()
    def apply_rank_pattern(self) -> None:
        for layer in self.layers:
            layer.apply_rank_mask()


# --------------------------------------------------------------------------- budget helper


def adapter_param_count(model: nn.Module) -> int:
    """#Params as the paper's tables count it: trainable adapter parameters, heads excluded.

    For AdaLoRA and prune-LoRA the count is of the kept ranks (a kept triplet costs in + out + 1, a kept
    doublet in + out); for LoRA and bottleneck adapters it is every adapter parameter.
    """
    from adalora_pl.injection import find_adapters
    from adalora_pl.layers import SVDLinear

    total = 0
    for layer in find_adapters(model).values():
        if isinstance(layer, SVDLinear):
            total += int(layer.rank_mask.sum()) * (layer.in_features + layer.out_features + 1)
        elif isinstance(layer, PrunableLoRALinear):
            total += layer.kept_rank * (layer.in_features + layer.out_features)
        else:
            total += sum(p.numel() for n, p in layer.named_parameters() if not n.startswith("base_layer."))
    return total


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


class PruneLoRACallback(AdaLoRACallback):
    """:class:`~adalora_pl.callback.AdaLoRACallback` for the "prune LoRA" ablation: LoRA doublets pruned
    for good on AdaLoRA's schedule (no orthogonal regularizer: LoRA factors are not singular vectors).
    Takes the same arguments; ``importance`` must be ``"sensitivity_uncertainty"``."""

    adapter_method = "prune_lora"
    adapter_class = PrunableLoRALinear
    allocator_class = DoubletPruner

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("orth_reg_weight", 0.0)
        super().__init__(*args, **kwargs)
        if self.importance != "sensitivity_uncertainty":
            raise ValueError(
                f"PruneLoRACallback scores doublets by sensitivity x uncertainty, got {self.importance!r}"
            )
