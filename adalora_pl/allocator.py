"""The state object of AdaLoRA: importance averages, the schedule and the rank pattern of a set of layers.

:class:`RankAllocator` is called once per optimizer step, after ``optimizer.step()`` and before
``zero_grad()``, with the 0-based step index (spec §6). It follows PEFT's ``update_and_allocate``:

- ``step < total_step - tfinal``: update importance; mask to the cubic budget on multiples of delta_t.
- ``step == total_step - tfinal``: mask to the target budget, freeze that pattern, drop the averages.
- later steps: re-apply the frozen pattern.

The parameters of all layers are gathered once, in a fixed order (A, E, B of each layer), so the
per-step update is a handful of vectorized tensor ops on one flat float32 buffer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from adalora_pl.importance import (
    Importance,
    elementwise_importance,
    mask_threshold,
    triplet_scores,
    update_importance_,
    validate_importance,
)
from adalora_pl.layers import SVDLinear
from adalora_pl.schedule import BudgetSchedule, validate_betas, validate_ranks

log = logging.getLogger(__name__)


@dataclass
class MaskEvent:
    """What one call of :meth:`RankAllocator.update_and_allocate` did (for logging)."""

    step: int
    phase: str
    budget: int
    masked: bool  # a new mask was computed from scores at this step
    threshold: torch.Tensor | None = None  # 0-dim, on the device; None when nothing was masked


class RankAllocator:
    """Importance-driven rank allocation over a set of :class:`SVDLinear` layers.

    Args:
        adapters: the layers by module path (the order fixes the order of the flat buffers).
        target_r: average rank kept per layer at the end (bT = target_r x number of layers).
        tinit: warm-up steps without pruning.
        tfinal: final steps with the frozen pattern.
        total_step: total number of optimizer steps T.
        delta_t: steps between mask events in the cubic phase.
        beta1: EMA coefficient of the sensitivity.
        beta2: EMA coefficient of the uncertainty.
        importance: ``"sensitivity_uncertainty"`` (the paper's s = Ibar * U), ``"sensitivity"``
            (s = Ibar) or ``"magnitude"`` (S_i = |E_i|), the variants of the paper's ablation (§5.2).
        sync_keep: optional function applied to the flat boolean keep-mask of all triplets before it is
            applied (e.g. a broadcast from rank 0 under DDP, so that every rank holds the same masks).
    """

    def __init__(
        self,
        adapters: Mapping[str, SVDLinear],
        *,
        target_r: int,
        tinit: int,
        tfinal: int,
        total_step: int,
        delta_t: int = 1,
        beta1: float = 0.85,
        beta2: float = 0.85,
        importance: Importance = "sensitivity_uncertainty",
        sync_keep: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if not adapters:
            raise ValueError("RankAllocator needs at least one SVDLinear layer")
        not_svd = [n for n, m in adapters.items() if not isinstance(m, SVDLinear)]
        if not_svd:
            raise TypeError(f"RankAllocator works on SVDLinear layers; these are not: {not_svd[:5]}")
        init_rs = {m.r for m in adapters.values()}
        validate_ranks(min(init_rs), target_r)
        validate_betas(beta1, beta2)
        validate_importance(importance)
        self.names = list(adapters)
        self.layers = list(adapters.values())
        self.beta1, self.beta2, self.importance = beta1, beta2, importance
        self.sync_keep = sync_keep
        self.schedule = BudgetSchedule(
            init_budget=sum(m.r for m in self.layers),
            target_budget=target_r * len(self.layers),
            tinit=tinit,
            tfinal=tfinal,
            total_step=total_step,
            delta_t=delta_t,
        )
        self.params = [p for m in self.layers for p in (m.lora_A, m.lora_E, m.lora_B)]
        self.numels = [p.numel() for p in self.params]
        device = self.params[0].device
        numel = sum(self.numels)
        tracks_ema = importance != "magnitude"
        self.exp_avg_ipt = torch.zeros(numel if tracks_ema else 0, device=device)
        self.exp_avg_unc = torch.zeros(numel if importance == "sensitivity_uncertainty" else 0, device=device)
        self.last_step: int | None = None
        self.frozen = False
        self.last_finite: torch.Tensor | None = None

    # ------------------------------------------------------------------ per-step entry point
    @torch.no_grad()
    def update_and_allocate(self, step: int) -> MaskEvent:
        """Run the allocator for the optimizer step ``step`` (0-based) just taken; see module docstring."""
        schedule = self.schedule
        final_step = schedule.final_step
        phase = schedule.phase_at(step)
        self.last_step = step
        if step < final_step:
            self.update_importance()
            budget = schedule.budget_at(step)
            if schedule.is_mask_step(step):
                return MaskEvent(step, phase, budget, True, self.mask_to_budget(budget))
            return MaskEvent(step, phase, budget, False)
        if step == final_step or not self.frozen:
            if step > final_step:
                log.warning("allocator first called at step %d, past total_step - tfinal; fixing the pattern now",
                            step)
            threshold = self.mask_to_budget(schedule.target_budget)
            self.frozen = True
            self.exp_avg_ipt.zero_()
            self.exp_avg_unc.zero_()
            return MaskEvent(step, phase, schedule.target_budget, True, threshold)
        self.apply_rank_pattern()
        return MaskEvent(step, phase, schedule.target_budget, False)

    # ------------------------------------------------------------------ importance
    @torch.no_grad()
    def update_importance(self) -> None:
        """One EMA step from the current weights and the gradients still in ``.grad``."""
        if self.importance == "magnitude":
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        ipt = elementwise_importance([p.detach() for p in self.params], grads)
        unc = self.exp_avg_unc if self.importance == "sensitivity_uncertainty" else None
        self.last_finite = update_importance_(self.exp_avg_ipt, unc, ipt, self.beta1, self.beta2)

    def element_scores(self) -> list[torch.Tensor]:
        """Per-element scores s, one tensor per parameter (A, E, B of each layer), shaped like it."""
        if self.importance == "sensitivity_uncertainty":
            flat = self.exp_avg_ipt * self.exp_avg_unc
        else:
            flat = self.exp_avg_ipt
        return [t.view_as(p) for t, p in zip(flat.split(self.numels), self.params, strict=True)]

    def layer_scores(self) -> list[torch.Tensor]:
        """The triplet scores S of every layer, one (r,) tensor per layer."""
        if self.importance == "magnitude":
            return [m.lora_E.detach().float().abs().view(-1) for m in self.layers]
        scores = self.element_scores()
        return [triplet_scores(scores[3 * i + 1], scores[3 * i], scores[3 * i + 2]) for i in range(len(self.layers))]

    # ------------------------------------------------------------------ masking
    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> torch.Tensor | None:
        """Keep the ``budget`` best triplets across all layers; zero E of the others (spec §5).

        Returns the threshold (0-dim tensor) or ``None`` when the budget keeps everything.
        """
        per_layer = self.layer_scores()
        all_scores = torch.cat(per_layer)
        threshold = mask_threshold(all_scores, self.schedule.init_budget - budget)
        if threshold is None:
            keep = torch.ones_like(all_scores, dtype=torch.bool)
        else:
            keep = ~(all_scores <= threshold)
        if self.sync_keep is not None:
            keep = self.sync_keep(keep)
        for layer, layer_keep in zip(self.layers, keep.split([m.r for m in self.layers]), strict=True):
            layer.rank_mask.copy_(layer_keep)
        self.apply_rank_pattern()
        return threshold

    @torch.no_grad()
    def apply_rank_pattern(self) -> None:
        """Zero the singular values that ``rank_mask`` marks as pruned."""
        for layer in self.layers:
            layer.lora_E.masked_fill_(~layer.rank_mask.view(-1, 1), 0.0)

    def rank_pattern(self) -> dict[str, list[bool]]:
        """Module path -> kept flag per initial triplet (host sync)."""
        return {n: m.rank_mask.tolist() for n, m in zip(self.names, self.layers, strict=True)}

    def kept_ranks(self) -> dict[str, int]:
        masks = torch.stack([m.rank_mask.sum() for m in self.layers]).tolist()
        return dict(zip(self.names, masks, strict=True))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """EMAs, step, frozen flag and rank pattern; enough to resume bitwise."""
        return {
            "names": list(self.names),
            "numels": list(self.numels),
            "importance": self.importance,
            "exp_avg_ipt": self.exp_avg_ipt.clone(),
            "exp_avg_unc": self.exp_avg_unc.clone(),
            "last_step": self.last_step,
            "frozen": self.frozen,
            "rank_mask": {n: m.rank_mask.clone() for n, m in zip(self.names, self.layers, strict=True)},
        }

    def load_state_dict(self, state: Mapping) -> None:
        if list(state["names"]) != self.names or list(state["numels"]) != self.numels:
            raise ValueError(
                "allocator state does not match these adapters: saved for "
                f"{len(state['names'])} layers ({state['names'][:3]}...), model has {len(self.names)} "
                f"({self.names[:3]}...) or their ranks differ"
            )
        if state["importance"] != self.importance:
            raise ValueError(f"allocator state is for importance={state['importance']!r}, not {self.importance!r}")
        self.exp_avg_ipt.copy_(state["exp_avg_ipt"])
        self.exp_avg_unc.copy_(state["exp_avg_unc"])
        self.last_step = state["last_step"]
        self.frozen = bool(state["frozen"])
        for name, layer in zip(self.names, self.layers, strict=True):
            layer.rank_mask.copy_(state["rank_mask"][name])
