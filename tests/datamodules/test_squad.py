"""SquadDataModule: windows, offsets and labels, the module's post-processing, real dev files, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from adalora_pl.errors import ConfigError
from adalora_pl.io.pretrained import LoadError
from adalora_pl.tasks.squad import postprocess_qa_predictions
from datamodules.squad import SquadDataModule, read_squad_json
from tests.builders import qa, tiny_bert_config, vocab_words, write_squad


def long_context(tokenizer) -> tuple[str, int]:
    """About 70 words (some split into several word pieces); the answer "paris france" follows word 25."""
    filler = [w for w in vocab_words(tokenizer) if w not in {"paris", "france"}]
    assert len(filler) > 40
    words = filler[:25] + ["paris", "france"] + filler[25:] + ["parisian", "cats,", "dogs."] + filler[:10]
    context = " ".join(words)
    return context, context.index("paris france")


# --------------------------------------------------------------------------------------------------
# Windows, offsets and labels
# --------------------------------------------------------------------------------------------------


def test_windows_offsets_and_labels(tmp_path, tiny_tokenizer, tok_dir):
    context, answer_start = long_context(tiny_tokenizer)
    answer = "paris france"
    question = "where is paris"
    path = write_squad(
        tmp_path / "long.json",
        [{"title": "t", "paragraphs": [{"context": context, "qas": [qa("q1", question, context, answer)]}]}],
    )
    max_len, stride = 32, 8
    dm = SquadDataModule(
        tokenizer=tok_dir,
        train_file=str(path),
        validation_file=str(path),
        max_seq_length=max_len,
        doc_stride=stride,
        batch_size=2,
    )
    dm.setup("fit")

    # Expected windows from the context's own tokenization: each window holds `width` context
    # tokens and consecutive windows share `stride` of them.
    ctx = tiny_tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)
    ctx_offsets = [list(o) for o in ctx["offset_mapping"]]
    q_len = len(tiny_tokenizer(question, add_special_tokens=False)["input_ids"])
    width = max_len - q_len - 3
    step = width - stride
    n_windows = 1 + math.ceil(max(0, len(ctx_offsets) - width) / step)
    assert len(ctx_offsets) > max_len and n_windows >= 3
    assert len(dm.train_features) == len(dm.eval_features) == n_windows
    assert dm.eval_features["example_id"] == ["q1"] * n_windows
    assert dm.eval_features["feature_index"] == list(range(n_windows))

    answer_end = answer_start + len(answer)
    ans_first = next(i for i, (s, e) in enumerate(ctx_offsets) if s <= answer_start < e)
    ans_last = next(i for i, (s, e) in enumerate(ctx_offsets) if s < answer_end <= e)
    seen_inside = seen_partial = seen_outside = 0
    for k in range(n_windows):
        train_row, eval_row = dm.train_features[k], dm.eval_features[k]
        assert train_row["input_ids"] == eval_row["input_ids"]
        assert len(eval_row["input_ids"]) == len(eval_row["offset_mapping"]) == max_len
        offsets = eval_row["offset_mapping"]
        ctx_positions = [i for i, pair in enumerate(offsets) if pair != [-1, -1]]
        # [CLS] question [SEP] come first: the context starts right after them, contiguously.
        assert ctx_positions == list(range(q_len + 2, q_len + 2 + len(ctx_positions)))
        expected = ctx_offsets[k * step : k * step + width]
        assert [offsets[i] for i in ctx_positions] == expected
        tokens = tiny_tokenizer.convert_ids_to_tokens([eval_row["input_ids"][i] for i in ctx_positions])
        for token, (s, e) in zip(tokens, expected, strict=True):
            assert token.removeprefix("##") == context[s:e].lower()

        start, end = train_row["start_positions"], train_row["end_positions"]
        window_first, window_last = k * step, k * step + len(expected) - 1
        if window_first <= ans_first and ans_last <= window_last:
            seen_inside += 1
            assert 0 < start <= end
            assert offsets[start][0] == answer_start and offsets[end][1] == answer_end
            assert context[offsets[start][0] : offsets[end][1]] == answer
        else:
            overlaps = not (ans_last < window_first or window_last < ans_first)
            seen_partial += overlaps
            seen_outside += not overlaps
            assert start == end == 0  # CLS: the whole answer is not in this window
    assert seen_inside >= 1 and seen_partial >= 1 and seen_outside >= 1

    # Batches hold only tensors, with the documented keys.
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "start_positions", "end_positions"}
    assert all(isinstance(v, torch.Tensor) for v in batch.values())
    assert batch["input_ids"].shape == (2, max_len)
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "feature_index"}
    assert batch["feature_index"].dtype == torch.long and batch["feature_index"].tolist() == [0, 1]
    assert next(iter(dm.test_dataloader()))["input_ids"].equal(batch["input_ids"])


def test_v2_unanswerable_and_multiple_answers(tmp_path, tiny_tokenizer, tok_dir):
    context, _ = long_context(tiny_tokenizer)
    short = "the cat sat on the mat"
    path = write_squad(
        tmp_path / "v2.json",
        [
            {
                "title": "a",
                "paragraphs": [
                    {"context": context, "qas": [qa("none", "who is he", context, None)]},
                    {
                        "context": short,
                        "qas": [
                            {
                                "id": "two",
                                "question": "where sat the cat",
                                "answers": [
                                    {"text": "the mat", "answer_start": 15},
                                    {"text": "mat", "answer_start": 19},
                                ],
                            }
                        ],
                    },
                ],
            }
        ],
        version="v2.0",
    )
    dm = SquadDataModule(
        version="2.0",
        tokenizer=tok_dir,
        train_file=str(path),
        validation_file=str(path),
        max_seq_length=32,
        doc_stride=8,
    )
    assert dm.version_2
    dm.setup("fit")
    ids = dm.eval_features["example_id"]
    assert ids.count("none") >= 3 and ids.count("two") == 1
    for k, example_id in enumerate(ids):
        row = dm.train_features[k]
        if example_id == "none":
            assert row["start_positions"] == row["end_positions"] == 0
        else:  # labelled with the first answer, "the mat"
            offsets = dm.eval_features[k]["offset_mapping"]
            assert short[offsets[row["start_positions"]][0] : offsets[row["end_positions"]][1]] == "the mat"
    assert dm.references == {"none": [], "two": ["the mat", "mat"]}
    assert dm.eval_examples["answers"][0] == {"text": [], "answer_start": []}

    # A v1 module refuses unanswerable questions.
    with pytest.raises(ValueError, match="none"):
        SquadDataModule(version="v1", tokenizer=tok_dir, validation_file=str(path)).setup("validate")


# --------------------------------------------------------------------------------------------------
# The module's post-processing
# --------------------------------------------------------------------------------------------------


def test_module_postprocess_scatters_feature_index(eval_module):
    dm = eval_module
    n, seq_len = len(dm.eval_features), len(dm.eval_features[0]["input_ids"])
    rng = np.random.default_rng(2)
    starts, ends = rng.normal(size=(n, seq_len)), rng.normal(size=(n, seq_len))
    expected = postprocess_qa_predictions(dm.eval_examples, dm.eval_features, starts, ends, version_2=True)
    order = rng.permutation(n)
    got = dm.postprocess(torch.tensor(order), torch.tensor(starts[order]), torch.tensor(ends[order]))
    assert got == expected
    # Examples with an unscored window are left out; the metric covers the rest.
    missing = dm.eval_features["example_id"][-1]
    got = dm.postprocess(order[order != n - 1], starts[order[order != n - 1]], ends[order[order != n - 1]])
    assert missing not in got and got == {k: v for k, v in expected.items() if k != missing}
    metrics = dm.compute_metrics(np.arange(n), starts, ends)
    assert metrics["total"] == len(dm.eval_examples) and metrics["HasAns_total"] == len(dm.eval_examples)


# --------------------------------------------------------------------------------------------------
# Real dev files
# --------------------------------------------------------------------------------------------------


def test_real_dev_counts(real_data):
    v1 = read_squad_json(real_data / "squad/v1.1/dev-v1.1.json", allow_unanswerable=False)
    assert len(v1) == 10570
    assert len(set(v1["title"])) == 48
    assert len(set(v1["context"])) == 2067
    assert sum(len(a["text"]) for a in v1["answers"]) == 34726
    assert v1.column_names == ["id", "title", "context", "question", "answers"]

    dm = SquadDataModule(version="v2", validation_file=str(real_data / "squad/v2.0/dev-v2.0.first5articles.json"))
    v2 = dm.load_examples("validation")
    assert len(v2) == 1407
    assert sum(not a["text"] for a in v2["answers"]) == 702
    assert len(set(v2["title"])) == 5


def test_hub_is_the_default_source(monkeypatch, tmp_path):
    import datasets

    calls = []
    fake = datasets.Dataset.from_dict(
        {
            "id": ["h"],
            "title": ["t"],
            "context": ["the cat sat"],
            "question": ["who sat"],
            "answers": [{"text": ["the cat"], "answer_start": [0]}],
        }
    )

    def fake_load_dataset(name, split=None, cache_dir=None):
        calls.append((name, split, cache_dir))
        return fake

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dm = SquadDataModule(version="v2", cache_dir=str(tmp_path))
    dm.prepare_data()
    assert dm.load_examples("validation")["id"] == ["h"]
    assert calls == [("rajpurkar/squad_v2", None, str(tmp_path)), ("rajpurkar/squad_v2", "validation", str(tmp_path))]
    assert SquadDataModule(version="1.1").load_examples("train") is fake
    assert calls[-1] == ("rajpurkar/squad", "train", None)


class _TinyQA:
    """A tiny random BERT for extractive QA, wrapped as a LightningModule that scores SQuAD."""

    @staticmethod
    def build(vocab_size: int, datamodule: SquadDataModule):
        import lightning as L
        from transformers import BertForQuestionAnswering

        class Module(L.LightningModule):
            def __init__(self):
                super().__init__()
                config = tiny_bert_config(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=32, max_position_embeddings=512)
                self.model = BertForQuestionAnswering(config)
                self.outputs = []
                self.metrics = None

            def training_step(self, batch, batch_idx):
                return self.model(**batch).loss

            def validation_step(self, batch, batch_idx):
                index = batch.pop("feature_index")
                out = self.model(**batch)
                self.outputs.append((index, out.start_logits, out.end_logits))

            def on_validation_epoch_end(self):
                index, starts, ends = (torch.cat(t) for t in zip(*self.outputs, strict=True))
                self.outputs.clear()
                self.metrics = datamodule.compute_metrics(index, starts, ends)

            def configure_optimizers(self):
                return torch.optim.AdamW(self.parameters(), lr=1e-3)

        return Module()


def test_real_same_file_for_fit(real_data, tiny_tokenizer, tok_dir):
    import lightning as L

    path = str(real_data / "squad/v2.0/dev-v2.0.first5articles.json")
    dm = SquadDataModule(
        version="v2",
        tokenizer=tok_dir,
        train_file=path,
        validation_file=path,
        max_seq_length=256,
        doc_stride=64,
        batch_size=4,
        eval_batch_size=8,
        max_train_samples=6,
        max_eval_samples=5,
    )
    model = _TinyQA.build(len(tiny_tokenizer), dm)
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    assert len(dm.train_examples) == 6 and len(dm.eval_examples) == 5
    assert dm.eval_examples["id"] == dm.load_examples("validation")["id"][:5]
    assert len(dm.eval_features) > 5  # long contexts need several 256-token windows
    assert model.metrics["total"] == 5
    assert model.metrics["HasAns_total"] + model.metrics["NoAns_total"] == 5
    assert 0.0 <= model.metrics["f1"] <= 100.0


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


def test_argument_errors():
    with pytest.raises(ValueError, match=r"'v3'.*v1"):
        SquadDataModule(version="v3")
    with pytest.raises(ValueError, match="doc_stride"):
        SquadDataModule(max_seq_length=64, doc_stride=64)
    with pytest.raises(ValueError, match="batch_size"):
        SquadDataModule(batch_size=0)
    assert SquadDataModule(version="1.1").version == "v1"
    assert SquadDataModule(version="V2.0").version == "v2"


def test_file_errors(tmp_path, tok_dir):
    missing = tmp_path / "nope.json"
    dm = SquadDataModule(tokenizer=tok_dir, validation_file=str(missing))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        dm.setup("validate")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        dm.prepare_data()

    context = "the cat sat on the mat"
    bad = write_squad(
        tmp_path / "bad.json",
        [
            {
                "title": "t",
                "paragraphs": [
                    {
                        "context": context,
                        "qas": [
                            {"id": "q-bad", "question": "where", "answers": [{"text": "the mat", "answer_start": 3}]}
                        ],
                    }
                ],
            }
        ],
    )
    with pytest.raises(ValueError) as info:
        read_squad_json(bad)
    message = str(info.value)
    assert "bad.json" in message and "q-bad" in message and "'the mat'" in message and "' cat sa'" in message


def one_article(question: str = "where is the cat", qid: str = "q1") -> list[dict]:
    context = "the cat sat on the mat"
    return [{"title": "t", "paragraphs": [{"context": context, "qas": [qa(qid, question, context, "the mat")]}]}]


def test_truncated_json_names_file_line_and_column(tmp_path):
    text = json.dumps({"version": "1.1", "data": one_article()}, indent=1)
    path = tmp_path / "cut.json"
    path.write_text(text[: len(text) // 2], encoding="utf-8")  # an interrupted download
    with pytest.raises(ValueError, match=r"cut\.json, line \d+, column \d+: not valid JSON") as info:
        read_squad_json(path)
    error = info.value
    assert not isinstance(error, json.JSONDecodeError)
    try:
        json.loads(path.read_text())
    except json.JSONDecodeError as expected:
        assert f"line {expected.lineno}, column {expected.colno}" in str(error)


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin.json"
    text = json.dumps({"version": "1.1", "data": one_article("where is the caf\u00e9")}, ensure_ascii=False, indent=1)
    path.write_bytes(text.encode("latin-1"))
    line = text[: text.index("\u00e9")].count("\n") + 1
    with pytest.raises(ValueError, match=rf"latin\.json, line {line}: bytes b'\\xe9' are not valid UTF-8"):
        read_squad_json(path)


SQUAD_LAYOUT = ("SQuAD JSON is {data: [{title, paragraphs: [{context, qas: [{id, question, answers: [{text, "
                "answer_start}]}]}]}]}")


@pytest.mark.parametrize(("where", "key"), [
    ("data[1]", "paragraphs"),
    ("data[1].paragraphs[0]", "context"),
    ("data[1].paragraphs[0].qas[0]", "question"),
    ("data[1].paragraphs[0].qas[0]", "id"),
    ("data[1].paragraphs[0].qas[0].answers[0]", "answer_start"),
])
def test_missing_key_names_file_place_and_key(tmp_path, where, key):
    articles = one_article() + one_article(qid="q2")
    node = articles[1]
    for part in where.removeprefix("data[1]").split(".")[1:]:
        name, index = part.rstrip("]").split("[")
        node = node[name][int(index)]
    del node[key]
    path = write_squad(tmp_path / "keys.json", articles)
    with pytest.raises(ConfigError) as info:
        read_squad_json(path)
    assert str(info.value) == f"{path}: {where} has no key {key!r}; {SQUAD_LAYOUT}"


def test_wrong_type_names_file_and_place(tmp_path):
    articles = one_article()
    articles[0]["paragraphs"][0]["qas"] = {"id": "q1"}  # an object where a list belongs
    path = write_squad(tmp_path / "types.json", articles)
    with pytest.raises(ConfigError) as info:
        read_squad_json(path)
    assert str(info.value) == f"{path}: data[0].paragraphs[0].qas is a dict, expected a list; {SQUAD_LAYOUT}"


def test_file_without_questions_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"empty\.json has no examples"):
        read_squad_json(write_squad(tmp_path / "empty.json", []))


def test_question_too_long_for_the_window_is_refused(tmp_path, tiny_tokenizer, tok_dir):
    """max_seq_length must hold [CLS] question [SEP] and more than doc_stride context tokens [SEP]."""
    question = "what is the capital city of france"  # 7 tokens
    assert len(tiny_tokenizer(question, add_special_tokens=False)["input_ids"]) == 7
    path = write_squad(tmp_path / "q.json", one_article(question, qid="long-q"))
    # 3 special + 7 question + 8 stride = 18 tokens: a window of 18 leaves exactly doc_stride context tokens
    dm = SquadDataModule(tokenizer=tok_dir, validation_file=str(path), max_seq_length=18, doc_stride=8)
    with pytest.raises(ValueError) as info:
        dm.setup("validate")
    message = str(info.value)
    assert "SQuAD validation: 1 of 1 questions do not fit max_seq_length=18 with doc_stride=8" in message
    assert "'long-q' has 7 tokens" in message and "--data.max_seq_length to at least 19" in message
    dm = SquadDataModule(tokenizer=tok_dir, validation_file=str(path), max_seq_length=19, doc_stride=8)
    dm.setup("validate")  # one more token fits
    assert len(dm.eval_features) >= 1


def test_missing_tokenizer_folder_is_named(tmp_path):
    path = write_squad(tmp_path / "q.json", one_article())
    dm = SquadDataModule(tokenizer=str(tmp_path / "no_tokenizer"), validation_file=str(path))
    with pytest.raises(LoadError, match=r"tokenizer '.*no_tokenizer': folder not found"):
        dm.setup("validate")
