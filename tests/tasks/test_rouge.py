"""The ROUGE wrapper: n-gram and LCS formulas by hand, stemming, ROUGE-Lsum, sentence splitting."""

from __future__ import annotations

from collections import Counter

import pytest

from adalora_pl.tasks.rouge import rouge_scores, split_sentences


def _tokens(text: str) -> list[str]:
    return "".join(c if c.isalnum() else " " for c in text.lower()).split()


def _ngram_f1(pred: str, ref: str, n: int) -> float:
    def grams(tokens):
        return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))

    p, r = grams(_tokens(pred)), grams(_tokens(ref))
    overlap = sum((p & r).values())
    if not overlap:
        return 0.0
    precision, recall = overlap / sum(p.values()), overlap / sum(r.values())
    return 2 * precision * recall / (precision + recall)


PAIRS = [
    ("the cat sat on the mat", "the cat was on the mat"),
    ("Police said: the river flooded the city!", "The city was flooded by the river, police said."),
    ("a b a b a", "a b b a"),
]


def test_rouge_n_matches_counting_formula():
    got = rouge_scores([p for p, _ in PAIRS], [r for _, r in PAIRS], use_stemmer=False)
    for n in (1, 2):
        expected = sum(_ngram_f1(p, r, n) for p, r in PAIRS) / len(PAIRS)
        assert got[f"rouge{n}"] == pytest.approx(expected, abs=1e-6)
    assert set(got) == {"rouge1", "rouge2", "rougeL"}


def test_rouge_l_hand_lcs():
    # LCS("the cat sat on the mat", "the cat was on the mat") = "the cat on the mat" = 5 of 6 words each
    assert rouge_scores([PAIRS[0][0]], [PAIRS[0][1]], use_stemmer=False)["rougeL"] == pytest.approx(5 / 6)
    # "a b a b a" vs "a b b a": LCS "a b b a" = 4; P = 4/5, R = 4/4
    assert rouge_scores([PAIRS[2][0]], [PAIRS[2][1]], use_stemmer=False)["rougeL"] == pytest.approx(
        2 * 0.8 * 1.0 / 1.8
    )
    # punctuation and case are ignored
    assert rouge_scores(["Hello, World!"], ["hello world"], use_stemmer=False)["rougeL"] == pytest.approx(1.0)


def test_rouge_stemming_changes_score():
    pytest.importorskip("nltk")
    pred, ref = "the cats were running", "the cat was running"
    plain = rouge_scores([pred], [ref], use_stemmer=False)
    stemmed = rouge_scores([pred], [ref], use_stemmer=True)
    # unstemmed unigram matches: the, running (2 of 4); stemmed: the, cat(s), run(ning) (3 of 4)
    assert plain["rouge1"] == pytest.approx(0.5) and stemmed["rouge1"] == pytest.approx(0.75)
    # bigram "the cat" only matches after stemming "cats"
    assert plain["rouge2"] == 0.0 and stemmed["rouge2"] == pytest.approx(1 / 3)


def test_rouge_lsum_offline_newline_sentences(monkeypatch):
    nltk = pytest.importorskip("nltk")
    from torchmetrics.functional.text import rouge as tm_rouge

    def no_punkt(*args, **kwargs):
        raise AssertionError("punkt must not be used")

    monkeypatch.setattr(nltk, "sent_tokenize", no_punkt)
    original = tm_rouge._split_sentence
    # same sentences, swapped order: summary-level LCS matches both (Lsum = 1), while the flat LCS
    # of "the dog ran the cat sat" vs "the cat sat the dog ran" is only 3 of 6 words (L = 0.5)
    got = rouge_scores(
        ["The dog ran. The cat sat."], ["the cat sat\nthe dog ran"], use_stemmer=False, lsum=True
    )
    assert got["rougeLsum"] == pytest.approx(1.0) and got["rougeL"] == pytest.approx(0.5)
    assert got["rouge1"] == pytest.approx(1.0)
    assert tm_rouge._split_sentence is original  # the torchmetrics splitter is restored
    # with a splitter that keeps each text whole, both sides are one sentence and Lsum equals L
    got = rouge_scores(
        ["The dog ran. The cat sat."],
        ["the cat sat\nthe dog ran"],
        use_stemmer=False,
        lsum=True,
        sentence_splitter=lambda text: [text],
    )
    assert got["rougeLsum"] == pytest.approx(0.5)


def test_split_sentences():
    assert split_sentences("first line.\n\nsecond line") == ["first line.", "second line"]
    text = 'Mr. Smith flew to the U.S. Army base. He said "Stop!" Then 3 people left. it was late.'
    assert split_sentences(text) == [
        "Mr. Smith flew to the U.S. Army base.",
        'He said "Stop!"',
        "Then 3 people left. it was late.",
    ]
    assert split_sentences("   ") == []


def test_rouge_edge_cases():
    got = rouge_scores(["", "the cat"], ["the cat", "the cat"], use_stemmer=False)
    assert got["rouge1"] == pytest.approx(0.5)  # empty prediction scores 0, the mean includes it
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge_scores(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        rouge_scores([], [])
