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
from tests.builders import INSTRUCTION_ROWS, save_tiny_causal_lm, write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROWS = INSTRUCTION_ROWS
@pytest.fixture
def from_pretrained_kwargs(monkeypatch) -> dict:
    """The keyword arguments of the last ``AutoModelForCausalLM.from_pretrained`` call (which still runs)."""
    from transformers import AutoModelForCausalLM

    seen: dict = {}
    original = AutoModelForCausalLM.from_pretrained

    def spy(name, **kwargs):
        seen.update(kwargs)
        return original(name, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    return seen


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


@pytest.mark.parametrize(("version", "keyword"), [("4.45.0", "torch_dtype"), ("4.55.4", "torch_dtype"),
                                                  ("4.56.0", "dtype"), ("4.57.0.dev0", "dtype"), ("5.24.0", "dtype")])
def test_torch_dtype_reaches_from_pretrained_under_the_keyword_of_the_installed_transformers(
        tiny_llama, monkeypatch, from_pretrained_kwargs, version, keyword):
    """transformers renamed from_pretrained's ``torch_dtype`` to ``dtype`` in 4.56.0; an older one hands an unknown
    ``dtype`` on to the model's constructor, which rejects it. pyproject allows transformers >= 4.45. (The installed
    transformers takes both keywords; what it gets is what the version under test would get.)"""
    import transformers

    seen = from_pretrained_kwargs
    monkeypatch.setattr(transformers, "__version__", version)
    module = CausalLMModule(backbone=tiny_llama, method="lora", torch_dtype="bfloat16")
    assert seen[keyword] is torch.bfloat16
    assert ({"dtype", "torch_dtype"} - {keyword}).isdisjoint(seen)
    assert module.model.lm_head.weight.dtype == torch.bfloat16


def test_remote_code_is_off_unless_asked(tiny_llama, from_pretrained_kwargs):
    seen = from_pretrained_kwargs
    CausalLMModule(backbone=tiny_llama, method="lora")
    assert seen["trust_remote_code"] is False
    assert "attn_implementation" not in seen
    module = CausalLMModule(backbone=tiny_llama, method="lora", trust_remote_code=True, attn_implementation="eager")
    assert seen["trust_remote_code"] is True and seen["attn_implementation"] == "eager"
    assert module.model.config._attn_implementation == "eager"


# --------------------------------------------------------------------------- the test split, ids, the file
def read_predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_test_stage_generates_from_the_test_prompts(tmp_path, tiny_llama):
    validation = write_jsonl(tmp_path / "v.jsonl", ROWS[:3])
    test_rows = [{**r, "id": f"t-{i}"} for i, r in enumerate(ROWS[3:])]
    data = InstructionDataModule(tokenizer=tiny_llama, train_file=str(validation), validation_file=str(validation),
                                 test_file=str(write_jsonl(tmp_path / "t.jsonl", test_rows)), max_seq_length=48,
                                 batch_size=2, eval_batch_size=2)
    module = CausalLMModule(backbone=tiny_llama, method="lora", max_new_tokens=5, **SCHEDULE)
    set_random_e(module)
    run = trainer(tmp_path, logger=pl.loggers.CSVLogger(str(tmp_path), name="run"))
    run.test(module, datamodule=data, verbose=False)
    rows = read_predictions(Path(run.log_dir) / "predictions_test_epoch0.jsonl")
    assert [r["id"] for r in rows] == ["t-0", "t-1"]
    assert [r["reference"] for r in rows] == [r["output"] for r in test_rows]
    module.eval()
    expected = module.decode(module.generate_ids(data.eval_prompt_ids("test")))
    assert [r["prediction"] for r in rows] == expected


def test_predictions_carry_the_datasets_ids_and_write_predictions_false_writes_none(tmp_path, tiny_llama):
    rows = [{**r, "id": str(32556640 + i)} for i, r in enumerate(ROWS)]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    for write in (True, False):
        data = InstructionDataModule(tokenizer=tiny_llama, train_file=str(path), validation_file=str(path),
                                     max_seq_length=48, eval_batch_size=2)
        module = CausalLMModule(backbone=tiny_llama, method="lora", max_new_tokens=2, write_predictions=write,
                                **SCHEDULE)
        run = trainer(tmp_path / str(write), logger=pl.loggers.CSVLogger(str(tmp_path / str(write)), name="run"))
        metrics = run.validate(module, datamodule=data, verbose=False)[0]
        assert "val/rougeL" in metrics  # generated and scored either way
        written = sorted(Path(run.log_dir).glob("predictions_*.jsonl"))
        if write:
            assert [r["id"] for r in read_predictions(written[0])] == [r["id"] for r in rows]
        else:
            assert written == []


def test_max_prompt_tokens_cuts_prompts_from_the_left(tiny_llama, data, monkeypatch):
    """As documented: a prompt longer than max_prompt_tokens loses its start; its end (the response marker) stays."""
    module = CausalLMModule(backbone=tiny_llama, method="lora", max_new_tokens=2, max_prompt_tokens=6,
                            **SCHEDULE).eval()
    data.setup("fit")
    module._own_tokenizer = data.tokenizer
    prompts = data.eval_prompt_ids("validation")[:3]
    assert all(len(p) > 6 for p in prompts)
    seen = []
    original = module.model.generate

    def spy(**kwargs):
        seen.append(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(module.model, "generate", spy)
    module.generate_ids(prompts)
    assert seen[0]["input_ids"].tolist() == [p[-6:] for p in prompts]
    assert seen[0]["attention_mask"].all()
    module.hparams.max_prompt_tokens = None  # no trainer, no data module: no limit
    module.generate_ids(prompts[:1])
    assert seen[1]["input_ids"].tolist() == [prompts[0]]


# --------------------------------------------------------------------------- the sanity check and progress lines
def test_the_sanity_check_does_not_generate_unless_asked(tmp_path, tiny_llama, data, monkeypatch, caplog):
    calls = {}
    for on in (False, True):
        module = CausalLMModule(backbone=tiny_llama, method="lora", max_new_tokens=2, generate_on_sanity_check=on,
                                **SCHEDULE)
        module.progress_every_s = 0.0  # a progress line after every batch
        seen = calls[on] = []

        def spy(prompts, m=module, s=seen, generate=module.generate_ids):
            s.append(m.trainer.sanity_checking)
            return generate(prompts)

        monkeypatch.setattr(module, "generate_ids", spy)
        with caplog.at_level("INFO"):
            caplog.clear()
            trainer(tmp_path / str(on), max_steps=1, max_epochs=1, limit_train_batches=1, num_sanity_val_steps=1
                    ).fit(module, datamodule=data)
        if not on:
            assert "sanity check: teacher-forced evaluation only, no generation" in caplog.text
            # the validation after the training batch: 3 batches of 2, 2 and 1 prompts
            assert "val: generating up to 2 tokens, greedy for 3 batches of about 2 prompts each" in caplog.text
            for line in ("batch 1/3 (2 responses)", "batch 2/3 (4 responses)", "batch 3/3 (5 responses)"):
                assert f"val generation: {line}" in caplog.text
    assert calls[False] == [False] * 3  # the validation's 3 batches, none in the sanity check
    assert calls[True] == [True] + [False] * 3


# --------------------------------------------------------------------------- a chat template's end of turn
def test_generation_stops_at_the_chat_templates_end_of_turn(tmp_path, tiny_llama, monkeypatch):
    """A template that ends an assistant turn with its own token ([MASK] here, Gemma's <end_of_turn> in life): the
    responses are trained to end with it, and generation stops there as well as at eos."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}[MASK]\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    path = write_jsonl(tmp_path / "t.jsonl", ROWS)
    data = InstructionDataModule(tokenizer=tokenizer, train_file=str(path), validation_file=str(path),
                                 max_seq_length=48, eval_batch_size=5)
    module = CausalLMModule(backbone=tiny_llama, method="lora", max_new_tokens=2, **SCHEDULE)
    seen = []
    original = module.model.generate
    monkeypatch.setattr(module.model, "generate", lambda **kw: seen.append(kw["eos_token_id"]) or original(**kw))
    trainer(tmp_path).validate(module, datamodule=data, verbose=False)
    assert data.features("validation")[0]["labels"][-1] == tokenizer.mask_token_id
    assert seen == [[tokenizer.sep_token_id, tokenizer.mask_token_id]]
    # Without a data module (generate_text), the end tokens the model's generation_config lists (Gemma's and
    # Phi-3's list their end of turn there) stop it.
    alone = CausalLMModule(backbone=tiny_llama, method="lora", **SCHEDULE)
    alone._own_tokenizer = tokenizer
    alone.model.generation_config.eos_token_id = [tokenizer.mask_token_id, tokenizer.sep_token_id]
    assert alone._special_ids()[1] == [tokenizer.sep_token_id, tokenizer.mask_token_id]


# --------------------------------------------------------------------------- packed position ids
def test_packed_position_ids_reach_the_model_and_attention_still_crosses_examples(tmp_path, tiny_llama):
    path = write_jsonl(tmp_path / "t.jsonl", ROWS[:2])
    packed = InstructionDataModule(tokenizer=tiny_llama, train_file=str(path), max_seq_length=96, packing=True,
                                   packed_position_ids=True, batch_size=1)
    packed.setup("fit")
    batch = next(iter(packed.train_dataloader()))
    first, second = (len(f["input_ids"]) for f in packed._tokenize("train", packed._examples["train"]))
    assert batch["input_ids"].shape[1] == first + second  # both examples in one row
    assert batch["position_ids"][0].tolist() == list(range(first)) + list(range(second))
    module = CausalLMModule(backbone=tiny_llama, method="lora", generate_on_validation=False, **SCHEDULE).eval()
    set_random_e(module)
    with torch.no_grad():
        restarted = module(**module.model_inputs(batch)).logits[0]
        running = module(**module.model_inputs(batch, drop=("position_ids",))).logits[0]
        alone = module(input_ids=batch["input_ids"][:, first:]).logits[0]
    # the first example is computed as it would be alone either way; the second one's positions now restart ...
    assert torch.allclose(restarted[:first], running[:first], atol=1e-6)
    assert not torch.allclose(restarted[first:], running[first:], atol=1e-4)
    # ... but it still attends to the first example: its logits are not those it has alone
    assert not torch.allclose(restarted[first:], alone, atol=1e-4)
