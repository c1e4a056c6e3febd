"""``PruneLoRACallback``: the Lightning side of the "prune LoRA" ablation (:mod:`adalora_pl.baselines.prune_lora`)."""

from __future__ import annotations

from adalora_pl.baselines.prune_lora import DoubletPruner, PrunableLoRALinear
from adalora_pl.callback import AdaLoRACallback
from adalora_pl.config import AdaLoRAConfig
from adalora_pl.errors import ConfigError


class PruneLoRACallback(AdaLoRACallback):
    """:class:`~adalora_pl.callback.AdaLoRACallback` for the "prune LoRA" ablation: LoRA doublets pruned
    for good on AdaLoRA's schedule (no orthogonal regularizer: LoRA factors are not singular vectors, so
    ``orth_reg_weight`` defaults to 0 here). Takes the same arguments; ``importance`` must be
    ``"sensitivity_uncertainty"``."""

    adapter_class = PrunableLoRALinear
    allocator_class = DoubletPruner

    def __init__(self, config: AdaLoRAConfig | None = None, **kwargs) -> None:
        if config is None:
            kwargs.setdefault("orth_reg_weight", 0.0)
        super().__init__(config, **kwargs)
        if self.config.importance != "sensitivity_uncertainty":
            raise ConfigError(
                f"PruneLoRACallback scores doublets by sensitivity x uncertainty, got {self.config.importance!r}"
            )
