"""What a clean install needs at run time is declared: the paper's tokenizer and the fit-end report."""

from __future__ import annotations

import json
import re
from importlib.metadata import requires


def _declared() -> set[str]:
    return {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower() for r in requires("adalora-pl") or []}


def test_sentencepiece_and_matplotlib_are_dependencies_of_the_package():
    assert {"sentencepiece", "matplotlib", "numpy"} <= _declared()


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

