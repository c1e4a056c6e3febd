"""SQuAD answer post-processing and the official SQuAD metric (EM/F1, v1.1 and v2.0)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from adalora_pl.tasks.squad import exact_match, f1, normalize_answer, postprocess_qa_predictions, squad_metrics
from datamodules.squad import SquadDataModule, read_squad_json

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


# --------------------------------------------------------------------------------------------------
# Post-processing
# --------------------------------------------------------------------------------------------------


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
