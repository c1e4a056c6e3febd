"""Baselines and ablations that AdaLoRA is compared with (paper §5, Table 1 and the ablations).

- :mod:`~adalora_pl.baselines.bottleneck`: Houlsby / Pfeiffer bottleneck adapters;
- :mod:`~adalora_pl.baselines.prune_lora`: LoRA doublets pruned without recovery, on AdaLoRA's schedule;
- :mod:`~adalora_pl.baselines.budget`: ranks and bottleneck sizes that match a #Params budget.

The other ablations need no code of their own: SVD-LoRA is ``method=adalora`` with ``target_r == init_r``
(nothing is masked), AdaLoRA without the regularizer is ``orth_reg_weight=0``, and the importance variants are
``importance="sensitivity"`` / ``"magnitude"``.

:data:`ADAPTER_CLASSES` is the one table of every adapter layer by method name (what the adapter format
stores), written out here rather than filled by imports.
"""

from __future__ import annotations

from adalora_pl.baselines.bottleneck import BOTTLENECK_SITES, BottleneckAdapter, bottleneck_targets
from adalora_pl.baselines.budget import linear_shapes, match_budget, params_for_rank
from adalora_pl.baselines.prune_lora import DoubletPruner, PrunableLoRALinear, PruneLoRACallback
from adalora_pl.layers import AdapterLayer, LoRALinear, SVDLinear

ADAPTER_CLASSES: dict[str, type[AdapterLayer]] = {
    "adalora": SVDLinear,
    "lora": LoRALinear,
    "prune_lora": PrunableLoRALinear,
    "bottleneck": BottleneckAdapter,
}

__all__ = [
    "ADAPTER_CLASSES",
    "BOTTLENECK_SITES",
    "BottleneckAdapter",
    "DoubletPruner",
    "PrunableLoRALinear",
    "PruneLoRACallback",
    "bottleneck_targets",
    "linear_shapes",
    "match_budget",
    "params_for_rank",
]
