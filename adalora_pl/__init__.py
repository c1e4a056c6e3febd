"""adalora-pl: AdaLoRA (Zhang et al., ICLR 2023) for PyTorch Lightning.

The public names below are imported lazily, each from its submodule on first use (:mod:`adalora_pl._lazy`): the
method's core (``layers``, ``allocator``, ``schedule``, ``importance``, ``config``, ``errors``) works without
Lightning, and importing it, or this package, must not load the callback.
"""

from __future__ import annotations

from adalora_pl._lazy import lazy_exports

#: Submodule -> the public names it defines (``from adalora_pl import X`` imports X's submodule then).
_EXPORTS = {
    "adalora_pl.allocator": ("MaskEvent", "RankAllocator"),
    "adalora_pl.callback": ("AdaLoRACallback",),
    "adalora_pl.config": ("AdaLoRAConfig",),
    "adalora_pl.errors": ("ConfigError",),
    "adalora_pl.importance": ("IMPORTANCE_VARIANTS", "mask_threshold", "orthogonal_regularizer", "triplet_scores"),
    "adalora_pl.injection": (
        "DEFAULT_TRAINABLE_MODULES",
        "TARGET_MODULE_PRESETS",
        "adapter_param_groups",
        "count_adapter_parameters",
        "find_adapters",
        "inject_adapters",
        "set_trainable_modules",
    ),
    "adalora_pl.gradient_start": ("base_weight_gradients", "start_from_gradients"),
    "adalora_pl.io": (
        "compact_adapters",
        "export_lora",
        "export_peft",
        "import_peft",
        "load_adapter",
        "merge_adapters",
        "save_adapter",
    ),
    "adalora_pl.io.report": ("rank_table", "read_rank_pattern", "save_budget_curve", "save_rank_heatmap"),
    "adalora_pl.layers": ("LoRALinear", "SVDLinear", "set_kernel"),
    "adalora_pl.schedule": ("BudgetSchedule", "budget_at"),
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
