"""SQuAD data module, answer post-processing and the official SQuAD metric."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from adalora_pl.io.pretrained import LoadError
from adalora_pl.tasks.squad import exact_match, f1, normalize_answer, postprocess_qa_predictions, squad_metrics
from datamodules.squad import SquadDataModule, read_squad_json


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


def long_context(tokenizer) -> tuple[str, int]:
    """About 70 words (some split into several word pieces); the answer "paris france" follows word 25."""
    filler = [w for w in vocab_words(tokenizer) if w not in {"paris", "france"}]
    assert len(filler) > 40
    words = filler[:25] + ["paris", "france"] + filler[25:] + ["parisian", "cats,", "dogs."] + filler[:10]
    context = " ".join(words)
    return context, context.index("paris france")


@pytest.fixture
def tokenizer_dir(tiny_tokenizer, tmp_path) -> str:
    return str(tmp_path / "tokenizer")  # where the tiny_tokenizer fixture saved itself


# --------------------------------------------------------------------------------------------------
# Windows, offsets and labels
# --------------------------------------------------------------------------------------------------


def test_windows_offsets_and_labels(tmp_path, tiny_tokenizer, tokenizer_dir):
    context, answer_start = long_context(tiny_tokenizer)
    answer = "paris france"
    question = "where is paris"
    path = write_squad(
        tmp_path / "long.json",
        [{"title": "t", "paragraphs": [{"context": context, "qas": [qa("q1", question, context, answer)]}]}],
    )
    max_len, stride = 32, 8
    dm = SquadDataModule(
        tokenizer=tokenizer_dir,
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


def test_v2_unanswerable_and_multiple_answers(tmp_path, tiny_tokenizer, tokenizer_dir):
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
        tokenizer=tokenizer_dir,
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
        SquadDataModule(version="v1", tokenizer=tokenizer_dir, validation_file=str(path)).setup("validate")


# --------------------------------------------------------------------------------------------------
# The official metric
# --------------------------------------------------------------------------------------------------


def test_normalization_and_token_f1():
    assert normalize_answer("  The Quick,  brown FOX! ") == "quick brown fox"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre another") == "theatre another"  # articles only as whole words
    assert normalize_answer("U.S.-based") == "usbased"  # punctuation removed before splitting
    assert exact_match("the Eiffel Tower.", "Eiffel tower") == 1.0
    assert exact_match("Eiffel", "Eiffel tower") == 0.0
    # [big, red, dog] vs [red, dog, barked]: 2 common, P = R = 2/3.
    assert f1("big red dog", "the red dog barked") == pytest.approx(2 / 3)
    # [cat, cat] vs [cat]: 1 common, P = 1/2, R = 1 -> 2/3.
    assert f1("a cat cat", "cat") == pytest.approx(2 / 3)
    # [denver, broncos] vs [broncos]: P = 1/2, R = 1 -> 2/3; nothing in common -> 0.
    assert f1("Denver Broncos", "the Broncos") == pytest.approx(2 / 3)
    assert f1("Carolina", "Broncos") == 0.0
    # Empty answers: the v2 rule scores agreement, the v1.1 script has no such rule.
    assert f1("", "", version_2=True) == 1.0
    assert f1("The", "", version_2=True) == 1.0  # "the" normalizes to nothing
    assert f1("", "Broncos", version_2=True) == 0.0
    assert f1("Broncos", "", version_2=True) == 0.0
    assert f1("", "", version_2=False) == 0.0


def test_squad_metrics_v1_by_hand():
    references = {
        "q1": ["Denver Broncos", "the Denver Broncos"],
        "q2": ["Santa Clara, California", "Levi's Stadium"],
        "q3": ["gold"],
    }
    predictions = {"q1": "denver broncos.", "q2": "Santa Clara", "q3": "silver", "extra": "ignored"}
    # q1: exact after normalization. q2: [santa, clara] vs [santa, clara, california]: P=1, R=2/3,
    # F1 = 0.8 (the other gold gives 0). q3: 0.
    result = squad_metrics(predictions, references, version_2=False)
    assert result["exact"] == pytest.approx(100 / 3)
    assert result["f1"] == pytest.approx(100 * (1 + 0.8 + 0) / 3)
    assert result["total"] == 3
    # A question without a prediction scores 0.
    result = squad_metrics({"q1": "Denver Broncos"}, references, version_2=False)
    assert result["exact"] == pytest.approx(100 / 3) and result["f1"] == pytest.approx(100 / 3)


def test_squad_metrics_v2_by_hand():
    references = {"h1": ["Normandy"], "h2": ["10th and 11th centuries"], "n1": [], "n2": []}
    predictions = {"h1": "Normandy", "h2": "11th centuries", "n1": "", "n2": "France"}
    # h1: 1/1. h2: [11th, centuries] vs [10th, and, 11th, centuries]: P=1, R=1/2, F1=2/3, EM 0.
    # n1: both empty -> 1/1. n2: 0/0.
    result = squad_metrics(predictions, references, version_2=True)
    assert result["HasAns_total"] == 2 and result["NoAns_total"] == 2 and result["total"] == 4
    assert result["HasAns_exact"] == pytest.approx(50.0)
    assert result["HasAns_f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert result["NoAns_exact"] == pytest.approx(50.0)
    assert result["NoAns_f1"] == pytest.approx(50.0)
    assert result["exact"] == pytest.approx(50.0)
    assert result["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1 + 0) / 4)
    # A gold answer that normalizes to nothing counts as "no answer" in the v2 script's scoring.
    assert squad_metrics({"x": ""}, {"x": ["The"]}, version_2=True)["exact"] == 100.0
    # No NoAns questions: the official script leaves the group out.
    result = squad_metrics({"h1": "Normandy"}, {"h1": ["Normandy"]}, version_2=True)
    assert result["NoAns_total"] == 0 and "NoAns_exact" not in result


def test_v1_metric_matches_torchmetrics():
    from torchmetrics.text import SQuAD

    rng = random.Random(0)
    sentence = (
        "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, "
        "a region in France. They were descended from Norse raiders and pirates!"
    ).split()
    predictions, references = {}, {}
    for i in range(60):
        golds = []
        for _ in range(rng.randint(1, 3)):
            a = rng.randrange(len(sentence))
            golds.append(" ".join(sentence[a : a + rng.randint(1, 5)]))
        a = rng.randrange(len(sentence))
        pred = " ".join(sentence[a : a + rng.randint(1, 6)])
        if i % 5 == 0:
            pred = golds[0].upper() + "."  # normalizes to a gold answer
        references[f"q{i}"], predictions[f"q{i}"] = golds, pred
    ours = squad_metrics(predictions, references, version_2=False)
    assert 0 < ours["exact"] < 100 and 0 < ours["f1"] < 100

    metric = SQuAD()
    metric.update(
        [{"id": k, "prediction_text": v} for k, v in predictions.items()],
        [{"id": k, "answers": {"text": v, "answer_start": [0] * len(v)}} for k, v in references.items()],
    )
    theirs = metric.compute()
    assert ours["exact"] == pytest.approx(theirs["exact_match"].item(), abs=1e-4)
    assert ours["f1"] == pytest.approx(theirs["f1"].item(), abs=1e-4)


# --------------------------------------------------------------------------------------------------
# Post-processing
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def eval_module(tmp_path, tiny_tokenizer, tokenizer_dir) -> SquadDataModule:
    """Several examples of different lengths (one window up to several), tokenized for evaluation."""
    rng = random.Random(1)
    words = vocab_words(tiny_tokenizer)
    paragraphs = []
    for i in range(5):
        words = [rng.choice(words) for _ in range(10 + 25 * i)] + ["paris", "france", "news."]
        context = " ".join(words)
        paragraphs.append({"context": context, "qas": [qa(f"e{i}", "what is the city", context, "paris")]})
    path = write_squad(tmp_path / "several.json", [{"title": "t", "paragraphs": paragraphs}])
    dm = SquadDataModule(
        version="v2", tokenizer=tokenizer_dir, validation_file=str(path), max_seq_length=32, doc_stride=8
    )
    dm.setup("validate")
    return dm


def brute_force_best(dm: SquadDataModule, starts, ends, max_answer_length: int) -> dict[str, str]:
    """The best-scoring valid span of every example, by trying every (start, end) pair."""
    best: dict[str, tuple[float, str]] = {}
    contexts = dict(zip(dm.eval_examples["id"], dm.eval_examples["context"], strict=True))
    for row, feature in enumerate(dm.eval_features):
        offsets, eid = feature["offset_mapping"], feature["example_id"]
        for s in range(len(offsets)):
            for e in range(s, min(len(offsets), s + max_answer_length)):
                if offsets[s] == [-1, -1] or offsets[e] == [-1, -1]:
                    continue
                score = starts[row, s] + ends[row, e]
                if eid not in best or score > best[eid][0]:
                    best[eid] = (score, contexts[eid][offsets[s][0] : offsets[e][1]])
    return {eid: text for eid, (_, text) in best.items()}


def test_postprocess_spans_stay_inside_context(eval_module):
    dm = eval_module
    features = dm.eval_features
    contexts = dict(zip(dm.eval_examples["id"], dm.eval_examples["context"], strict=True))
    assert len(features) > len(contexts)  # some examples have several windows
    rng = np.random.default_rng(0)
    seq_len = len(features[0]["input_ids"])
    max_answer_length = 4
    for _ in range(10):
        starts = rng.normal(size=(len(features), seq_len))
        ends = rng.normal(size=(len(features), seq_len))
        predictions = postprocess_qa_predictions(
            dm.eval_examples, features, starts, ends, n_best_size=5, max_answer_length=max_answer_length
        )
        assert set(predictions) == set(contexts)
        for eid, text in predictions.items():
            if not text:
                continue
            assert text in contexts[eid]
            # The text is exactly some window's context tokens s..e with at most max_answer_length tokens.
            spans = [
                (s, e)
                for f in features
                if f["example_id"] == eid
                for s, (cs, _) in enumerate(f["offset_mapping"])
                for e, (_, ce) in enumerate(f["offset_mapping"])
                if cs >= 0 and ce >= 0 and s <= e and contexts[eid][cs:ce] == text
            ]
            assert spans and min(e - s + 1 for s, e in spans) <= max_answer_length
        # Considering every index, the result is the best valid span found by brute force.
        full = postprocess_qa_predictions(
            dm.eval_examples, features, starts, ends, n_best_size=seq_len, max_answer_length=max_answer_length
        )
        assert full == brute_force_best(dm, starts, ends, max_answer_length)

    # None offsets (instead of [-1, -1]) and plain row dicts give the same answers.
    rows = [
        {"example_id": f["example_id"], "offset_mapping": [None if p == [-1, -1] else p for p in f["offset_mapping"]]}
        for f in features
    ]
    examples = [{"id": e["id"], "context": e["context"]} for e in dm.eval_examples]
    assert postprocess_qa_predictions(examples, rows, torch.tensor(starts), torch.tensor(ends)) == (
        postprocess_qa_predictions(dm.eval_examples, features, starts, ends)
    )


def test_postprocess_v2_null_answer(eval_module):
    dm = eval_module
    features = dm.eval_features
    rng = np.random.default_rng(1)
    seq_len = len(features[0]["input_ids"])
    starts = rng.uniform(0, 1, size=(len(features), seq_len))
    ends = rng.uniform(0, 1, size=(len(features), seq_len))
    starts[:, 0] = ends[:, 0] = 5.0  # the null score (10) beats every span (< 2)
    kwargs = {"version_2": True}
    answers = postprocess_qa_predictions(dm.eval_examples, features, starts, ends, **kwargs)
    assert set(answers.values()) == {""}
    # A threshold above the margin keeps the spans; v1 mode ignores the null score.
    kept = postprocess_qa_predictions(
        dm.eval_examples, features, starts, ends, version_2=True, null_score_diff_threshold=20.0
    )
    assert all(kept.values())
    assert postprocess_qa_predictions(dm.eval_examples, features, starts, ends) == kept
    # The null score is the minimum over an example's windows: one low CLS window lets the span win.
    multi = next(eid for eid in dm.eval_examples["id"] if features["example_id"].count(eid) > 1)
    row = features["example_id"].index(multi)
    starts[row, 0] = ends[row, 0] = -5.0
    answers = postprocess_qa_predictions(dm.eval_examples, features, starts, ends, **kwargs)
    assert answers[multi] != "" and all(a == "" for eid, a in answers.items() if eid != multi)


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


def test_real_v1_metric_matches_torchmetrics(real_data):
    from torchmetrics.text import SQuAD

    dev = read_squad_json(real_data / "squad/v1.1/dev-v1.1.json", allow_unanswerable=False).select(range(300))
    rng = random.Random(3)
    references = {row["id"]: row["answers"]["text"] for row in dev}
    golds = list(references.values())
    predictions = {}
    for i, (qid, answers) in enumerate(references.items()):
        variant = i % 4
        if variant == 0:
            predictions[qid] = answers[-1]
        elif variant == 1:  # drop the first word: a partial match
            predictions[qid] = " ".join(answers[0].split()[1:]) or answers[0]
        elif variant == 2:  # extra words around it
            predictions[qid] = f"about {answers[0]} in total"
        else:  # another question's answer
            predictions[qid] = rng.choice(golds)[0]
    ours = squad_metrics(predictions, references, version_2=False)
    metric = SQuAD()
    metric.update(
        [{"id": k, "prediction_text": v} for k, v in predictions.items()],
        [{"id": row["id"], "answers": row["answers"]} for row in dev],
    )
    theirs = metric.compute()
    assert ours["exact"] == pytest.approx(theirs["exact_match"].item(), abs=1e-3)
    assert ours["f1"] == pytest.approx(theirs["f1"].item(), abs=1e-3)
    assert 20 < ours["exact"] < 80


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
        from transformers import BertConfig, BertForQuestionAnswering

        class Module(L.LightningModule):
            def __init__(self):
                super().__init__()
                config = BertConfig(
                    vocab_size=vocab_size,
                    hidden_size=16,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    intermediate_size=32,
                    max_position_embeddings=512,
                )
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


def test_real_same_file_for_fit(real_data, tiny_tokenizer, tokenizer_dir):
    import lightning as L

    path = str(real_data / "squad/v2.0/dev-v2.0.first5articles.json")
    dm = SquadDataModule(
        version="v2",
        tokenizer=tokenizer_dir,
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


def test_file_errors(tmp_path, tokenizer_dir):
    missing = tmp_path / "nope.json"
    dm = SquadDataModule(tokenizer=tokenizer_dir, validation_file=str(missing))
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


def test_file_without_questions_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"empty\.json has no examples"):
        read_squad_json(write_squad(tmp_path / "empty.json", []))


def test_question_too_long_for_the_window_is_refused(tmp_path, tiny_tokenizer, tokenizer_dir):
    """max_seq_length must hold [CLS] question [SEP] and more than doc_stride context tokens [SEP]."""
    question = "what is the capital city of france"  # 7 tokens
    assert len(tiny_tokenizer(question, add_special_tokens=False)["input_ids"]) == 7
    path = write_squad(tmp_path / "q.json", one_article(question, qid="long-q"))
    # 3 special + 7 question + 8 stride = 18 tokens: a window of 18 leaves exactly doc_stride context tokens
    dm = SquadDataModule(tokenizer=tokenizer_dir, validation_file=str(path), max_seq_length=18, doc_stride=8)
    with pytest.raises(ValueError) as info:
        dm.setup("validate")
    message = str(info.value)
    assert "SQuAD validation: 1 of 1 questions do not fit max_seq_length=18 with doc_stride=8" in message
    assert "'long-q' has 7 tokens" in message and "--data.max_seq_length to at least 19" in message
    dm = SquadDataModule(tokenizer=tokenizer_dir, validation_file=str(path), max_seq_length=19, doc_stride=8)
    dm.setup("validate")  # one more token fits
    assert len(dm.eval_features) >= 1


def test_missing_tokenizer_folder_is_named(tmp_path):
    path = write_squad(tmp_path / "q.json", one_article())
    dm = SquadDataModule(tokenizer=str(tmp_path / "no_tokenizer"), validation_file=str(path))
    with pytest.raises(LoadError, match=r"tokenizer '.*no_tokenizer': folder not found"):
        dm.setup("validate")
