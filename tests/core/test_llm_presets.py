"""The decoder LLM presets (Llama, Mistral, Qwen2, Gemma, Gemma 2, Phi-3) on tiny causal language models.

The adapted layers per block are written out here, independently of ``TARGET_MODULE_PRESETS``: every block's
attention and MLP linears get an SVDLinear, ``lm_head`` and the embeddings (tied in Gemma) stay frozen, the model
starts bitwise equal to itself without adapters, and a bfloat16 model gets float32 adapters.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import transformers as hf
from torch import nn

from adalora_pl import TARGET_MODULE_PRESETS, SVDLinear, inject_adapters
from adalora_pl.injection import preset_targets

VOCAB = 64
LAYERS = 2
PAD, EOS, BOS, FIRST_WORD = 0, 1, 2, 4

# tie_word_embeddings is left to each family's default: untied for Llama, Mistral, Qwen2, Phi-3; tied for Gemma.
DECODER = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
)
LLAMA_BLOCK = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj"}
PHI3_BLOCK = {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"}

FAMILIES: dict[str, tuple[Callable[[], hf.PretrainedConfig], set[str], bool]] = {
    # name: (config, block-relative paths adapted in every block, whether lm_head is tied to the embeddings)
    "llama": (lambda: hf.LlamaConfig(**DECODER), LLAMA_BLOCK, False),
    "mistral": (lambda: hf.MistralConfig(**DECODER), LLAMA_BLOCK, False),
    "qwen2": (lambda: hf.Qwen2Config(**DECODER), LLAMA_BLOCK, False),
    "gemma": (lambda: hf.GemmaConfig(**DECODER, head_dim=8), LLAMA_BLOCK, True),
    "gemma2": (lambda: hf.Gemma2Config(**DECODER, head_dim=8, sliding_window=4), LLAMA_BLOCK, True),
    "phi3": (lambda: hf.Phi3Config(**DECODER), PHI3_BLOCK, False),
}


def build(family: str) -> nn.Module:
    torch.manual_seed(0)
    config = FAMILIES[family][0]()
    config._attn_implementation = "eager"
    return hf.AutoModelForCausalLM.from_config(config).train()


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(FIRST_WORD, VOCAB, (2, 6), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def block_path(name: str) -> tuple[int, str]:
    """``model.layers.1.self_attn.q_proj`` -> ``(1, "self_attn.q_proj")``."""
    prefix = "model.layers."
    assert name.startswith(prefix), name
    index, _, rest = name.removeprefix(prefix).partition(".")
    return int(index), rest


def test_every_llm_family_has_its_preset():
    for family, (make_config, _, _) in FAMILIES.items():
        assert make_config().model_type == family
        assert family in TARGET_MODULE_PRESETS


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_llm_preset_adapts_every_block_and_freezes_head_and_embeddings(family, one_torch_thread):
    _, block, tied = FAMILIES[family]
    model = build(family)
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    twin = copy.deepcopy(model).eval()

    adapters = inject_adapters(model, r=2)  # the default targets: the preset
    found: dict[int, set[str]] = {i: set() for i in range(LAYERS)}
    for name in adapters:
        index, kind = block_path(name)
        found[index].add(kind)
    assert found == {i: block for i in range(LAYERS)}
    assert len(adapters) == LAYERS * len(TARGET_MODULE_PRESETS[family]) == LAYERS * len(block)
    assert all(isinstance(a, SVDLinear) and a.lora_E.shape == (2, 1) for a in adapters.values())
    assert sorted(inject_adapters(copy.deepcopy(twin), preset_targets(twin), r=2)) == sorted(adapters)

    # Only the adapters train: base weights, lm_head and embeddings are frozen.
    for name, param in model.named_parameters():
        assert param.requires_grad == (".lora_" in name), name
    assert not any(p.requires_grad for p in model.get_output_embeddings().parameters())
    assert not any(p.requires_grad for p in model.get_input_embeddings().parameters())

    # E = 0 at init: the adapted model's logits are bitwise those of the model without adapters.
    model.eval()
    inputs = batch()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, twin(**inputs).logits)
    model.train()

    # At step 0 only lora_E gets a gradient (A and B are multiplied by E = 0).
    model(**inputs).loss.backward()
    for name, adapter in adapters.items():
        assert adapter.lora_E.grad is not None and adapter.lora_E.grad.abs().sum() > 0, name
        assert not adapter.lora_A.grad.any() and not adapter.lora_B.grad.any(), name
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)

    # With E nonzero every adapter's A, B and E get a gradient.
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for adapter in adapters.values():
            adapter.lora_E.fill_(0.1)
    model(**inputs).loss.backward()
    for name, adapter in adapters.items():
        for part in ("lora_A", "lora_B", "lora_E"):
            grad = getattr(adapter, part).grad
            assert grad is not None and grad.abs().sum() > 0, f"{name}.{part}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_llm_preset_on_bfloat16_model_gets_float32_adapters(family, one_torch_thread):
    model = build(family).to(torch.bfloat16)
    adapters = inject_adapters(model, r=2)
    assert len(adapters) == LAYERS * len(FAMILIES[family][1])
    for name, adapter in adapters.items():
        assert adapter.base_layer.weight.dtype == torch.bfloat16, name
        for part in ("lora_A", "lora_B", "lora_E"):
            assert getattr(adapter, part).dtype == torch.float32, f"{name}.{part}"
    out = model(**batch())
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    out.loss.backward()
    for name, adapter in adapters.items():
        assert adapter.lora_E.grad is not None and adapter.lora_E.grad.dtype == torch.float32, name
