"""ROUGE F-measures over lists of strings, a thin wrapper over torchmetrics that works offline.

Scores are computed by :func:`torchmetrics.functional.text.rouge.rouge_score`: text is lower-cased,
every run of non-alphanumeric characters becomes a space, and (with ``use_stemmer``) words longer
than three characters go through nltk's Porter stemmer, as in Google's ``rouge_score`` package.
The Porter stemmer is pure Python code and needs no nltk data download; it does need the ``nltk``
package to be installed.

ROUGE-Lsum (summary-level LCS) needs the text split into sentences. torchmetrics does that with
``nltk.sent_tokenize``, which needs the ``punkt_tab`` model; that model is downloaded at first use
and cannot be fetched on an offline machine. This module therefore does its own splitting
(:func:`split_sentences`) and hands torchmetrics text whose sentences are already separated by
``"\\n"``, with torchmetrics' splitter swapped for a plain ``"\\n"`` split for the duration of the
call. The rule is the one Google's ``rouge_score`` uses for ``rougeLsum`` (sentences are the
lines of the text), plus a rule-based splitter for text that has no newlines, such as generated
predictions:

* a text that contains a newline is split at its newlines only (CNN/DailyMail highlights and XSum
  documents are already newline-separated);
* a text without newlines is split after ``.``, ``!`` or ``?`` (optionally followed by closing
  quotes or brackets) when the next word starts with an upper-case letter, a digit or an opening
  quote, unless the word before the break is a known abbreviation (``Mr.``, ``Dr.``, ``U.S.``,
  single initials, ...).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence

__all__ = ["rouge_scores", "split_sentences"]

_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st sr jr mt ft gen col lt sgt capt rev gov sen rep vs etc inc ltd co corp "
    "no nos jan feb mar apr jun jul aug sep sept oct nov dec approx dept est fig eg ie".split()
)
# ``U.S.``, ``e.g.``, ``J.`` -- letters each followed by a period.
_INITIALS = re.compile(r"^(?:[A-Za-z]\.)+$")
_SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*$")
_SENTENCE_START = re.compile(r"^[\"'\u201c\u2018(\[]*[A-Z0-9]")

# torchmetrics looks its sentence splitter up as a module global at call time; swapping it is not
# thread safe, so calls that swap it are serialised.
_SPLITTER_LOCK = threading.Lock()


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


def _newline_joined(text: str, splitter: Callable[[str], Sequence[str]]) -> str:
    return "\n".join(sentence.replace("\n", " ") for sentence in splitter(text))


def _split_on_newlines(text: str) -> list[str]:
    return text.split("\n")


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

    keys = (*keys, "rougeLsum")
    splitter = sentence_splitter or split_sentences
    # Sentences are joined by "\n"; newlines only ever act as separators, never as word content
    # (the normaliser turns them into spaces), so rouge1/2/L are unchanged by the re-joining.
    preds = [_newline_joined(t, splitter) for t in predictions]
    refs = [_newline_joined(t, splitter) for t in references]
    if not hasattr(tm_rouge, "_split_sentence"):  # pragma: no cover - depends on torchmetrics internals
        raise RuntimeError(
            "this torchmetrics version has no torchmetrics.functional.text.rouge._split_sentence; "
            "adalora_pl.tasks.rouge cannot compute rougeLsum offline with it"
        )
    with _SPLITTER_LOCK:
        original = tm_rouge._split_sentence
        tm_rouge._split_sentence = _split_on_newlines
        try:
            raw = tm_rouge.rouge_score(preds, refs, use_stemmer=use_stemmer, rouge_keys=keys)
        finally:
            tm_rouge._split_sentence = original
    return {key: float(raw[f"{key}_fmeasure"]) for key in keys}
