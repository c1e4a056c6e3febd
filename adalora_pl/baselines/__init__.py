"""Baselines and ablations that AdaLoRA is compared with (paper §5, Table 1 and the ablations).

- :mod:`~adalora_pl.baselines.bottleneck`: Houlsby / Pfeiffer bottleneck adapters;
- :mod:`~adalora_pl.baselines.prune_lora`: LoRA doublets pruned without recovery, on AdaLoRA's schedule (its
  callback: :mod:`~adalora_pl.baselines.prune_lora_callback`);
- :mod:`~adalora_pl.baselines.budget`: ranks and bottleneck sizes that match a #Params budget;
- :mod:`~adalora_pl.baselines.registry`: :data:`ADAPTER_CLASSES`, the one table of every adapter layer by method
  name (what the adapter format stores).

The other ablations need no code of their own: SVD-LoRA is ``method=adalora`` with ``target_r == init_r``
(nothing is masked), AdaLoRA without the regularizer is ``orth_reg_weight=0``, and the importance variants are
``importance="sensitivity"`` / ``"magnitude"``.

The names below are imported lazily, from their submodule on first use (:mod:`adalora_pl._lazy`): the bottleneck
adapters and the budget arithmetic need no Lightning, the pruning baseline's callback does.
"""

from __future__ import annotations

from adalora_pl._lazy import lazy_exports

#: Submodule -> the public names it defines.
_EXPORTS = {
    "adalora_pl.baselines.bottleneck": ("BOTTLENECK_SITES", "BottleneckAdapter", "bottleneck_targets"),
    "adalora_pl.baselines.budget": ("linear_shapes", "match_budget", "params_for_rank"),
    "adalora_pl.baselines.prune_lora": ("DoubletPruner", "PrunableLoRALinear"),
    "adalora_pl.baselines.prune_lora_callback": ("PruneLoRACallback",),
    "adalora_pl.baselines.registry": ("ADAPTER_CLASSES",),
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
