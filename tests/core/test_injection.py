"""Injection: every preset's model equals its base at step 0, the BERT preset, errors that name what exists."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from adalora_pl import LoRALinear, SVDLinear, find_adapters, inject_adapters
from adalora_pl.injection import TARGET_MODULE_PRESETS
from tests.builders import BERT_TARGETS, tiny_bert_classifier


def tiny_models():
    torch.manual_seed(0)
    yield "bert", tiny_bert_classifier(), {"input_ids": torch.randint(0, 100, (2, 7))}
    deberta = DebertaV2ForSequenceClassification(DebertaV2Config(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, relative_attention=True, position_buckets=8, pos_att_type=["p2c", "c2p"],
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
    )).eval()
    yield "deberta-v2", deberta, {"input_ids": torch.randint(0, 100, (2, 7))}
    bart = BartForConditionalGeneration(BartConfig(
        vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )).eval()
    yield "bart", bart, {"input_ids": torch.randint(3, 100, (2, 7)), "decoder_input_ids": torch.randint(3, 100, (2, 5))}
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )).eval()
    yield "llama", llama, {"input_ids": torch.randint(0, 100, (2, 7))}
    gpt2 = GPT2LMHeadModel(GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0,
    )).eval()
    yield "gpt2", gpt2, {"input_ids": torch.randint(0, 100, (2, 7))}


@pytest.mark.parametrize("method", ["adalora", "lora"])
@pytest.mark.parametrize("case", list(tiny_models()), ids=lambda c: c[0])
def test_adapted_model_equals_base_at_step_zero(case, method):
    model_type, base, inputs = case
    adapted = copy.deepcopy(base)
    adapters = inject_adapters(adapted, TARGET_MODULE_PRESETS[model_type], method=method, r=4)
    assert len(adapters) > 0
    with torch.no_grad():
        expected = base(**inputs).logits
        got = adapted(**inputs).logits
    assert torch.equal(expected, got)
    # Base weights frozen, adapters trainable.
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or n.startswith(("classifier", "score", "pooler")) or ".pooler." in n
               or "classification_head" in n or n.startswith("classifier") for n in trainable), trainable
    assert all(f"{name}.lora_A" in trainable for name in adapters)


def test_bert_preset_adapts_six_matrices_per_layer():
    model = tiny_bert_classifier()
    adapters = inject_adapters(model, None, r=2)
    assert len(adapters) == 6 * model.config.num_hidden_layers
    assert "bert.pooler.dense" not in adapters
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "bert.pooler.dense.weight"} <= trainable


def test_unknown_target_lists_linear_layers():
    model = tiny_bert_classifier()
    with pytest.raises(ValueError) as err:
        inject_adapters(model, ["query_proj"], r=2)
    message = str(err.value)
    assert "query_proj" in message and "attention.self.query" in message and "intermediate.dense" in message


def test_target_that_is_not_linear():
    model = tiny_bert_classifier()
    with pytest.raises(ValueError, match=r"'attention\.self'.*BertSelfAttention.*not a linear layer"):
        inject_adapters(model, ["attention.self"], r=2)


def test_no_preset_for_unknown_model_type():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no preset of target modules for model_type None"):
        inject_adapters(model, None)


def test_bad_ranks_and_double_injection():
    with pytest.raises(ValueError, match="rank r must be >= 0, got -1"):
        SVDLinear(nn.Linear(2, 2), r=-1, lora_alpha=1)
    with pytest.raises(ValueError, match="LoRA rank r must be > 0, got 0"):
        LoRALinear(nn.Linear(2, 2), r=0, lora_alpha=1)
    model = tiny_bert_classifier()
    inject_adapters(model, BERT_TARGETS, r=2)
    assert len(find_adapters(model)) == 12
    with pytest.raises(ValueError, match="already has adapters"):
        inject_adapters(model, BERT_TARGETS, r=2)


def test_target_inside_trainable_module_is_refused():
    model = tiny_bert_classifier()
    with pytest.raises(ValueError, match="lies inside trainable module 'bert.pooler'"):
        inject_adapters(model, ["dense"], r=2, trainable_modules=["pooler"])
