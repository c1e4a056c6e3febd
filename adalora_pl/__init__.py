"""adalora-pl: AdaLoRA (Zhang et al., ICLR 2023) for PyTorch Lightning."""

from adalora_pl.allocator import MaskEvent, RankAllocator
from adalora_pl.callback import AdaLoRACallback
from adalora_pl.importance import IMPORTANCE_VARIANTS, mask_threshold, orthogonal_regularizer, triplet_scores
from adalora_pl.injection import (
    DEFAULT_TRAINABLE_MODULES,
    TARGET_MODULE_PRESETS,
    count_adapter_parameters,
    find_adapters,
    inject_adapters,
    set_trainable_modules,
)
from adalora_pl.io import (
    compact_adapters,
    export_lora,
    export_peft,
    import_peft,
    load_adapter,
    merge_adapters,
    save_adapter,
)
from adalora_pl.io.report import rank_table, save_budget_curve, save_rank_heatmap
from adalora_pl.layers import LoRALinear, SVDLinear
from adalora_pl.schedule import BudgetSchedule, budget_at

__all__ = [
    "AdaLoRACallback",
    "DEFAULT_TRAINABLE_MODULES",
    "IMPORTANCE_VARIANTS",
    "TARGET_MODULE_PRESETS",
    "BudgetSchedule",
    "LoRALinear",
    "MaskEvent",
    "RankAllocator",
    "SVDLinear",
    "budget_at",
    "compact_adapters",
    "count_adapter_parameters",
    "export_lora",
    "export_peft",
    "import_peft",
    "load_adapter",
    "merge_adapters",
    "rank_table",
    "save_adapter",
    "save_budget_curve",
    "save_rank_heatmap",
    "find_adapters",
    "inject_adapters",
    "mask_threshold",
    "orthogonal_regularizer",
    "set_trainable_modules",
    "triplet_scores",
]
