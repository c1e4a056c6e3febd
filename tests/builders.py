"""Plain builders shared by tests (no fixtures; those live in tests/conftest.py).

Tiny models from configs and the folders they are saved to, tiny tokenizers, PEFT twins with the same adapter
weights, writers of small data files in the official layouts (GLUE TSV, SQuAD JSON, summarization JSONL/CSV), and
the command line run the CLI tests share. Heavy imports (the CLI, PEFT) happen inside the functions that need them.
"""

from __future__ import annotations

import copy
import csv
import json
import pathlib
from pathlib import Path

import pytest
import torch
from transformers import (
    BartConfig,
    BartForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
)

from adalora_pl.injection import inject_adapters

REPO_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------- tiny tokenizers
TINY_WORDS = (
    "the a an is was of and to in it that this he she they we you not no yes good bad movie "
    "film great terrible love hate book read cat dog ran sat on mat what who where when why how "
    "question answer paris france capital city river summary news said year people"
).split()


def make_tiny_tokenizer(directory: Path):
    """A WordPiece BERT tokenizer over a few dozen words, saved to ``directory``."""
    from transformers import BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,?!'\"-")
    vocab = specials + TINY_WORDS + chars + ["##" + c for c in chars]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab))}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    tokenizer.save_pretrained(directory)
    return tokenizer


# ---------------------------------------------------------------------------------------- tiny models
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


# ---------------------------------------------------------------------------------------- adapted models
# Tiny BERT and BART classifiers whose adapters carry random nonzero singular values, a random rank mask and one
# layer pruned to rank 0 (the export round trips of tests/io).


BART_TARGETS = ["q_proj", "k_proj", "v_proj", "self_attn.out_proj", "encoder_attn.out_proj", "fc1", "fc2"]
INIT_R, ALPHA = 4, 16


def tiny_bart_classifier(seed: int = 0) -> BartForSequenceClassification:
    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, classifier_dropout=0.0, num_labels=2,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
    )
    return BartForSequenceClassification(config).eval()


ARCHS = {
    "bert": (tiny_bert_classifier, BERT_TARGETS, ["classifier", "pooler"]),
    "bart": (tiny_bart_classifier, BART_TARGETS, ["classification_head"]),
}


def assert_same_optimizer_state(trainer_a, trainer_b) -> None:
    """The first optimizers of two trainers hold bitwise the same per-parameter state (Adam's moments, step)."""
    moments_a = trainer_a.optimizers[0].state_dict()["state"]
    moments_b = trainer_b.optimizers[0].state_dict()["state"]
    assert moments_a.keys() == moments_b.keys()
    for index, state in moments_a.items():
        for name, value in state.items():
            assert torch.equal(value, moments_b[index][name]), (index, name)


def make_batch(seed: int = 7, batch_size: int = 4, seq_len: int = 10, labels: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (batch_size, seq_len), generator=g)
    ids[:, -1] = 2  # BART classifies at the (single) eos token; BERT does not mind
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if labels:
        batch["labels"] = torch.randint(0, 2, (batch_size,), generator=g)
    return batch


@torch.no_grad()
def logits(model, batch=None) -> torch.Tensor:
    model.eval()
    return model(**(batch or make_batch())).logits


def float32_adapters(adapters) -> None:
    """Float32 adapter tensors on a half-precision base, as PEFT's ``autocast_adapter_dtype=True`` leaves them
    (a no-op where the adapters were created in float32 already)."""
    for adapter in adapters.values():
        for name in ("lora_A", "lora_E", "lora_B"):
            old = getattr(adapter, name)
            if old.dtype != torch.float32:
                setattr(adapter, name, torch.nn.Parameter(old.detach().float(), requires_grad=old.requires_grad))
        adapter.ranknum = adapter.ranknum.float()


def trained_like(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """(fresh base, adapted model) with random E, random masks (E zero where pruned), the first layer
    pruned to rank 0, the second fully kept, and perturbed head weights. The base model is in ``dtype``,
    the adapters in float32."""
    build, targets, heads = ARCHS[arch]
    base = build(seed).to(dtype)
    model = copy.deepcopy(base)
    adapters = inject_adapters(model, targets, r=INIT_R, lora_alpha=ALPHA, trainable_modules=heads)
    float32_adapters(adapters)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for i, adapter in enumerate(adapters.values()):
            adapter.lora_E.copy_(torch.randn(adapter.lora_E.shape, generator=g))
            mask = torch.rand(INIT_R, generator=g) > 0.4
            mask[0] = i % 3 != 2  # make sure some layers lose a leading triplet too
            if i == 0:
                mask[:] = False
            elif i == 1:
                mask[:] = True
            adapter.rank_mask.copy_(mask)
            adapter.lora_E.masked_fill_(~mask.view(-1, 1), 0.0)
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_" not in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.eval()
    assert not torch.allclose(logits(model), logits(base), atol=1e-3), "adapters should change the outputs"
    return base, model, targets, heads


class TouchOnUnpickle:
    """Unpickling this creates ``marker``: proof that a loader unpickled the file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


# ---------------------------------------------------------------------------------------- saved backbones
def save_tiny_backbone(folder: Path, **config) -> str:
    """A tiny BERT sequence classifier with the tiny tokenizer, saved to ``folder``."""
    tokenizer = make_tiny_tokenizer(folder)
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_bert_config(vocab_size=len(tokenizer), **config)).save_pretrained(folder)
    return str(folder)


def save_tiny_qa_backbone(folder: Path) -> str:
    """A tiny BERT span model (extractive QA) with the tiny tokenizer, saved to ``folder``."""
    from transformers import BertForQuestionAnswering

    tokenizer = make_tiny_tokenizer(folder)
    torch.manual_seed(0)
    BertForQuestionAnswering(tiny_bert_config(vocab_size=len(tokenizer))).save_pretrained(folder)
    return str(folder)


def save_tiny_bart(folder: Path) -> str:
    """A one-layer BART saved with a WordPiece tokenizer: [CLS] starts and [SEP] ends every sequence."""
    from transformers import BartForConditionalGeneration

    tokenizer = make_tiny_tokenizer(folder)
    config = BartConfig(
        vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id, forced_eos_token_id=tokenizer.sep_token_id,
        decoder_start_token_id=tokenizer.sep_token_id,  # BART starts decoding from its end token
    )
    torch.manual_seed(0)
    BartForConditionalGeneration(config).save_pretrained(folder)
    return str(folder)


def save_tiny_causal_lm(folder: Path, family: str = "llama", seed: int = 0, tie_word_embeddings: bool = False) -> str:
    """A two-block decoder LM of ``family`` (llama, mistral, qwen2, gemma, gemma2, phi3) with the tiny WordPiece
    tokenizer (its [SEP] ends responses), saved to ``folder``."""
    import transformers as hf

    tokenizer = make_tiny_tokenizer(folder)
    configs = {"llama": hf.LlamaConfig, "mistral": hf.MistralConfig, "qwen2": hf.Qwen2Config,
               "gemma": hf.GemmaConfig, "gemma2": hf.Gemma2Config, "phi3": hf.Phi3Config}
    extra = {"head_dim": 8} if family.startswith("gemma") else {}
    config = configs[family](
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
        tie_word_embeddings=tie_word_embeddings, **extra,
    )
    torch.manual_seed(seed)
    hf.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return str(folder)


# ---------------------------------------------------------------------------------------- quantized bases
# Tiny Llamas loaded through transformers' quantization configs, as a user loads a QLoRA base (tests/quant).

#: The llama preset's targets (every linear of a block).
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

#: Test id -> (kind, double_quant) of every quantized base the tests cover; kinds as ``--model.quantization``.
QUANTIZED_BASES = {
    "nf4": ("nf4", False),
    "fp4": ("fp4", False),
    "nf4-dq": ("nf4", True),
    "int8": ("int8", False),
    "torchao_int8": ("torchao_int8", False),
}


def tiny_llama_config(**overrides):
    """A two-block Llama whose every linear has in/out features that are multiples of 64.

    Why 64: bitsandbytes' 4-bit block size is 64, and on CPUs with AVX512-BF16 its eval-mode kernel repacks a
    4-bit weight in blocks of 32 output rows and fails on a layer with fewer (``save_tiny_causal_lm``'s k/v
    projections have 16).
    """
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=64, tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def save_tiny_llama(folder: Path, seed: int = 0, tokenizer: bool = False, **overrides) -> str:
    """The unquantized tiny Llama of :func:`tiny_llama_config` saved to ``folder`` (float32 weights), with the tiny
    WordPiece tokenizer when ``tokenizer`` (then the vocabulary is the tokenizer's). Returns the folder."""
    from transformers import AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer:
        tok = make_tiny_tokenizer(folder)
        overrides = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "bos_token_id": tok.cls_token_id,
                     "eos_token_id": tok.sep_token_id, **overrides}
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(tiny_llama_config(**overrides)).save_pretrained(folder)
    return str(folder)


def quantization_config(kind: str, *, double_quant: bool = False, compute_dtype: torch.dtype = torch.float32):
    """transformers' quantization config for ``kind`` (``nf4``, ``fp4``, ``int8``, ``torchao_int8``)."""
    from transformers import BitsAndBytesConfig

    if kind in ("nf4", "fp4"):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=double_quant,
                                  bnb_4bit_compute_dtype=compute_dtype)
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if kind == "torchao_int8":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    raise ValueError(f"unknown quantization kind {kind!r}")


def load_quantized(folder: str | Path, kind: str, *, double_quant: bool = False,
                   compute_dtype: torch.dtype = torch.float32, dtype: torch.dtype = torch.float32,
                   cpu_repack: bool = False):
    """The causal LM saved in ``folder`` loaded on CPU with ``kind``'s quantization, in eval mode.

    ``cpu_repack=False`` turns off bitsandbytes' eval-mode repacking of 4-bit weights on CPUs with AVX512-BF16
    (``Linear4bit.support_avx512bf16_for_cpu``): that path rounds the block scales to bfloat16 in place, for good,
    and computes in bfloat16, so a model that was evaluated once is no longer the one it dequantizes to. With it
    off, every 4-bit forward is bitsandbytes' dequantize-then-matmul, on CPU as on GPU.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quantization_config(kind, double_quant=double_quant, compute_dtype=compute_dtype),
        device_map="cpu", dtype=dtype,
    )
    if not cpu_repack:
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return model.eval()


def tiny_quantized_llama(kind: str, *, double_quant: bool = False, compute_dtype: torch.dtype = torch.float32,
                         dtype: torch.dtype = torch.float32, seed: int = 0, folder: Path | None = None,
                         cpu_repack: bool = False):
    """A tiny Llama (:func:`tiny_llama_config`) quantized as ``kind`` (``nf4``, ``fp4``, ``int8``,
    ``torchao_int8``; ``double_quant`` for 4-bit) through transformers, in eval mode.

    ``folder``: where the unquantized model is saved (and kept, e.g. to load it again unquantized or into PEFT);
    a temporary folder otherwise. ``dtype`` is the model's dtype (``from_pretrained(dtype=...)``), ``compute_dtype``
    the 4-bit matmul dtype. See :func:`load_quantized` for ``cpu_repack``.
    """
    import tempfile

    if folder is not None:
        return load_quantized(save_tiny_llama(folder, seed), kind, double_quant=double_quant,
                              compute_dtype=compute_dtype, dtype=dtype, cpu_repack=cpu_repack)
    with tempfile.TemporaryDirectory() as tmp:
        return load_quantized(save_tiny_llama(Path(tmp), seed), kind, double_quant=double_quant,
                              compute_dtype=compute_dtype, dtype=dtype, cpu_repack=cpu_repack)


def llama_batch(seed: int = 7, batch_size: int = 2, seq_len: int = 12, vocab: int = 128) -> dict:
    """Token ids (and the same ids as labels) for the tiny Llama."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def train_adalora_steps(model, adapters, batch: dict, *, steps: int = 4, target_r: int = 2, lr: float = 1e-2,
                        orth_reg_weight: float = 0.1) -> tuple:
    """``steps`` AdamW steps of ``model`` on ``batch`` with the rank allocator after each (a plain loop: warm-up of one
    step, then masking down to ``target_r`` per layer, the pattern fixed for the last step). Returns
    ``(allocator, losses, grad_names)``: the allocator, the loss of every step and the names of the parameters that
    had a gradient at the first step."""
    from adalora_pl.allocator import RankAllocator
    from adalora_pl.importance import add_orthogonal_regularizer_grad_

    allocator = RankAllocator(adapters, target_r=target_r, tinit=1, tfinal=1, total_step=steps, delta_t=1)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses, grad_names = [], None
    for step in range(steps):
        loss = model(**batch).loss
        loss.backward()
        add_orthogonal_regularizer_grad_([(a.lora_A, a.lora_B) for a in adapters.values()], orth_reg_weight)
        if grad_names is None:
            grad_names = [n for n, p in model.named_parameters() if p.grad is not None]
        optimizer.step()
        allocator.update_and_allocate(step)
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return allocator, losses, grad_names


# ---------------------------------------------------------------------------------------- data files
#: Five Alpaca records over the tiny tokenizer's words (instruction-tuning tests).
INSTRUCTION_ROWS = [
    {"instruction": "what is the capital of france", "input": "", "output": "paris is the capital"},
    {"instruction": "who ran", "input": "the dog ran in the city", "output": "the dog"},
    {"instruction": "read the book", "input": "", "output": "good book"},
    {"instruction": "the cat sat on the mat", "input": "where", "output": "on the mat"},
    {"instruction": "what was the film", "input": "people said it was great", "output": "a great film"},
]


def write_cola(folder: Path, rows: int = 48) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    sentences = ["the cat sat on the mat", "cat the on sat mat the", "a dog ran", "ran dog a the"]
    for split in ("train", "dev"):
        lines = [f"src\t{(i + 1) % 2}\t\t{sentences[i % 4]}" for i in range(rows)]
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return folder


STSB_PAIRS = [
    ("the cat sat", "a dog ran on the mat"), ("the cat sat on the mat", "the cat sat"),
    ("a good movie", "a great film"), ("paris is the capital", "paris is a city in france"),
    ("she read the book", "he ran"), ("we love the film", "they hate the movie"),
]


def write_stsb(folder: Path, rows: int = 48) -> Path:
    """STS-B files whose pairs differ, so that even an untrained model's scores vary (a finite Pearson)."""
    folder.mkdir(parents=True, exist_ok=True)
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    for split in ("train", "dev"):
        lines = [header] + [
            f"{i}\tg\tf\t2012\t{i}\ts\ts\t{STSB_PAIRS[i % 6][0]}\t{STSB_PAIRS[i % 6][1]}\t{(i % 6) * 0.9:.1f}"
            for i in range(rows)
        ]
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return folder


def vocab_words(tokenizer) -> list[str]:
    """Whole words of the tiny tokenizer's vocabulary (one token each), in vocabulary order."""
    vocab = tokenizer.get_vocab()
    return [w for w in sorted(vocab, key=vocab.get) if w.isalpha() and len(w) > 1]


def write_squad(path: Path, articles: list[dict], version: str = "1.1") -> Path:
    path.write_text(json.dumps({"version": version, "data": articles}), encoding="utf-8")
    return path


def qa(qid: str, question: str, context: str, answer: str | None, occurrence: int = 0) -> dict:
    """One question; the answer is the ``occurrence``-th appearance of ``answer`` in ``context``."""
    if answer is None:
        return {"id": qid, "question": question, "answers": [], "is_impossible": True}
    start = -1
    for _ in range(occurrence + 1):
        start = context.index(answer, start + 1)
    return {"id": qid, "question": question, "answers": [{"text": answer, "answer_start": start}]}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# ---------------------------------------------------------------------------------------- the command line
def fit_tiny(tmp_path, config: str, backbone: str, data_dir: Path, *extra: str):
    """``cli.py fit`` of a GLUE config on a tiny backbone: 2 epochs, batches of 8, a schedule in fractions."""
    from adalora_pl.cli import main

    cli = main([
        "fit", "--config", str(REPO_ROOT / "configs" / config),
        "--model.backbone", backbone, "--data.data_dir", str(data_dir),
        "--model.tinit", "0.2", "--model.tfinal", "0.3", "--model.delta_t", "1", "--model.warmup_steps", "2",
        "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.enable_progress_bar", "false", "--data.batch_size", "8",
        *extra,
    ])
    return cli


def print_config(capsys, config: Path) -> str:
    """What ``fit --config CONFIG --print_config`` prints, checking that it exits with 0 (not a parse error's 2)."""
    from adalora_pl.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 0, captured.err
    return captured.out
