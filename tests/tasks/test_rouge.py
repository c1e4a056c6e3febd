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


def test_rouge_lsum_is_the_union_lcs_over_newline_separated_sentences(monkeypatch):
    """ROUGE-Lsum as Lin (2004, §3.2) defines it and Google's rouge_score computes it: texts split into sentences at
    their newlines; each reference sentence's hits are the union of its LCS with every prediction sentence, each
    token counted at most as often as it occurs on both sides; F of hits / prediction and hits / reference tokens.
    Every value below is counted by hand, and each case tells the definition from a near miss."""
    nltk = pytest.importorskip("nltk")

    def no_punkt(*args, **kwargs):
        raise AssertionError("punkt must not be used (it is a download; this must work offline)")

    monkeypatch.setattr(nltk, "sent_tokenize", no_punkt)

    def scores(prediction, reference, **kwargs):
        return rouge_scores([prediction], [reference], use_stemmer=False, lsum=True, **kwargs)

    def f1(hits, pred_len, ref_len):
        precision, recall = hits / pred_len, hits / ref_len
        return 2 * precision * recall / (precision + recall)

    # Lin's example: reference sentence "w1 w2 w3 w4 w5"; LCS with "w1 w2 w6 w7 w8" is w1 w2, with
    # "w1 w3 w8 w9 w5" it is w1 w3 w5; their union w1 w2 w3 w5 is 4 hits of 10 predicted and 5 reference tokens
    # (the best single LCS would give 3).
    got = scores("w1 w2 w6 w7 w8\nw1 w3 w8 w9 w5", "w1 w2 w3 w4 w5")
    assert got["rougeLsum"] == pytest.approx(f1(4, 10, 5)) and f1(4, 10, 5) != pytest.approx(f1(3, 10, 5))

    # The same two sentences in swapped order: each reference sentence is found whole (6 hits of 6, Lsum = 1),
    # while the LCS of the flat texts "the dog ran the cat sat" and "the cat sat the dog ran" is 3 of 6 (L = 0.5).
    got = scores("the dog ran\nthe cat sat", "the cat sat\nthe dog ran")
    assert got["rougeLsum"] == pytest.approx(1.0) and got["rougeL"] == pytest.approx(0.5)
    assert got["rouge1"] == pytest.approx(1.0)
    # The split is what makes the difference: with each text kept whole, Lsum is the flat L.
    assert scores("the dog ran\nthe cat sat", "the cat sat\nthe dog ran",
                  sentence_splitter=lambda text: [text])["rougeLsum"] == pytest.approx(0.5)

    # Clipping: the reference repeats "the cat" on two lines, the prediction says it once. Both reference sentences
    # find it, but the prediction's two tokens can be hit only once each: 2 hits, P = 2/2, R = 2/4.
    assert scores("the cat", "the cat\nthe cat")["rougeLsum"] == pytest.approx(f1(2, 2, 4))

    # Sentences are the lines where there are lines (Google's rule for rougeLsum): "sat." before "The" would end a
    # sentence of a one-line text, but not in a text that has newlines.
    assert split_sentences("The cat sat. The dog ran") == ["The cat sat.", "The dog ran"]
    assert split_sentences("The cat sat. The dog ran\nA bird sang") == ["The cat sat. The dog ran", "A bird sang"]


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
