"""Builders shared by tests: tiny transformers from configs, PEFT twins with the same adapter weights."""

from __future__ import annotations

import copy

import torch
from transformers import BertConfig, BertForSequenceClassification

BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def tiny_bert_config(**overrides) -> BertConfig:
    kwargs = dict(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    kwargs.update(overrides)
    return BertConfig(**kwargs)


def tiny_bert_classifier(seed: int = 0, **overrides) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_bert_config(**overrides))
    model.eval()  # dropout off; the parity runs compare deterministic arithmetic
    return model


def random_batches(num: int, batch_size: int = 8, seq_len: int = 12, vocab: int = 100, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num):
        batches.append(
            {
                "input_ids": torch.randint(0, vocab, (batch_size, seq_len), generator=g),
                "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
                "labels": torch.randint(0, 2, (batch_size,), generator=g),
            }
        )
    return batches


def peft_twin(base_model, ours_adapters, *, init_r, target_r, tinit, tfinal, total_step, delta_t,
              lora_alpha=32, orth_reg_weight=0.1, targets=BERT_TARGETS, modules_to_save=("classifier", "pooler")):
    """PEFT's AdaLoRA on a copy of ``base_model`` with A, E, B copied from our adapters."""
    from peft import AdaLoraConfig, get_peft_model

    config = AdaLoraConfig(
        init_r=init_r,
        target_r=target_r,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=delta_t,
        total_step=total_step,
        lora_alpha=lora_alpha,
        lora_dropout=0.0,
        orth_reg_weight=orth_reg_weight,
        target_modules=list(targets),
        modules_to_save=list(modules_to_save),
        # Without a task type PeftModel.forward bypasses AdaLoraModel.forward and never adds the
        # orthogonal regularizer; SEQ_CLS routes through it.
        task_type="SEQ_CLS",
    )
    peft_model = get_peft_model(copy.deepcopy(base_model), config)
    copy_adapters_into_peft(peft_model, ours_adapters)
    return peft_model


def peft_layers(peft_model) -> dict:
    """PEFT's SVDLinear layers keyed by the module path of the wrapped model (ours' naming)."""
    from peft.tuners.adalora import SVDLinear as PeftSVDLinear

    prefix = "base_model.model."
    return {
        name[len(prefix):]: module
        for name, module in peft_model.named_modules()
        if isinstance(module, PeftSVDLinear)
    }


@torch.no_grad()
def copy_adapters_into_peft(peft_model, ours_adapters) -> None:
    layers = peft_layers(peft_model)
    assert sorted(layers) == sorted(ours_adapters), (sorted(layers), sorted(ours_adapters))
    for name, ours in ours_adapters.items():
        theirs = layers[name]
        theirs.lora_A["default"].copy_(ours.lora_A)
        theirs.lora_E["default"].copy_(ours.lora_E)
        theirs.lora_B["default"].copy_(ours.lora_B)


def max_adapter_diff(peft_model, ours_adapters) -> float:
    layers = peft_layers(peft_model)
    diff = 0.0
    for name, ours in ours_adapters.items():
        theirs = layers[name]
        for key in ("lora_A", "lora_E", "lora_B"):
            diff = max(diff, (getattr(ours, key) - getattr(theirs, key)["default"]).abs().max().item())
    return diff


def masks_equal(peft_model, ours_adapters) -> bool:
    layers = peft_layers(peft_model)
    return all(
        torch.equal(ours.lora_E == 0, layers[name].lora_E["default"] == 0) for name, ours in ours_adapters.items()
    )
