"""The "prune LoRA" ablation: LoRA doublets pruned by importance on AdaLoRA's schedule, without recovery
(paper §3.2: a pruned doublet of LoRA loses its singular vectors, a masked SVD triplet keeps them).

The layer and its pruner need no Lightning; the callback that runs them is
:class:`adalora_pl.baselines.prune_lora_callback.PruneLoRACallback`."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from adalora_pl.allocator import MaskEvent, RankAllocator
from adalora_pl.layers import LoRALinear, Scaling


class PrunableLoRALinear(LoRALinear):
    """LoRA whose doublets (row i of A, column i of B) can be pruned for good.

    A pruned doublet is zeroed and its gradient is masked by a tensor hook, so it gets no gradient and
    stays at zero (the pruner also re-zeroes it after every optimizer step, against momentum).
    """

    def __init__(
        self, base_layer: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
        autocast_adapter_dtype: bool = True, scaling: Scaling = "alpha_over_r",
    ) -> None:
        super().__init__(base_layer, r, lora_alpha, lora_dropout, autocast_adapter_dtype, scaling=scaling)
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=self.lora_A.device))
        self.parameters_per_rank = self.in_features + self.out_features  # a row of A, a column of B
        self.lora_A.register_hook(lambda g: g * self.rank_mask.view(-1, 1).to(g.dtype))
        self.lora_B.register_hook(lambda g: g * self.rank_mask.view(1, -1).to(g.dtype))

    @torch.no_grad()
    def apply_rank_mask(self) -> None:
        self.lora_A.masked_fill_(~self.rank_mask.view(-1, 1), 0.0)
        self.lora_B.masked_fill_(~self.rank_mask.view(1, -1), 0.0)




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
        if self.group is not None:  # its scores and masks read whole rows of A and columns of B
            raise RuntimeError("the prune-LoRA ablation does not run on sharded (FSDP2) adapters; use DDP for it")

    @staticmethod
    def layer_params(layer: nn.Module) -> tuple[torch.Tensor, ...]:
        return layer.lora_A, layer.lora_B

    @torch.no_grad()
    def allocate(self, step: int) -> MaskEvent:
        event = super().allocate(step)
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
