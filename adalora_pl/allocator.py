"""The state object of AdaLoRA: importance averages, the schedule and the rank pattern of a set of layers.

:class:`RankAllocator` is called once per optimizer step, after ``optimizer.step()`` and before
``zero_grad()``, with the 0-based step index (docs/method.md §6). It follows PEFT's ``update_and_allocate``,
in two halves that may run at different points: :meth:`~RankAllocator.update_importance` needs the gradients (right
after the step), :meth:`~RankAllocator.allocate` only the averages (any time before the next step):

- ``step < total_step - tfinal``: update importance; mask to the cubic budget on multiples of delta_t.
- ``step == total_step - tfinal``: mask to the target budget, freeze that pattern, drop the averages.
- later steps: re-apply the frozen pattern.

The parameters of all layers are gathered once, in a fixed order (A, E, B of each layer), so the
per-step update is a handful of vectorized tensor ops on one flat float32 buffer. That buffer follows the
parameters wherever they move (Lightning moves the module to its device after the callback's ``setup``).

A step without gradients (a ``training_step`` that returned None), with inf/NaN gradients, or that a
GradScaler skipped (``applied`` False) leaves the averages unchanged. A mask event before any gradient reached the
averages raises instead of masking every triplet (all scores would tie at zero).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

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
from adalora_pl.sharding import (
    global_offsets,
    is_sharded,
    local,
    scatter_partial_scores,
    shard_group,
    sum_across_ranks,
)

log = logging.getLogger(__name__)


def broadcast_keep_mask(keep: torch.Tensor) -> torch.Tensor:
    """Rank 0's boolean keep-mask on every rank: one ``torch.distributed.broadcast`` of a uint8 tensor on the
    process group's device (CUDA for NCCL, CPU otherwise); nothing is pickled."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    buffer = keep.to(device=device, dtype=torch.uint8)
    dist.broadcast(buffer, src=0)
    return buffer.to(device=keep.device, dtype=torch.bool)


def optimizer_holding(params: Sequence[torch.Tensor], optimizers: Sequence[torch.optim.Optimizer]):
    """The one optimizer among ``optimizers`` that holds every tensor of ``params``.

    Raises:
        RuntimeError: none holds them, several share them, or one holds only some (the importance must see every
            adapter parameter right after the step that updated it).
    """
    tracked = {id(p) for p in params}
    holders = [o for o in optimizers if tracked & {id(p) for g in o.param_groups for p in g["params"]}]
    held = {id(p) for o in holders for g in o.param_groups for p in g["params"]} & tracked
    if len(holders) == 1 and held == tracked:
        return holders[0]
    where = ("none of the Trainer's optimizers holds them" if not holders else
             f"{len(holders)} optimizers hold them" if len(holders) > 1 else f"the optimizer holds {len(held)} of them")
    raise RuntimeError(
        f"AdaLoRA needs one optimizer holding all {len(tracked)} adapter parameters; {where}. Build the optimizer "
        "in configure_optimizers from the module's trainable parameters (the callback injects the adapters at "
        "setup, before configure_optimizers runs)."
    )


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

    Subclasses that prune other factorizations (``adalora_pl.baselines.DoubletPruner``) set
    :attr:`layer_type` and override :meth:`layer_params`, :meth:`layer_scores`, :meth:`magnitude_scores`,
    :meth:`set_rank_masks` and :meth:`apply_rank_pattern`.
    """

    layer_type: type[nn.Module] = SVDLinear

    def __init__(
        self,
        adapters: Mapping[str, nn.Module],
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
        kind = self.layer_type.__name__
        if not adapters:
            raise ValueError(f"{type(self).__name__} needs at least one {kind} layer")
        wrong = [n for n, m in adapters.items() if not isinstance(m, self.layer_type)]
        if wrong:
            raise TypeError(f"{type(self).__name__} works on {kind} layers; these are not: {wrong[:5]}")
        validate_ranks(min(m.r for m in adapters.values()), target_r)
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
        # Under FSDP2 the parameters are DTensors: the averages hold this rank's shards, and scores are summed over
        # the ranks of this group at mask events (adalora_pl/sharding.py). None for whole adapters.
        self.group = shard_group(self.params)
        self.numels = [local(p).numel() for p in self.params]
        device = local(self.params[0]).device
        numel = sum(self.numels)
        tracks_ema = importance != "magnitude"
        self.exp_avg_ipt = torch.zeros(numel if tracks_ema else 0, device=device)
        self.exp_avg_unc = torch.zeros(numel if importance == "sensitivity_uncertainty" else 0, device=device)
        self.last_step: int | None = None
        self.frozen = False
        self.last_finite: torch.Tensor | None = None
        # Optimizer steps whose gradients reached update_importance (a host-side count: no sync to keep it).
        self.importance_steps = 0
        self._kept_total: torch.Tensor | None = None

    @staticmethod
    def layer_params(layer: nn.Module) -> tuple[torch.Tensor, ...]:
        """The parameters of one layer that importance is tracked for, in buffer order."""
        return layer.lora_A, layer.lora_E, layer.lora_B

    @property
    def params(self) -> list[torch.Tensor]:
        """The tracked parameters of all layers, looked up on the layers each time: moving a module may replace
        its parameter objects (``Module.to`` does between incompatible tensor types, e.g. to ``meta``)."""
        return [p for m in self.layers for p in self.layer_params(m)]

    # ------------------------------------------------------------------ per-step entry points
    @torch.no_grad()
    def update_and_allocate(self, step: int, applied: torch.Tensor | None = None) -> MaskEvent:
        """Run the allocator for the optimizer step ``step`` (0-based) just taken; see module docstring.

        PEFT's ``update_and_allocate``: :meth:`update_importance` (while the pattern is not fixed yet), then
        :meth:`allocate`. Callers that cannot run both at the same point (the callback reads the gradients right
        after ``optimizer.step()`` and masks at the end of the batch) call the two halves themselves.

        Args:
            step: 0-based index of the optimizer step just taken.
            applied: optional 0-dim bool tensor, False when the optimizer step was skipped (GradScaler found
                inf/NaN in some gradient): the averages are then left unchanged.
        """
        if step < self.schedule.final_step:
            self.update_importance(applied)
        return self.allocate(step)

    @torch.no_grad()
    def allocate(self, step: int) -> MaskEvent:
        """The schedule's part of optimizer step ``step`` (0-based): mask to the budget on mask steps, fix the
        pattern at ``total_step - tfinal``, re-apply it afterwards. Needs no gradients (the importance averages of
        the step must already hold it)."""
        self.follow_parameters()
        schedule = self.schedule
        final_step = schedule.final_step
        phase = schedule.phase_at(step)
        first_call = self.last_step is None
        self.last_step = step
        if step < final_step:
            budget = schedule.budget_at(step)
            if schedule.is_mask_step(step):
                return MaskEvent(step, phase, budget, True, self.mask_to_budget(budget))
            return MaskEvent(step, phase, budget, False)
        if step == final_step or not self.frozen:
            if step > final_step and first_call:
                threshold = self._fix_pattern_without_importance(step)
            else:
                threshold = self.mask_to_budget(schedule.target_budget)
            self.frozen = True
            self.exp_avg_ipt.zero_()
            self.exp_avg_unc.zero_()
            self._declare_pattern(frozen=True)
            return MaskEvent(step, phase, schedule.target_budget, True, threshold)
        self.apply_rank_pattern()
        return MaskEvent(step, phase, schedule.target_budget, False)

    def follow_parameters(self) -> None:
        """Move the averages to the parameters' device (a no-op when they are already there)."""
        # One parameter decides (all layers move together); no list of every parameter on the per-step path.
        device = local(self.layer_params(self.layers[0])[0]).device
        if self.exp_avg_ipt.device != device:
            self.exp_avg_ipt = self.exp_avg_ipt.to(device)
            self.exp_avg_unc = self.exp_avg_unc.to(device)

    def _fix_pattern_without_importance(self, step: int) -> torch.Tensor | None:
        """First call past ``total_step - tfinal``: no importance was ever collected, so scores would all tie
        at zero and mask every triplet. Keep the pattern the layers carry (e.g. from a weights-only
        checkpoint); without one, keep the ``target_budget`` triplets of largest magnitude."""
        if not all(bool(m.rank_mask.all()) for m in self.layers):
            log.warning("allocator first called at step %d, past total_step - tfinal: keeping the rank pattern the "
                        "layers carry", step)
            self.apply_rank_pattern()
            return None
        log.warning("allocator first called at step %d, past total_step - tfinal, with no importance collected: "
                    "keeping the %d triplets of largest magnitude", step, self.schedule.target_budget)
        scores = torch.cat(self.magnitude_scores())
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep[torch.topk(scores, self.schedule.target_budget).indices] = True
        self._apply_keep(keep)
        return None

    # ------------------------------------------------------------------ importance
    @torch.no_grad()
    def update_importance(self, applied: torch.Tensor | None = None) -> None:
        """One EMA step from the current weights and the gradients still in ``.grad``.

        Nothing changes when no parameter has a gradient (no backward ran for this step).
        """
        if self.importance == "magnitude":
            return
        params = self.params
        if all(p.grad is None for p in params):
            return
        self.follow_parameters()
        self.importance_steps += 1
        params = [local(p.detach()) for p in params]  # this rank's shards (the whole tensors without sharding)
        grads = [local(p.grad) if p.grad is not None else torch.zeros_like(local(p)) for p in self.params]
        ipt = elementwise_importance(params, grads)
        unc = self.exp_avg_unc if self.importance == "sensitivity_uncertainty" else None
        self.last_finite = update_importance_(self.exp_avg_ipt, unc, ipt, self.beta1, self.beta2, applied)

    def element_scores(self) -> list[torch.Tensor]:
        """Per-element scores s, one tensor per tracked parameter, shaped like it (like its local shard)."""
        if self.importance == "sensitivity_uncertainty":
            flat = self.exp_avg_ipt * self.exp_avg_unc
        else:
            flat = self.exp_avg_ipt
        return [t.view_as(local(p)) for t, p in zip(flat.split(self.numels), self.params, strict=True)]

    def layer_scores(self) -> list[torch.Tensor]:
        """The triplet scores S of every layer, one (r,) tensor per layer (the same on every rank)."""
        if self.importance == "magnitude":
            return self.magnitude_scores()
        scores = self.element_scores()
        if self.group is None:
            return [triplet_scores(scores[3 * i + 1], scores[3 * i], scores[3 * i + 2])
                    for i in range(len(self.layers))]
        # Sharded: each rank scores what it holds into a slot per triplet; one all-reduce of all layers' slots.
        partial = []
        for i, m in enumerate(self.layers):
            A, E, B = self.layer_params(m)
            partial.append(scatter_partial_scores(
                scores[3 * i + 1], scores[3 * i], scores[3 * i + 2], global_offsets(E), global_offsets(A),
                global_offsets(B), m.r, m.in_features, m.out_features))
        return list(sum_across_ranks(torch.cat(partial), self.group).split([m.r for m in self.layers]))

    def magnitude_scores(self) -> list[torch.Tensor]:
        """|E_i| of every layer, one (r,) float32 tensor per layer (the same on every rank)."""
        if self.group is None:
            return [m.lora_E.detach().float().abs().view(-1) for m in self.layers]
        partial = []
        for m in self.layers:
            row, values = global_offsets(m.lora_E)[0], local(m.lora_E.detach()).float().abs().view(-1)
            partial.append(torch.zeros(m.r, device=values.device).index_add_(
                0, torch.arange(row, row + values.numel(), device=values.device), values))
        return list(sum_across_ranks(torch.cat(partial), self.group).split([m.r for m in self.layers]))

    # ------------------------------------------------------------------ masking
    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> torch.Tensor | None:
        """Keep the ``budget`` best triplets across all layers; zero E of the others (docs/method.md §5).

        Ties at the threshold are all masked, as in the reference. Returns the threshold (0-dim tensor) or
        ``None`` when the budget keeps everything.
        """
        all_scores = torch.cat(self.layer_scores())
        threshold = mask_threshold(all_scores, self.schedule.init_budget - budget)
        if threshold is not None and self.importance != "magnitude" and self.importance_steps == 0:
            # Every score would tie at zero and the ties rule would mask every triplet: the adapters would be
            # wiped without a word. Nothing reached the averages, so something upstream is wrong.
            raise RuntimeError(
                f"AdaLoRA: no importance was collected before the mask event at step {self.last_step}: the "
                "adapters had no gradient after any optimizer step, so every triplet would be masked. Check that "
                "the optimizer holds the adapter parameters and that the loss depends on them."
            )
        if threshold is None:
            keep = torch.ones_like(all_scores, dtype=torch.bool)
        else:
            keep = ~(all_scores <= threshold)
        self._apply_keep(keep)
        return threshold

    def _apply_keep(self, keep: torch.Tensor) -> None:
        if self.sync_keep is not None:
            keep = self.sync_keep(keep)
        self.set_rank_masks(keep.split([m.r for m in self.layers]))
        self.apply_rank_pattern()
        self._kept_total = None

    def kept_total(self) -> torch.Tensor:
        """Triplets kept by the last mask, over all layers: a 0-dim tensor on the device (no host sync), computed
        once per mask."""
        if self._kept_total is None:
            self._kept_total = torch.cat([m.rank_mask.view(-1) for m in self.layers]).sum()
        return self._kept_total

    @torch.no_grad()
    def set_rank_masks(self, keeps: Sequence[torch.Tensor]) -> None:
        """Store each layer's new keep-mask in its ``rank_mask`` (AdaLoRA: a masked triplet may come back)."""
        for layer, layer_keep in zip(self.layers, keeps, strict=True):
            layer.rank_mask.copy_(layer_keep)

    @torch.no_grad()
    def apply_rank_pattern(self) -> None:
        """Zero the singular values that ``rank_mask`` marks as pruned (on this rank's shard of E when sharded)."""
        for layer in self.layers:
            E = local(layer.lora_E)
            row = global_offsets(layer.lora_E)[0]
            E.masked_fill_(~layer.rank_mask[row:row + E.shape[0]].view(-1, 1), 0.0)

    def rank_pattern(self) -> dict[str, list[bool]]:
        """Module path -> kept flag per initial triplet (host sync)."""
        return {n: m.rank_mask.tolist() for n, m in zip(self.names, self.layers, strict=True)}

    def kept_ranks(self) -> dict[str, int]:
        masks = torch.stack([m.rank_mask.sum() for m in self.layers]).tolist()
        return dict(zip(self.names, masks, strict=True))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """EMAs, step, frozen flag and rank pattern; enough to resume bitwise.

        The averages are stored per tracked parameter at its whole shape, so that a checkpoint does not depend on
        how the parameters were sharded: under FSDP2 each rank's shards are gathered here (a collective: every rank
        must call it, as Lightning does when it saves), and :meth:`load_state_dict` takes each rank's part back.
        """
        return {
            "names": list(self.names),
            "shapes": [list(p.shape) for p in self.params],
            "importance": self.importance,
            "exp_avg_ipt": self._whole_averages(self.exp_avg_ipt),
            "exp_avg_unc": self._whole_averages(self.exp_avg_unc),
            "last_step": self.last_step,
            "frozen": self.frozen,
            "importance_steps": self.importance_steps,
            "rank_mask": {n: m.rank_mask.clone() for n, m in zip(self.names, self.layers, strict=True)},
        }

    def _whole_averages(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``flat`` (this rank's averages, in buffer order) as one tensor per parameter at its whole shape."""
        if flat.numel() == 0:
            return []
        parts = [t.view_as(local(p)) for t, p in zip(flat.split(self.numels), self.params, strict=True)]
        if self.group is None:
            return [t.clone() for t in parts]
        from torch.distributed.tensor import DTensor

        return [DTensor.from_local(t, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
                if is_sharded(p) else t.clone() for t, p in zip(parts, self.params, strict=True)]

    def _local_averages(self, whole: Sequence[torch.Tensor]) -> torch.Tensor:
        """This rank's part of per-parameter whole averages, as one flat buffer in buffer order."""
        parts = []
        for t, p in zip(whole, self.params, strict=True):
            slices = tuple(slice(o, o + n) for o, n in zip(global_offsets(p), local(p).shape, strict=True))
            parts.append(t[slices].reshape(-1))
        return torch.cat(parts) if parts else torch.zeros(0)

    def load_state_dict(self, state: Mapping) -> None:
        shapes = [list(p.shape) for p in self.params]
        if list(state["names"]) != self.names or [list(s) for s in state["shapes"]] != shapes:
            raise ValueError(
                "allocator state does not match these adapters: saved for "
                f"{len(state['names'])} layers ({state['names'][:3]}...), model has {len(self.names)} "
                f"({self.names[:3]}...) or their ranks differ"
            )
        if state["importance"] != self.importance:
            raise ValueError(f"allocator state is for importance={state['importance']!r}, not {self.importance!r}")
        self.follow_parameters()
        if self.exp_avg_ipt.numel():
            self.exp_avg_ipt.copy_(self._local_averages(state["exp_avg_ipt"]))
        if self.exp_avg_unc.numel():
            self.exp_avg_unc.copy_(self._local_averages(state["exp_avg_unc"]))
        self.last_step = state["last_step"]
        self.frozen = bool(state["frozen"])
        self.importance_steps = int(state["importance_steps"])
        for name, layer in zip(self.names, self.layers, strict=True):
            layer.rank_mask.copy_(state["rank_mask"][name])
        self._kept_total = None
        self._declare_pattern(frozen=self.frozen)

    def _declare_pattern(self, frozen: bool) -> None:
        """Tell the layers whether the rank pattern is final (``SVDLinear.freeze_pattern``: the fused kernel then
        computes the kept triplets only). Once per fit or resume: it reads each layer's mask on the host."""
        for layer in self.layers:
            method = getattr(layer, "freeze_pattern" if frozen else "thaw_pattern", None)
            if method is not None:
                method()
