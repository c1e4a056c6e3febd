"""ROUGE F-measures over lists of strings, a thin wrapper over torchmetrics that works offline.

Scores are computed by :func:`torchmetrics.functional.text.rouge.rouge_score`: text is lower-cased,
every run of non-alphanumeric characters becomes a space, and (with ``use_stemmer``) words longer
than three characters go through nltk's Porter stemmer, as in Google's ``rouge_score`` package.
The Porter stemmer is pure Python code and needs no nltk data download; it does need the ``nltk``
package to be installed.

ROUGE-Lsum (summary-level LCS) needs the text split into sentences. torchmetrics does that with
``nltk.sent_tokenize``, which needs the ``punkt_tab`` model; that model is downloaded at first use
and cannot be fetched on an offline machine, and torchmetrics has no public way to pass another
splitter. This module therefore computes ROUGE-Lsum itself (:func:`rouge_lsum_f1`, the union-LCS
of Lin 2004 §3.2 as Google's ``rouge_score`` and torchmetrics compute it, on the same tokens) over
its own sentences (:func:`split_sentences`). The rule is the one Google's ``rouge_score`` uses for
``rougeLsum`` (sentences are the lines of the text), plus a rule-based splitter for text that has
no newlines, such as generated predictions:

* a text that contains a newline is split at its newlines only (CNN/DailyMail highlights and XSum
  documents are already newline-separated);
* a text without newlines is split after ``.``, ``!`` or ``?`` (optionally followed by closing
  quotes or brackets) when the next word starts with an upper-case letter, a digit or an opening
  quote, unless the word before the break is a known abbreviation (``Mr.``, ``Dr.``, ``U.S.``,
  single initials, ...).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["rouge_lsum_f1", "rouge_scores", "split_sentences", "tokenize"]

_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st sr jr mt ft gen col lt sgt capt rev gov sen rep vs etc inc ltd co corp "
    "no nos jan feb mar apr jun jul aug sep sept oct nov dec approx dept est fig eg ie".split()
)
# ``U.S.``, ``e.g.``, ``J.`` -- letters each followed by a period.
_INITIALS = re.compile(r"^(?:[A-Za-z]\.)+$")
_SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*$")
_SENTENCE_START = re.compile(r"^[\"'\u201c\u2018(\[]*[A-Z0-9]")



def _is_abbreviation(word: str) -> bool:
    stripped = word.lstrip("\"'\u201c\u2018([")
    if _INITIALS.match(stripped):
        return True
    return stripped.endswith(".") and stripped[:-1].lower() in _ABBREVIATIONS


def _split_line(line: str) -> list[str]:
    words = line.split()
    sentences: list[str] = []
    current: list[str] = []
    for i, word in enumerate(words):
        current.append(word)
        next_word = words[i + 1] if i + 1 < len(words) else None
        if (
            next_word is not None
            and _SENTENCE_END.search(word)
            and _SENTENCE_START.match(next_word)
            and not _is_abbreviation(word)
        ):
            sentences.append(" ".join(current))
            current = []
    if current:
        sentences.append(" ".join(current))
    return sentences


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences without any downloaded model.

    A text containing ``"\\n"`` is split at its newlines (blank lines dropped); otherwise the
    rule-based splitter described in the module docstring is used.

    Args:
        text: The text to split.

    Returns:
        The non-empty sentences, stripped of surrounding white space.
    """
    if "\n" in text:
        return [line.strip() for line in text.split("\n") if line.strip()]
    return _split_line(text.strip()) if text.strip() else []


def tokenize(text: str, stemmer: Any = None) -> list[str]:
    """ROUGE's tokens: lower-cased runs of letters and digits, words of more than three characters stemmed
    (the normalization of Google's ``rouge_score`` and torchmetrics)."""
    tokens = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    return [stemmer.stem(t) if stemmer is not None and len(t) > 3 else t for t in tokens]


def _lcs_indices(reference: Sequence[str], candidate: Sequence[str]) -> list[int]:
    """Indices into ``reference`` of one longest common subsequence with ``candidate``, backtracked with the
    reference implementation's tie rule (so the union below matches it token for token)."""
    rows, cols = len(reference), len(candidate)
    table = [[0] * (cols + 1) for _ in range(rows + 1)]
    for i in range(1, rows + 1):
        for j in range(1, cols + 1):
            if reference[i - 1] == candidate[j - 1]:
                table[i][j] = table[i - 1][j - 1] + 1
            else:
                table[i][j] = max(table[i - 1][j], table[i][j - 1])
    i, j, found = rows, cols, []
    while i > 0 and j > 0:
        if reference[i - 1] == candidate[j - 1]:
            found.append(i - 1)
            i, j = i - 1, j - 1
        elif table[i][j - 1] > table[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return found[::-1]


def rouge_lsum_f1(prediction: Sequence[Sequence[str]], reference: Sequence[Sequence[str]]) -> float:
    """Summary-level ROUGE-L F-measure of one tokenized prediction against one tokenized reference, each a list
    of sentences (lists of tokens): every reference sentence's union-LCS with all prediction sentences, its
    tokens counted at most as often as they occur on both sides."""
    pred_len, ref_len = sum(map(len, prediction)), sum(map(len, reference))
    if pred_len == 0 or ref_len == 0:
        return 0.0
    pred_counts = Counter(t for sentence in prediction for t in sentence)
    ref_counts = Counter(t for sentence in reference for t in sentence)
    hits = 0
    for sentence in reference:
        union = sorted(set().union(*(_lcs_indices(sentence, p) for p in prediction)))
        for token in (sentence[i] for i in union):
            if pred_counts[token] > 0 and ref_counts[token] > 0:
                hits += 1
                pred_counts[token] -= 1
                ref_counts[token] -= 1
    precision, recall = hits / pred_len, hits / ref_len
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def rouge_scores(
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    use_stemmer: bool = True,
    lsum: bool = False,
    sentence_splitter: Callable[[str], Sequence[str]] | None = None,
) -> dict[str, float]:
    """Corpus ROUGE F-measures: the mean over examples of each example's F1 (as torchmetrics does).

    Args:
        predictions: Generated summaries, one per example.
        references: Reference summaries, aligned with ``predictions`` (one reference each).
        use_stemmer: Porter-stem words longer than three characters before matching (needs ``nltk``).
        lsum: Also return ``rougeLsum``; sentences are found with ``sentence_splitter``.
        sentence_splitter: Splits a text into sentences for ``rougeLsum``; defaults to
            :func:`split_sentences`. Applied to predictions and references alike.

    Returns:
        ``{"rouge1", "rouge2", "rougeL"}`` (plus ``"rougeLsum"`` when ``lsum``) mapped to F-measures
        in ``[0, 1]``. An empty prediction or reference scores 0 for that example.

    Raises:
        ValueError: If the two lists differ in length or are empty.
        ModuleNotFoundError: If ``use_stemmer`` is set and ``nltk`` is not installed.
    """
    from torchmetrics.functional.text import rouge as tm_rouge

    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"rouge_scores got {len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("rouge_scores got no predictions to score")
    for name, texts in (("predictions", predictions), ("references", references)):
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"{name}[{bad}] is {type(texts[bad]).__name__}, expected str")

    keys = ("rouge1", "rouge2", "rougeL")
    if not lsum:
        raw = tm_rouge.rouge_score(predictions, references, use_stemmer=use_stemmer, rouge_keys=keys)
        return {key: float(raw[f"{key}_fmeasure"]) for key in keys}

    raw = tm_rouge.rouge_score(predictions, references, use_stemmer=use_stemmer, rouge_keys=keys)
    scores = {key: float(raw[f"{key}_fmeasure"]) for key in keys}
    splitter = sentence_splitter or split_sentences
    stemmer = None
    if use_stemmer:
        from nltk.stem.porter import PorterStemmer  # the stemmer torchmetrics uses for rouge1/2/L

        stemmer = PorterStemmer()

    def sentences(text: str) -> list[list[str]]:
        return [tokenize(s, stemmer) for s in splitter(text)]

    lsum = [rouge_lsum_f1(sentences(p), sentences(r)) for p, r in zip(predictions, references, strict=True)]
    scores["rougeLsum"] = sum(lsum) / len(lsum)
    return scores
