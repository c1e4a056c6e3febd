"""Bottleneck adapters (Houlsby et al. 2019: after attention and FFN; Pfeiffer et al. 2021: after FFN only),
the baseline of the paper's Table 1 next to LoRA."""

from __future__ import annotations

import torch
from torch import nn

from adalora_pl.injection import is_linear, name_matches
from adalora_pl.layers import AdapterLayer


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
    # BART: the self-attention output of every layer and the decoder's cross-attention output. A bare "out_proj"
    # would also match BartForSequenceClassification's classification_head.out_proj (the task head).
    "bart": {"attention": ["self_attn.out_proj", "encoder_attn.out_proj"], "ffn": ["fc2"]},
    # Decoder LLMs: the attention output and the MLP's down projection of every block.
    **{family: {"attention": ["o_proj"], "ffn": ["down_proj"]}
       for family in ("llama", "mistral", "qwen2", "gemma", "gemma2", "phi3")},
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
