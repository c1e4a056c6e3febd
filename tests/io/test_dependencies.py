"""What a clean install needs at run time is declared (the paper's tokenizer, the fit-end report), and the version
floors that ``pyproject.toml`` declares are true: the installed versions meet them, and the APIs the code relies on
exist at them where that is cheap to know.

The floors are read from ``pyproject.toml`` itself, not from an installed package's metadata (an ``egg-info`` left by
an older editable install can disagree with the file).
"""

from __future__ import annotations

import ast
import json
import re
from importlib.metadata import PackageNotFoundError, version

import pytest

from tests.builders import REPO_ROOT

try:
    import tomllib  # Python >= 3.11
except ImportError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PYPROJECT = REPO_ROOT / "pyproject.toml"
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*?)\s*(;.*)?$")


def _release(text: str) -> tuple[int, ...]:
    """The numeric release of a version (``"2.13.0+cpu"`` -> ``(2, 13, 0)``, ``"4.57.0.dev0"`` -> ``(4, 57, 0)``),
    padded with zeros to compare as PEP 440 does for final releases."""
    match = re.match(r"\d+(?:\.\d+)*", text.strip())
    assert match, f"not a version: {text!r}"
    parts = tuple(int(p) for p in match.group().split("."))
    return parts + (0,) * (4 - len(parts))


def _project() -> dict:
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]


def _requirements(groups: tuple[str, ...] = ("", "dev", "llm", "quant")) -> dict[str, tuple[str, str]]:
    """``{distribution: (group, floor)}`` of pyproject's dependencies ("") and optional groups; every one must
    carry a ``>=`` floor."""
    project = _project()
    out = {}
    for group in groups:
        specs = project["dependencies"] if group == "" else project["optional-dependencies"][group]
        for spec in specs:
            match = REQUIREMENT.match(spec)
            assert match, f"pyproject.toml: cannot read the requirement {spec!r}"
            name, _, constraint, _ = match.groups()
            floor = re.fullmatch(r">=\s*([0-9][0-9.]*)(?:\s*,.*)?", constraint or "")
            assert floor, f"pyproject.toml: {spec!r} declares no >= floor"
            out[name.lower().replace("_", "-")] = (group, floor.group(1))
    return out


def _floor(name: str) -> tuple[int, ...]:
    return _release(_requirements()[name][1])


def test_sentencepiece_and_matplotlib_are_dependencies_of_the_package():
    assert {"sentencepiece", "matplotlib", "numpy"} <= set(_requirements(("",)))


def test_every_declared_floor_is_at_or_below_the_installed_version():
    """A floor above what is installed means the suite never ran at it; a missing package, a broken install."""
    requirements = _requirements()
    assert {"torch", "transformers", "lightning", "pytest", "peft", "gguf", "accelerate"} <= set(requirements)
    too_high = {}
    for name, (group, floor) in requirements.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            pytest.fail(f"{name} (pyproject {'dependencies' if not group else group}) is not installed")
        if _release(installed) < _release(floor):
            too_high[name] = (floor, installed)
    assert not too_high, f"floors above the installed versions (floor, installed): {too_high}"


# What the code relies on, and the oldest release known to have it. Each entry was checked against that release
# (its wheel's source or its release notes); a floor lowered below one of them breaks the code that uses it.
APIS_AT_FLOOR = [
    # adalora_pl/callback.py refuses sharding strategies by class; ModelParallelStrategy came with Lightning 2.3.
    ("lightning", "2.3", "lightning.pytorch.strategies.ModelParallelStrategy"),
    # The decoder presets (adalora_pl/injection.py) name gemma2 and phi3 models; the 4.45.0 wheel has both, and
    # from_pretrained(gguf_file=...) (adalora_pl/io/gguf.py), apply_chat_template and
    # gradient_checkpointing_enable(gradient_checkpointing_kwargs=...) (causal_lm_module.py).
    ("transformers", "4.45", "models gemma2 and phi3, gguf_file, apply_chat_template, gradient_checkpointing_kwargs"),
]


@pytest.mark.parametrize(("name", "needed", "api"), APIS_AT_FLOOR, ids=[a[0] for a in APIS_AT_FLOOR])
def test_the_floor_has_the_apis_the_code_relies_on(name, needed, api):
    assert _floor(name) >= _release(needed), f"{name}>={_requirements()[name][1]} predates {api} ({needed})"


def test_the_transformers_floor_gets_the_dtype_keyword_it_takes():
    """from_pretrained's ``torch_dtype`` became ``dtype`` in transformers 4.56.0; below it, ``dtype`` is passed on to
    the model's constructor, which raises. The module picks the keyword by the installed version, so both the
    floor and the installed release get the one they take."""
    from adalora_pl.io.pretrained import dtype_keyword

    floor = _requirements()["transformers"][1]
    expected = "dtype" if _release(floor) >= (4, 56) else "torch_dtype"
    assert dtype_keyword(floor) == expected
    assert dtype_keyword("4.55.4") == "torch_dtype" and dtype_keyword("4.56.0") == "dtype"


# Names that Python added after 3.10, the floor of requires-python: importing one fails on 3.10.
NEWER_THAN_310 = {"tomllib": None, "typing": {"Self", "LiteralString", "Never", "assert_never", "assert_type",
                                               "reveal_type", "Required", "NotRequired", "TypeVarTuple", "Unpack",
                                               "dataclass_transform", "override"},
                  "enum": {"StrEnum", "verify", "member", "nonmember"}, "datetime": {"UTC"},
                  "asyncio": {"TaskGroup", "timeout", "Runner"}, "contextlib": {"chdir"}}


def test_the_package_imports_nothing_newer_than_its_python_floor():
    assert _project()["requires-python"] == ">=3.10"
    found = []
    sources = [*(REPO_ROOT / "adalora_pl").rglob("*.py"), *(REPO_ROOT / "datamodules").rglob("*.py"),
               REPO_ROOT / "cli.py"]
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found += [(path, a.name) for a in node.names if a.name in NEWER_THAN_310]
            elif isinstance(node, ast.ImportFrom) and node.module in NEWER_THAN_310:
                names = NEWER_THAN_310[node.module]
                found += [(path, f"{node.module}.{a.name}") for a in node.names if names is None or a.name in names]
    assert not found, [f"{p.relative_to(REPO_ROOT)}: {name}" for p, name in found]


def test_tokenizer_from_a_sentencepiece_model_alone_loads(tmp_path):
    """microsoft/deberta-v3-base ships its tokenizer only as spm.model: a folder with nothing else loads
    (transformers needs the sentencepiece package for that) and round-trips text."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the cat number {i} sat on the mat and read a good book" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "spm"), vocab_size=40,
                                   model_type="unigram", minloglevel=2)
    folder = tmp_path / "deberta_v3_tokenizer"
    folder.mkdir()
    (folder / "spm.model").write_bytes((tmp_path / "spm.model").read_bytes())
    (folder / "config.json").write_text(json.dumps({"model_type": "deberta-v2"}))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("the cat sat on the mat")["input_ids"]
    assert len(ids) > 3 and tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == "thecatsatonthemat"



def test_a_bfloat16_adalora_fit_with_validation_and_generation_runs_at_the_installed_versions(tmp_path):
    """What `.ci/run` runs once more at the declared floors (transformers 4.45, Lightning 2.4, torchmetrics 1.4,
    datasets 3.0, numpy 1.24, ...): a tiny decoder fit through the instruction data module, with a bfloat16 base
    (the dtype keyword), AdaLoRA's schedule, a held-out validation split, generation and the fit-end report. Built
    from files only (a vocab.txt tokenizer), so that it runs with old and new transformers alike."""
    import lightning.pytorch as pl
    import torch
    import transformers as hf

    from adalora_pl.tasks.causal_lm_module import CausalLMModule
    from datamodules.instruction import InstructionDataModule

    words = "[PAD] [UNK] [CLS] [SEP] [MASK] the a cat dog sat ran on mat what who is paris capital france good".split()
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    hf.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    config = hf.LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, bos_token_id=2,
                            eos_token_id=3)
    torch.manual_seed(0)
    hf.LlamaForCausalLM(config).save_pretrained(tmp_path)
    rows = [{"id": f"r{i}", "instruction": "what is the capital", "output": "paris is the capital"} for i in range(6)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data = InstructionDataModule(tokenizer=str(tmp_path), train_file=str(tmp_path / "t.jsonl"), validation_holdout=2,
                                 max_seq_length=32, batch_size=2)
    module = CausalLMModule(backbone=str(tmp_path), method="adalora", torch_dtype="bfloat16", init_r=2, target_r=1,
                            tinit=0, tfinal=0, delta_t=1, max_new_tokens=3)
    assert module.model.lm_head.weight.dtype == torch.bfloat16
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=pl.loggers.CSVLogger(str(tmp_path)),
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2
    metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
    assert {"val/loss", "val/perplexity", "val/token_accuracy", "val/rougeL"} <= set(metrics)
    log_dir = trainer.log_dir
    lines = open(f"{log_dir}/predictions_val_epoch{trainer.current_epoch}.jsonl", encoding="utf-8").read().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["r4", "r5"]
    assert json.loads(open(f"{log_dir}/rank_pattern.json", encoding="utf-8").read())["total_rank"] == 7
