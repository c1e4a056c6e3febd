"""Quantized bases through the task modules and the command line (``--model.quantization``): a tiny Llama saved to a
folder and loaded by ``CausalLMModule(quantization=...)`` as nf4, fp4, nf4 with double quantization (bitsandbytes
4-bit), int8 (bitsandbytes LLM.int8()) and torchao int8 weight-only, on CPU.

What is checked: the base layers are quantized (by type and kind) and wrapped by float32 adapters; everything outside
the quantized layers is float32 and frozen (norms, embeddings, ``lm_head``), unless named in ``trainable_modules``; the
one line said at the start; a short Lightning fit with the AdaLoRA callback reaches the budget and leaves every base
tensor bit-identical (a validation pass included); ``optimizer="adamw8bit"`` is bitsandbytes' AdamW8bit on the same
groups and schedule and steps the adapters; the recipes parse and one runs from the command line; and what cannot run
is one ``ConfigError`` line, before anything loads where it can be known then.
"""

from __future__ import annotations

import logging
import sys

import lightning.pytorch as pl
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from adalora_pl import quantized
from adalora_pl.errors import ConfigError
from adalora_pl.injection import find_adapters
from adalora_pl.layers import SVDLinear
from adalora_pl.tasks.causal_lm_module import CausalLMModule
from tests.builders import (
    INSTRUCTION_ROWS,
    LLAMA_TARGETS,
    QUANTIZED_BASES,
    REPO_ROOT,
    print_config,
    save_tiny_backbone,
    write_jsonl,
)

pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

KINDS = list(QUANTIZED_BASES)
QUANT_EXTRA = 'pip install "adalora-pl[quant]"'
# tinit 1 / tfinal 1 of 4 steps: one warm-up step, masking down to target_r, the pattern fixed for the last step.
SCHEDULE = dict(init_r=4, target_r=2, tinit=1, tfinal=1, delta_t=1, lora_alpha=8, learning_rate=5e-3)
LAYERS = 2 * len(LLAMA_TARGETS)  # two blocks, seven projections each


@pytest.fixture
def no_loading(monkeypatch):
    """Make any backbone load fail the test: the refusals below must come before the weights are read."""
    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained was called")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def build(llama: str, kind_id: str, **options) -> CausalLMModule:
    kind, double_quant = QUANTIZED_BASES[kind_id]
    return CausalLMModule(backbone=llama, method="adalora", quantization=kind, double_quant=double_quant,
                          generate_on_validation=False, **{**SCHEDULE, **options})


def trainer(tmp_path, max_steps: int = 4, **kwargs) -> pl.Trainer:
    options = dict(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   default_root_dir=str(tmp_path))
    return pl.Trainer(**{**options, **kwargs})


def base_tensors(module: CausalLMModule) -> dict[str, torch.Tensor]:
    """Every tensor of the model that is not an adapter's own, as plain tensors: a torchao weight by its inner tensors
    (int8 values, scales), a bitsandbytes weight with its quantization state (as its state dict writes it)."""
    out = {}
    for key, value in module.model.state_dict().items():
        if any(part in key for part in (".lora_", ".ranknum", ".rank_mask")):
            continue
        flatten = getattr(value, "__tensor_flatten__", None)
        if flatten is None:
            out[key] = value.detach().clone()
            continue
        for name in flatten()[0]:
            inner = getattr(value, name)
            if inner is not None:
                out[f"{key}:{name}"] = inner.detach().clone()
    return out


# --------------------------------------------------------------------------- loading and k-bit preparation
@pytest.mark.parametrize("kind_id", KINDS)
def test_the_base_loads_quantized_with_float32_adapters_norms_and_head(llama, kind_id, caplog):
    kind, double_quant = QUANTIZED_BASES[kind_id]
    with caplog.at_level(logging.INFO):
        # A bfloat16 load: what stays unquantized must come out float32 whatever it loaded in.
        module = build(llama, kind_id, torch_dtype="bfloat16", gradient_checkpointing=True)
    adapters = find_adapters(module.model)
    assert len(adapters) == LAYERS and all(type(a) is SVDLinear for a in adapters.values())
    for adapter in adapters.values():
        assert quantized.quantization_kind(adapter.base_layer) == kind
        if kind in ("nf4", "fp4"):
            assert quantized.double_quant(adapter.base_layer) is double_quant
            assert adapter.base_layer.compute_dtype == torch.bfloat16  # quantization_compute_dtype's default
        for tensor in (adapter.lora_A, adapter.lora_E, adapter.lora_B):
            assert tensor.dtype == torch.float32 and tensor.requires_grad
    # Nothing but the adapters trains; everything outside the quantized layers is float32.
    adapter_ids = {id(p) for a in adapters.values() for p in a.adapter_parameters()}
    assert {id(p) for p in module.parameters() if p.requires_grad} == adapter_ids
    model = module.model
    unquantized = {"lm_head": model.lm_head, "embed_tokens": model.model.embed_tokens, "norm": model.model.norm,
                   "input_layernorm": model.model.layers[0].input_layernorm}
    for name, layer in unquantized.items():
        assert not quantized.is_quantized(layer), name
        assert layer.weight.dtype == torch.float32 and not layer.weight.requires_grad, name
    # What was said, once: which layers, how many, what stays float32, the bytes before and after.
    report = module.quantization_report
    assert set(report["quantized_layers"]) == set(adapters)
    assert report["unquantized_linears"] == ["lm_head"]
    assert 0 < report["bytes_after"] < report["bytes_before"]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("quantized base")]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert f"quantized base ({kind}): {LAYERS} linear layers" in lines[0]
    assert "lm_head" in lines[0] and "LlamaRMSNorm" in lines[0] and "(torch.bfloat16) ->" in lines[0]
    # Gradient checkpointing, non-reentrant, with inputs that require grad.
    on = getattr(model, "is_activation_checkpointing", None)  # transformers 5.x; older: is_gradient_checkpointing
    assert (on if on is not None else model.is_gradient_checkpointing) is True
    assert model.config.use_cache is False
    assert model.get_input_embeddings()(torch.tensor([[1, 2, 3]])).requires_grad


def test_gradient_checkpointing_on_a_quantized_base_feeds_the_blocks_inputs_that_require_grad(monkeypatch, llama):
    """transformers 5 makes the embeddings' output require grad itself when it turns checkpointing on for a model
    whose main input is ``input_ids``; 4.x does it only under PEFT. Another main input name stands for the latter
    here: the module must do it, and the adapters of the first block still get their gradient."""
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "main_input_name", "inputs_embeds")
    plain = CausalLMModule(backbone=llama, gradient_checkpointing=True, generate_on_validation=False, **SCHEDULE)
    assert not plain.model.get_input_embeddings()(torch.tensor([[1, 2]])).requires_grad  # no quantization: not asked
    module = build(llama, "nf4", gradient_checkpointing=True).train()
    assert module.model.get_input_embeddings()(torch.tensor([[1, 2]])).requires_grad
    with torch.no_grad():
        for adapter in find_adapters(module.model).values():
            adapter.lora_E.fill_(0.1)  # A and B get a gradient only through a nonzero E
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    module(input_ids=ids, labels=ids).loss.backward()
    first = module.model.model.layers[0].self_attn.q_proj
    assert first.lora_A.grad is not None and first.lora_A.grad.abs().sum() > 0


@pytest.mark.parametrize("kind_id", KINDS)
def test_a_short_fit_reaches_the_budget_and_leaves_the_base_bit_identical(tmp_path, llama, data, kind_id, caplog):
    module = build(llama, kind_id, gradient_checkpointing=True)
    adapters = find_adapters(module.model)
    base = base_tensors(module)
    before = {p: a.lora_E.detach().clone() for p, a in adapters.items()}
    # One validation batch too: an eval-mode pass must not repack or otherwise touch the quantized weights.
    run = trainer(tmp_path, limit_val_batches=1, val_check_interval=4)
    with caplog.at_level(logging.WARNING):
        run.fit(module, datamodule=data)
    assert run.global_step == 4
    # LLM.int8()'s notice that it casts float32 input to float16, logged at every forward of every layer, is dropped.
    assert not [r for r in caplog.records if "MatMul8bitLt" in r.getMessage()]
    kept = sum(int(a.rank_mask.sum()) for a in adapters.values())
    assert kept == SCHEDULE["target_r"] * LAYERS == module.schedule_callback.budget
    assert any(not torch.equal(before[p], a.lora_E) for p, a in adapters.items())
    assert all(torch.isfinite(a.lora_E).all() and a.lora_E.dtype == torch.float32 for a in adapters.values())
    after = base_tensors(module)
    assert after.keys() == base.keys()
    changed = [k for k in base if not torch.equal(base[k], after[k])]
    assert not changed, changed
    assert any(":" in k or k.endswith(("absmax", "SCB")) or base[k].dtype in (torch.uint8, torch.int8)
               for k in base)  # the quantized weights were among the compared tensors


def test_adamw8bit_steps_the_adapters_with_the_adamw_groups_and_schedule(tmp_path, llama, data):
    import bitsandbytes as bnb

    # lm_head trained in full: a head group with its own rate, and a tensor large enough (8192 elements, bitsandbytes'
    # min_8bit_size is 4096) for 8-bit optimizer states.
    module = build(llama, "nf4", optimizer="adamw8bit", trainable_modules=["lm_head"], head_learning_rate=1e-3)
    adapters = find_adapters(module.model)
    assert module.model.lm_head.weight.requires_grad and not quantized.is_quantized(module.model.lm_head)
    trained = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    run = trainer(tmp_path, limit_val_batches=0)
    run.fit(module, datamodule=data)
    optimizer = run.optimizers[0]
    assert type(optimizer) is bnb.optim.AdamW8bit
    adapter_ids = {id(p) for a in adapters.values() for p in a.adapter_parameters()}
    groups = optimizer.param_groups
    assert [{id(p) for p in g["params"]} for g in groups] == [adapter_ids, {id(module.model.lm_head.weight)}]
    assert [g["initial_lr"] for g in groups] == [SCHEDULE["learning_rate"], 1e-3]
    assert [g["betas"] for g in groups] == [(0.9, 0.999)] * 2 and all(g["weight_decay"] == 0.0 for g in groups)
    # The linear schedule to 0 at the last step (warmup_steps 0), as with torch's AdamW.
    assert [g["lr"] for g in groups] == [0.0, 0.0]
    assert optimizer.state[module.model.lm_head.weight]["state1"].dtype == torch.uint8  # 8-bit moments
    params = dict(module.named_parameters())
    assert all(not torch.equal(v, params[n]) for n, v in trained.items() if "lora_A" in n or "lora_B" in n)
    assert not torch.equal(trained["model.lm_head.weight"], params["model.lm_head.weight"])
    assert sum(int(a.rank_mask.sum()) for a in adapters.values()) == SCHEDULE["target_r"] * LAYERS


def test_a_classifier_keeps_its_heads_unquantized_and_trainable(tmp_path):
    from adalora_pl.tasks.glue_module import GLUEClassifier

    module = GLUEClassifier(task_name="cola", backbone=save_tiny_backbone(tmp_path / "bert"), quantization="nf4",
                            init_r=4, target_r=2)
    model = module.model
    # trainable_modules' defaults (classifier, pooler) stay plain float32 layers and train; the encoder is 4-bit.
    assert module.quantization_report["unquantized_linears"] == ["bert.pooler.dense", "classifier"]
    for head in (model.bert.pooler.dense, model.classifier):
        assert not quantized.is_quantized(head) and head.weight.dtype == torch.float32 and head.weight.requires_grad
    assert len(module.quantization_report["quantized_layers"]) == len(find_adapters(model)) == 12
    assert all(quantized.quantization_kind(a.base_layer) == "nf4" for a in find_adapters(model).values())


# --------------------------------------------------------------------------- what cannot run: one line
@pytest.mark.parametrize(("package", "options"), [
    ("bitsandbytes", {"quantization": "nf4"}),
    ("bitsandbytes", {"quantization": "int8"}),
    ("bitsandbytes", {"optimizer": "adamw8bit"}),
    ("torchao", {"quantization": "torchao_int8"}),
], ids=["nf4", "int8", "adamw8bit", "torchao_int8"])
def test_a_missing_extra_is_one_line_naming_it_before_anything_loads(monkeypatch, llama, no_loading, package,
                                                                    options):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now raises ImportError
    with pytest.raises(ConfigError) as error:
        CausalLMModule(backbone=llama, **options)
    message = str(error.value)
    assert "\n" not in message and QUANT_EXTRA in message and package in message
    assert next(iter(options.values())) in message  # names the setting that needs it


def test_full_fine_tuning_of_a_quantized_base_is_refused(llama, no_loading):
    with pytest.raises(ConfigError, match=r"method='full' .* cannot train"):
        CausalLMModule(backbone=llama, method="full", quantization="nf4")


def test_bitsandbytes_without_cuda_needs_transformers_4_53(monkeypatch, llama, no_loading):
    import transformers

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(transformers, "__version__", "4.52.4")
    with pytest.raises(ConfigError, match=r"transformers>=4\.53 .*installed: 4\.52\.4"):
        CausalLMModule(backbone=llama, quantization="fp4")


@pytest.mark.parametrize("options", [{"quantization": "int8"}, {"optimizer": "adamw8bit"}], ids=["int8", "adamw8bit"])
def test_bitsandbytes_without_cuda_needs_0_50(monkeypatch, llama, no_loading, options):
    import bitsandbytes

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bitsandbytes, "__version__", "0.49.2")
    with pytest.raises(ConfigError, match=r"without CUDA needs bitsandbytes>=0\.50 .*installed: 0\.49\.2"):
        CausalLMModule(backbone=llama, **options)


def test_torchao_older_than_0_16_is_refused(monkeypatch, llama, no_loading):
    import torchao

    monkeypatch.setattr(torchao, "__version__", "0.15.0")
    with pytest.raises(ConfigError, match=r"torchao>=0\.16 .* installed: 0\.15\.0"):
        CausalLMModule(backbone=llama, quantization="torchao_int8")


def test_a_model_with_nothing_to_quantize_is_one_line(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    # GPT-2's blocks are transformers' Conv1D, not nn.Linear: torchao's int8 weight-only quantizes none of them.
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32)).save_pretrained(tmp_path)
    with pytest.raises(ConfigError) as error:
        CausalLMModule(backbone=str(tmp_path), quantization="torchao_int8")
    assert "\n" not in str(error.value)
    assert "quantized no layer of GPT2LMHeadModel" in str(error.value) and "mlp.c_fc" in str(error.value)


def test_a_quantized_load_transformers_refuses_is_one_line(monkeypatch, llama):
    def refuse(name, **kwargs):
        assert kwargs["quantization_config"].bnb_4bit_quant_type == "nf4"
        raise ValueError("this model does not support bitsandbytes 4-bit.\nSee the documentation")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    with pytest.raises(ConfigError) as error:
        CausalLMModule(backbone=llama, quantization="nf4")
    assert str(error.value) == (f"could not load the backbone {llama!r} with quantization='nf4' as "
                                "AutoModelForCausalLM (ValueError: this model does not support bitsandbytes 4-bit)")


# --------------------------------------------------------------------------- recipes and the command line
@pytest.mark.parametrize("recipe", ["smollm2_xsum_nf4.yaml", "llama_alpaca_qlora.yaml"])
def test_the_quantized_recipes_parse_with_their_documented_settings(capsys, recipe):
    printed = yaml.safe_load(print_config(capsys, REPO_ROOT / "configs" / recipe))
    model = printed["model"]["init_args"]
    assert printed["model"]["class_path"] == "adalora_pl.tasks.causal_lm_module.CausalLMModule"
    assert model["quantization"] == "nf4" and model["method"] == "adalora"
    if recipe == "smollm2_xsum_nf4.yaml":  # smollm2_xsum.yaml with an nf4 base
        plain = yaml.safe_load(print_config(capsys, REPO_ROOT / "configs" / "smollm2_xsum.yaml"))
        differ = {k for k in model if model[k] != plain["model"]["init_args"].get(k)}
        assert differ == {"quantization", "double_quant"}
        assert printed["data"] == plain["data"] and printed["trainer"] == plain["trainer"]
    else:  # QLoRA's 7B settings (Dettmers et al. 2023): nf4, double quantization, bf16, LoRA r 64 / alpha 16
        data, trainer_options = printed["data"]["init_args"], printed["trainer"]
        assert model["double_quant"] is True and model["quantization_compute_dtype"] == "bfloat16"
        assert model["target_r"] == 64 and model["init_r"] == 96 and model["lora_alpha"] / model["init_r"] == 16 / 64
        assert model["learning_rate"] == 2e-4 and model["lora_dropout"] == 0.1 and model["gradient_checkpointing"]
        assert data["batch_size"] * trainer_options["accumulate_grad_batches"] == 16
        assert trainer_options["max_steps"] == 10000 and trainer_options["gradient_clip_val"] == 0.3


def test_the_nf4_recipe_fits_from_the_command_line(tmp_path, llama):
    from adalora_pl.cli import main

    rows = [{"id": f"doc-{i}", "document": r["instruction"], "summary": r["output"]}
            for i, r in enumerate(INSTRUCTION_ROWS)]
    path = write_jsonl(tmp_path / "xsum.jsonl", rows)
    cli = main([
        "fit", "--config", str(REPO_ROOT / "configs" / "smollm2_xsum_nf4.yaml"),
        "--model.backbone", llama, "--data.dataset_name", "null", "--data.train_file", str(path),
        "--data.validation_file", str(path), "--data.max_seq_length", "40", "--data.batch_size", "2",
        "--model.init_r", "4", "--model.target_r", "2", "--model.delta_t", "1", "--model.tinit", "1",
        "--model.tfinal", "1", "--model.max_new_tokens", "4", "--model.quantization_compute_dtype", "float32",
        "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path / "run"),
    ])
    module = cli.model
    assert cli.trainer.global_step == 3
    assert module.quantization_report["kind"] == "nf4" and module.hparams.double_quant is True
    adapters = find_adapters(module.model)
    assert all(quantized.quantization_kind(a.base_layer) == "nf4" for a in adapters.values())
    assert sum(int(a.rank_mask.sum()) for a in adapters.values()) == 2 * len(adapters)
