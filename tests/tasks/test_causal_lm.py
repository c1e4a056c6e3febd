"""Instruction tuning of decoder LMs (tiny models of each family from configs, random weights): the loss on
response tokens only, token-weighted evaluation, left-padded generation, the schedule reaching its budget,
gradient checkpointing, bfloat16 bases with float32 adapters."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from transformers import BertTokenizerFast

from adalora_pl import SVDLinear
from adalora_pl.injection import find_adapters
from adalora_pl.tasks.causal_lm_module import CausalLMModule
from adalora_pl.tasks.rouge import rouge_scores
from datamodules.instruction import InstructionDataModule
from tests.builders import save_tiny_causal_lm, write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROWS = [
    {"instruction": "what is the capital of france", "input": "", "output": "paris is the capital"},
    {"instruction": "who ran", "input": "the dog ran in the city", "output": "the dog"},
    {"instruction": "read the book", "input": "", "output": "good book"},
    {"instruction": "the cat sat on the mat", "input": "where", "output": "on the mat"},
    {"instruction": "what was the film", "input": "people said it was great", "output": "a great film"},
]
SCHEDULE = dict(init_r=4, target_r=2, tinit=2, tfinal=2, delta_t=1, lora_alpha=8, learning_rate=5e-3)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture
def data(tmp_path, tiny_llama) -> InstructionDataModule:
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    return InstructionDataModule(tokenizer=tiny_llama, train_file=str(path), validation_file=str(path),
                                 max_seq_length=48, batch_size=2, eval_batch_size=2)


def trainer(tmp_path: Path, max_steps: int = 6, **kwargs) -> pl.Trainer:
    options = dict(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   default_root_dir=str(tmp_path))
    return pl.Trainer(**{**options, **kwargs})


def set_random_e(module: CausalLMModule, seed: int = 3) -> None:
    """A nonzero update (random E of SVD adapters, B of LoRA), so that the adapters change the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in find_adapters(module.model).values():
            weight = adapter.lora_E if isinstance(adapter, SVDLinear) else adapter.lora_B
            weight.copy_(torch.randn(weight.shape, generator=gen) * 0.5)


# --------------------------------------------------------------------------- loss and evaluation
def test_training_loss_is_the_cross_entropy_of_the_response_tokens_only(tiny_llama, data):
    module = CausalLMModule(backbone=tiny_llama, method="lora", **SCHEDULE).eval()
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    inputs = module.model_inputs(batch)
    loss = module(**inputs).loss
    logits = module(**module.model_inputs(batch, drop=("labels",))).logits
    terms = []
    for row, feature_index in enumerate(batch["example_index"].tolist()):
        feature = data.features("validation")[feature_index]
        prompt_len = feature["labels"].count(-100)
        ids = feature["input_ids"]
        # Every response token (the eos included), predicted from the position before it; no prompt token.
        for t in range(prompt_len, len(ids)):
            terms.append(-torch.log_softmax(logits[row, t - 1], -1)[ids[t]])
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-6)


def test_evaluation_is_token_weighted_over_the_epoch(tmp_path, tiny_llama, data):
    module = CausalLMModule(backbone=tiny_llama, method="lora", generate_on_validation=False, **SCHEDULE)
    set_random_e(module)
    metrics = trainer(tmp_path).validate(module, datamodule=data, verbose=False)[0]
    module.eval()
    nll, correct, count = 0.0, 0, 0
    for batch in data.val_dataloader():  # batches of 2, 2 and 1 examples of different lengths
        logits = module(**module.model_inputs(batch, drop=("labels",))).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        scored = targets != -100
        nll += torch.nn.functional.cross_entropy(logits[scored], targets[scored], reduction="sum").item()
        correct += int((logits[scored].argmax(-1) == targets[scored]).sum())
        count += int(scored.sum())
    assert metrics["val/loss"] == pytest.approx(nll / count, rel=1e-5)
    assert metrics["val/perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert metrics["val/token_accuracy"] == pytest.approx(correct / count, abs=1e-6)
    assert "val/rougeL" not in metrics


def test_left_padded_batch_generates_what_each_prompt_generates_alone(tiny_llama, data):
    module = CausalLMModule(backbone=tiny_llama, method="lora", max_new_tokens=6, **SCHEDULE).eval()
    set_random_e(module)
    data.setup("fit")
    module._own_tokenizer = data.tokenizer
    prompts = data.eval_prompt_ids("validation")
    batched = module.generate_ids(prompts)
    for i, prompt in enumerate(prompts):
        alone = module.generate_ids([prompt])[0]
        n = len(alone)
        assert torch.equal(batched[i, :n], alone), f"prompt {i}"
        assert (batched[i, n:] == data.pad_token_id).all()


def test_generated_responses_are_scored_and_written(tmp_path, tiny_llama, data):
    module = CausalLMModule(backbone=tiny_llama, method="lora", max_new_tokens=5, **SCHEDULE)
    set_random_e(module)
    run = trainer(tmp_path, logger=pl.loggers.CSVLogger(str(tmp_path), name="run"))
    metrics = run.validate(module, datamodule=data, verbose=False)[0]
    files = sorted(Path(run.log_dir).glob("predictions_val_epoch0.jsonl"))
    assert len(files) == 1
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert [r["reference"] for r in rows] == [r["output"] for r in ROWS]
    # The logged ROUGE is the project's ROUGE of exactly the written predictions.
    expected = rouge_scores([r["prediction"] for r in rows], [r["reference"] for r in rows], use_stemmer=True)
    for name in ("rouge1", "rouge2", "rougeL"):
        assert metrics[f"val/{name}"] == pytest.approx(100 * expected[name], abs=1e-4)
    # and each prediction is what the module generates for its prompt on its own
    assert rows[1]["prediction"] == module.decode(module.generate_ids([data.eval_prompt_ids()[1]]))[0]


def test_predict_step_generates_from_the_tokens_before_the_first_label(tiny_llama, data):
    module = CausalLMModule(backbone=tiny_llama, method="lora", max_new_tokens=4, **SCHEDULE).eval()
    set_random_e(module)
    data.setup("fit")
    module._own_tokenizer = data.tokenizer
    batch = next(iter(data.val_dataloader()))
    prompts = data.eval_prompt_ids("validation")
    expected = module.decode(module.generate_ids([prompts[i] for i in batch["example_index"].tolist()]))
    assert module.predict_step(batch, 0) == expected


# --------------------------------------------------------------------------- the schedule on every family
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma", "phi3"])
def test_fit_with_the_callback_reaches_the_budget(tmp_path, family):
    folder = save_tiny_causal_lm(tmp_path / family, family, tie_word_embeddings=family == "gemma")
    path = write_jsonl(tmp_path / "train.jsonl", ROWS * 2)
    # The tokenizer as saved (BERT WordPiece): AutoTokenizer would pick Qwen2's class from the model config.
    tokenizer = BertTokenizerFast.from_pretrained(folder)
    data = InstructionDataModule(tokenizer=tokenizer, train_file=str(path), max_seq_length=40, batch_size=2)
    module = CausalLMModule(backbone=folder, method="adalora", generate_on_validation=False, **SCHEDULE)
    adapters = find_adapters(module.model)
    assert adapters and all(type(a) is SVDLinear for a in adapters.values())
    before = {p: a.lora_E.detach().clone() for p, a in adapters.items()}
    trainer(tmp_path, max_steps=8, limit_val_batches=0).fit(module, datamodule=data)
    kept = sum(int(a.rank_mask.sum()) for a in adapters.values())
    assert kept == SCHEDULE["target_r"] * len(adapters)  # the final budget b(T) = target_r per matrix
    assert any(not torch.equal(before[p], a.lora_E) for p, a in adapters.items())
    assert all(torch.isfinite(a.lora_E).all() for a in adapters.values())


@pytest.mark.parametrize("method", ["lora", "full", "houlsby", "svd_lora"])
def test_other_methods_train_on_a_decoder(tmp_path, tiny_llama, data, method):
    module = CausalLMModule(backbone=tiny_llama, method=method, generate_on_validation=False, **SCHEDULE)
    trained = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    trainer(tmp_path, max_steps=5, limit_val_batches=0).fit(module, datamodule=data)
    params = dict(module.named_parameters())
    assert any(not torch.equal(v, params[n]) for n, v in trained.items())
    assert all(torch.equal(v, params[n]) for n, v in frozen.items())
    if method != "full":
        assert "model.lm_head.weight" in frozen and "model.model.embed_tokens.weight" in frozen


# --------------------------------------------------------------------------- memory options
def test_gradient_checkpointing_gives_the_same_gradients(tiny_llama, data):
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = CausalLMModule(backbone=tiny_llama, method="adalora", gradient_checkpointing=checkpointing,
                                generate_on_validation=False, **SCHEDULE).train()
        set_random_e(module)
        on = getattr(module.model, "is_activation_checkpointing", None)  # transformers 5.x; older: is_gradient_...
        assert (on if on is not None else module.model.is_gradient_checkpointing) is checkpointing
        module(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad})
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    assert all(checkpointed[n] is not None and checkpointed[n].abs().sum() > 0 for n in plain)
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6, rtol=1e-5), name


def test_bfloat16_base_trains_float32_adapters(tmp_path, tiny_llama, data):
    module = CausalLMModule(backbone=tiny_llama, method="adalora", torch_dtype="bfloat16",
                            generate_on_validation=False, **SCHEDULE)
    adapters = find_adapters(module.model)
    assert all(a.base_layer.weight.dtype == torch.bfloat16 for a in adapters.values())
    assert module.model.lm_head.weight.dtype == torch.bfloat16
    assert all(a.lora_A.dtype == a.lora_E.dtype == a.lora_B.dtype == torch.float32 for a in adapters.values())
    before = {p: a.lora_A.detach().clone() for p, a in adapters.items()}
    trainer(tmp_path, max_steps=5, limit_val_batches=1).fit(module, datamodule=data)
    assert all(a.lora_A.dtype == torch.float32 for a in adapters.values())
    assert any(not torch.equal(before[p], a.lora_A) for p, a in adapters.items())


def test_bad_settings_are_refused_before_loading():
    with pytest.raises(ValueError, match="torch_dtype must be one of"):
        CausalLMModule(backbone="unused", torch_dtype="bf16")
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        CausalLMModule(backbone="unused", max_new_tokens=0)


def test_remote_code_is_off_unless_asked(tiny_llama, monkeypatch):
    seen = {}
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained

    def spy(name, **kwargs):
        seen.update(kwargs)
        return original(name, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    CausalLMModule(backbone=tiny_llama, method="lora")
    assert seen["trust_remote_code"] is False
    assert "attn_implementation" not in seen
    module = CausalLMModule(backbone=tiny_llama, method="lora", trust_remote_code=True, attn_implementation="eager")
    assert seen["trust_remote_code"] is True and seen["attn_implementation"] == "eager"
    assert module.model.config._attn_implementation == "eager"
