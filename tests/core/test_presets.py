"""Every preset on every auto class of its family: all blocks adapted, the task head trained in full.

The expected adapted layers and heads are written out here per family, independently of the presets in
``adalora_pl.injection``, so that a preset that misses a layer, reaches into a head or names a layer a
family member lacks (T5 v1.0 ``wi`` against v1.1 ``wi_0``/``wi_1``) fails here.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import transformers as hf
from torch import nn

from adalora_pl import TARGET_MODULE_PRESETS, SVDLinear, find_adapters, inject_adapters
from adalora_pl.injection import preset_targets

VOCAB = 64
LAYERS = 2
# Input ids avoid the special tokens 0..3; the classification heads of BART and T5 pool at the eos token,
# the decoder-only ones at the last non-pad token, so every sequence ends in eos and nothing is padding.
PAD, BOS, EOS, FIRST_WORD = 0, 2, 1, 4

SEQ = hf.AutoModelForSequenceClassification
QA = hf.AutoModelForQuestionAnswering
TOKEN = hf.AutoModelForTokenClassification
SEQ2SEQ = hf.AutoModelForSeq2SeqLM
CAUSAL = hf.AutoModelForCausalLM

SPECIAL_TOKENS = dict(pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
ENCODER = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64,
    max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **SPECIAL_TOKENS,
)
DECODER = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, **SPECIAL_TOKENS,
)
T5 = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=LAYERS, num_heads=4, dropout_rate=0.0,
          pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD)

BERT_BLOCK = {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
              "intermediate.dense", "output.dense"}
DEBERTA_BLOCK = {"attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj",
                 "attention.output.dense", "intermediate.dense", "output.dense"}
MPNET_BLOCK = {"attention.attn.q", "attention.attn.k", "attention.attn.v", "attention.attn.o", "intermediate.dense",
               "output.dense"}
BART_SELF = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"}
BART_CROSS = {"encoder_attn.q_proj", "encoder_attn.k_proj", "encoder_attn.v_proj", "encoder_attn.out_proj"}
T5_SELF = {"SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o"}
T5_CROSS = {"EncDecAttention.q", "EncDecAttention.k", "EncDecAttention.v", "EncDecAttention.o"}
LLAMA_BLOCK = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj"}


def t5_blocks(ffn: set[str]) -> dict[str, set[str]]:
    return {"encoder.block": T5_SELF | ffn | {"DenseReluDense.wo"},
            "decoder.block": T5_SELF | T5_CROSS | ffn | {"DenseReluDense.wo"}}


@dataclass(frozen=True)
class Family:
    """A model family: its config, the adapted layers per block stack, the head trained per auto class."""

    make_config: Callable[[], hf.PretrainedConfig]
    # Stack path suffix (``encoder.layer``) -> the block-relative paths of the layers adapted in every block.
    blocks: dict[str, set[str]]
    # Auto class -> module paths trained in full (empty for language models: lm_head stays frozen).
    heads: dict[type, list[str]] = field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    "bert": Family(lambda: hf.BertConfig(**ENCODER), {"encoder.layer": BERT_BLOCK},
                   {SEQ: ["bert.pooler", "classifier"], QA: ["qa_outputs"], TOKEN: ["classifier"]}),
    "roberta": Family(lambda: hf.RobertaConfig(**ENCODER), {"encoder.layer": BERT_BLOCK},
                      {SEQ: ["classifier"], QA: ["qa_outputs"], TOKEN: ["classifier"]}),
    "deberta-v2": Family(
        lambda: hf.DebertaV2Config(**ENCODER, relative_attention=True, position_buckets=8,
                                   pos_att_type=["p2c", "c2p"]),
        {"encoder.layer": DEBERTA_BLOCK},
        {SEQ: ["pooler", "classifier"], QA: ["qa_outputs"], TOKEN: ["classifier"]},
    ),
    "mpnet": Family(lambda: hf.MPNetConfig(**ENCODER), {"encoder.layer": MPNET_BLOCK},
                    {SEQ: ["classifier"], QA: ["qa_outputs"], TOKEN: ["classifier"]}),
    "bart": Family(
        lambda: hf.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=LAYERS, decoder_layers=LAYERS,
                              encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                              decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
                              activation_dropout=0.0, decoder_start_token_id=EOS, forced_eos_token_id=None,
                              **SPECIAL_TOKENS),
        {"encoder.layers": BART_SELF | {"fc1", "fc2"}, "decoder.layers": BART_SELF | BART_CROSS | {"fc1", "fc2"}},
        {SEQ: ["classification_head"], QA: ["qa_outputs"], SEQ2SEQ: []},
    ),
    "t5": Family(lambda: hf.T5Config(**T5), t5_blocks({"DenseReluDense.wi"}),
                 {SEQ: ["classification_head"], QA: ["qa_outputs"], TOKEN: ["classifier"], SEQ2SEQ: []}),
    "t5-gated": Family(lambda: hf.T5Config(**T5, feed_forward_proj="gated-gelu"),
                       t5_blocks({"DenseReluDense.wi_0", "DenseReluDense.wi_1"}),
                       {SEQ: ["classification_head"], QA: ["qa_outputs"], TOKEN: ["classifier"], SEQ2SEQ: []}),
    "llama": Family(lambda: hf.LlamaConfig(**DECODER), {"layers": LLAMA_BLOCK},
                    {SEQ: ["score"], QA: ["qa_outputs"], TOKEN: ["score"], CAUSAL: []}),
    "mistral": Family(lambda: hf.MistralConfig(**DECODER), {"layers": LLAMA_BLOCK},
                      {SEQ: ["score"], QA: ["qa_outputs"], TOKEN: ["score"], CAUSAL: []}),
    "qwen2": Family(lambda: hf.Qwen2Config(**DECODER), {"layers": LLAMA_BLOCK},
                    {SEQ: ["score"], QA: ["qa_outputs"], TOKEN: ["score"], CAUSAL: []}),
    "gemma": Family(lambda: hf.GemmaConfig(**DECODER, head_dim=8), {"layers": LLAMA_BLOCK},
                    {SEQ: ["score"], TOKEN: ["score"], CAUSAL: []}),
    "gemma2": Family(lambda: hf.Gemma2Config(**DECODER, head_dim=8), {"layers": LLAMA_BLOCK},
                     {SEQ: ["score"], TOKEN: ["score"], CAUSAL: []}),
    "phi3": Family(lambda: hf.Phi3Config(**DECODER),
                   {"layers": {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"}},
                   {SEQ: ["score"], TOKEN: ["score"], CAUSAL: []}),
    "gpt2": Family(
        lambda: hf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64, resid_pdrop=0.0,
                              embd_pdrop=0.0, attn_pdrop=0.0, **SPECIAL_TOKENS),
        {"h": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}},
        {SEQ: ["score"], QA: ["qa_outputs"], TOKEN: ["classifier"], CAUSAL: []},
    ),
}

CASES = [(family, auto) for family, spec in FAMILIES.items() for auto in spec.heads]


def case_id(case: tuple[str, type]) -> str:
    return f"{case[0]}-{case[1].__name__.removeprefix('AutoModelFor')}"


def build(family: str, auto: type) -> nn.Module:
    torch.manual_seed(0)
    return auto.from_config(FAMILIES[family].make_config()).train()


def inputs_for(model: nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(FIRST_WORD, VOCAB, (2, 6), generator=g)
    ids[:, -1] = EOS
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model.config.is_encoder_decoder and type(model).__name__.endswith("ForConditionalGeneration"):
        inputs["labels"] = torch.randint(FIRST_WORD, VOCAB, (2, 4), generator=g)
    return inputs


def split_block_path(name: str) -> tuple[str, str, str] | None:
    """``bert.encoder.layer.1.attention.self.query`` -> (``bert.encoder.layer``, ``1``, ``attention.self.query``);
    ``None`` outside the numbered blocks. Nested indices (T5's ``block.0.layer.1``) stay in the relative path,
    which then drops them: T5's sub-layer index says nothing the sub-layer's name does not."""
    parts = name.split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    if not digits:
        return None
    first, last = digits[0], digits[-1]
    return ".".join(parts[:first]), parts[first], ".".join(parts[last + 1:])


def expected_kinds(spec: Family, stack: str) -> set[str]:
    keys = [k for k in spec.blocks if stack == k or stack.endswith("." + k)]
    assert len(keys) == 1, f"block stack {stack!r} is not one of {sorted(spec.blocks)}"
    return spec.blocks[keys[0]]


def inside(name: str, heads: list[str]) -> bool:
    return any(name == h or name.startswith(h + ".") for h in heads)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_default_injection_adapts_every_block_and_trains_the_head(case, one_torch_thread):
    family, auto = case
    spec = FAMILIES[family]
    model = build(family, auto)
    blocks = {split_block_path(n)[:2] for n, m in model.named_modules()
              if isinstance(m, (nn.Linear, hf.pytorch_utils.Conv1D)) and split_block_path(n)}
    heads = spec.heads[auto]
    for head in heads:
        model.get_submodule(head)  # the head exists under that name
    twin = copy.deepcopy(model)

    adapters = inject_adapters(model, r=2)

    # Every block of every stack has exactly its family's adapted layers, and nothing outside the blocks has one.
    assert all(split_block_path(n) for n in adapters), sorted(adapters)
    found: dict[tuple[str, str], set[str]] = {block: set() for block in blocks}
    for name in adapters:
        stack, index, kind = split_block_path(name)
        found[(stack, index)].add(kind)
    for (stack, index), kinds in found.items():
        assert kinds == expected_kinds(spec, stack), (stack, index)
    stacks = {stack for stack, _ in blocks}
    assert len(adapters) == sum(len(expected_kinds(spec, s)) for s in stacks) * LAYERS
    assert not [n for n in adapters if inside(n, heads)]

    # Heads trained in full, adapters trainable, everything else (the base weights, lm_head) frozen.
    for name, param in model.named_parameters():
        is_adapter = ".lora_" in name
        assert param.requires_grad == (is_adapter or inside(name, heads)), name
    if auto in (SEQ2SEQ, CAUSAL):
        assert not any(p.requires_grad for p in model.get_output_embeddings().parameters())

    # The preset as returned by preset_targets, passed on explicitly (AdapterModule and the callback do
    # so), adapts the same layers.
    assert sorted(inject_adapters(twin, preset_targets(twin), r=2)) == sorted(adapters)

    out = model(**inputs_for(model))
    loss = sum(v.square().mean() for k, v in out.items() if k.endswith("logits"))
    loss.backward()
    for head in heads:
        for name, param in model.get_submodule(head).named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, f"{head}.{name}"
    for name, adapter in adapters.items():
        assert isinstance(adapter, SVDLinear)
        # lora_E starts at zero, so only it gets a gradient at step 0 (A's and B's are multiplied by E).
        assert adapter.lora_E.grad is not None and adapter.lora_E.grad.abs().sum() > 0, name


def test_every_preset_is_covered():
    """A preset added without a family here would go untested."""
    covered = {FAMILIES[f].make_config().model_type for f in FAMILIES}
    assert covered == set(TARGET_MODULE_PRESETS)


def test_t5_preset_takes_the_ffn_inputs_each_version_has():
    assert preset_targets(build("t5", SEQ2SEQ)) == ["q", "k", "v", "o", "wi", "wo"]
    assert preset_targets(build("t5-gated", SEQ2SEQ)) == ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]


def test_explicit_target_that_matches_nothing_still_raises():
    model = build("t5-gated", SEQ2SEQ)
    with pytest.raises(ValueError, match=r"target_modules \['wi'\] match no module of T5ForConditionalGeneration"):
        inject_adapters(model, ["q", "wi"], r=2)


def test_explicit_target_inside_a_head_still_raises():
    model = build("bart", SEQ)
    with pytest.raises(ValueError, match="lies inside trainable module 'classification_head'"):
        inject_adapters(model, ["out_proj"], r=2)


def test_preset_name_that_also_matches_inside_a_head_leaves_the_head_alone(monkeypatch):
    # The old BART preset: a bare out_proj matches the attention outputs and classification_head.out_proj.
    monkeypatch.setitem(TARGET_MODULE_PRESETS, "bart", ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    model = build("bart", SEQ)
    adapters = inject_adapters(model, r=2)
    assert "classification_head.out_proj" not in adapters
    assert sum(n.endswith(".out_proj") for n in adapters) == 3 * LAYERS  # encoder self, decoder self and cross
    assert all(p.requires_grad for p in model.classification_head.parameters())


@pytest.mark.parametrize(
    ("preset", "missing"),
    [(["query", "gate_proj"], "['gate_proj']"), (["query", ("wi", "wi_0")], "[('wi', 'wi_0')]")],
)
def test_preset_missing_a_required_entry_raises(monkeypatch, preset, missing):
    monkeypatch.setitem(TARGET_MODULE_PRESETS, "bert", preset)
    model = build("bert", SEQ)
    with pytest.raises(ValueError, match=re.escape(f"preset entries {missing} match no module")):
        inject_adapters(model, r=2)
    assert not find_adapters(model)


def test_preset_entry_found_only_inside_a_head_counts_as_missing(monkeypatch):
    # RoBERTa's classifier has dense and out_proj; out_proj exists nowhere else.
    monkeypatch.setitem(TARGET_MODULE_PRESETS, "roberta", ["query", "out_proj"])
    with pytest.raises(ValueError, match=r"preset entries \['out_proj'\]"):
        preset_targets(build("roberta", SEQ))
    assert preset_targets(build("roberta", SEQ), trainable_modules=()) == ["query", "out_proj"]
