""":data:`ADAPTER_CLASSES`, the one table of every adapter layer by method name (what the adapter format stores),
written out here rather than filled by imports.

The table needs every adapter class, the pruning baseline's too, whose module also holds its callback (so Lightning
is loaded); it lives in its own module so that ``adalora_pl.baselines``' other names do not pay for that.
"""

from __future__ import annotations

from adalora_pl.baselines.bottleneck import BottleneckAdapter
from adalora_pl.baselines.prune_lora import PrunableLoRALinear
from adalora_pl.layers import AdapterLayer, LoRALinear, SVDLinear

__all__ = ["ADAPTER_CLASSES"]

ADAPTER_CLASSES: dict[str, type[AdapterLayer]] = {
    "adalora": SVDLinear,
    "lora": LoRALinear,
    "prune_lora": PrunableLoRALinear,
    "bottleneck": BottleneckAdapter,
}
