"""Extractive question answering: span post-processing and the official SQuAD metric.

Everything here is a pure function over Python/NumPy data, with no Lightning dependency:

* :func:`postprocess_qa_predictions` turns per-feature start/end logits (one row per tokenized
  window) into one answer string per example, the way extractive QA is decoded for SQuAD.
* :func:`normalize_answer`, :func:`exact_match`, :func:`f1` and :func:`squad_metrics` reproduce the
  official SQuAD v1.1 and v2.0 evaluation scripts (``v2`` adds the no-answer rules and the
  ``HasAns``/``NoAns`` breakdown).

Offsets convention: a feature's ``offset_mapping`` holds one ``(start_char, end_char)`` pair per
token. Tokens that are not part of the context (question, special tokens, padding) are marked
either with ``None`` or with a negative pair such as ``(-1, -1)``; both are understood here.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "postprocess_qa_predictions",
    "normalize_answer",
    "exact_match",
    "f1",
    "squad_metrics",
]

# --------------------------------------------------------------------------------------------------
# Post-processing
# --------------------------------------------------------------------------------------------------

#: Index of the classifier token whose start+end logits score "no answer" (BERT, RoBERTa, DeBERTa).
CLS_INDEX = 0


def _column(table: Any, name: str) -> list:
    """Read one column from a ``datasets.Dataset``, a dict of columns or a sequence of row dicts."""
    if hasattr(table, "column_names"):  # datasets.Dataset (or anything with the same interface)
        return list(table[name])
    if isinstance(table, Mapping):
        return list(table[name])
    return [row[name] for row in table]


def _offsets_array(offsets: Any) -> np.ndarray:
    """One feature's offsets as an ``(seq_len, 2)`` int array; non-context tokens become ``-1``."""
    if isinstance(offsets, np.ndarray) and offsets.dtype != object:
        return offsets.reshape(-1, 2).astype(np.int64, copy=False)
    if hasattr(offsets, "tolist"):  # torch tensor or object array
        offsets = offsets.tolist()
    out = np.full((len(offsets), 2), -1, dtype=np.int64)
    for i, pair in enumerate(offsets):
        if pair is None or pair[0] is None or pair[1] is None:
            continue
        out[i, 0], out[i, 1] = int(pair[0]), int(pair[1])
    return out


def _as_2d_array(logits: Any, name: str) -> np.ndarray:
    if hasattr(logits, "detach"):  # torch.Tensor
        logits = logits.detach().float().cpu().numpy()
    array = np.asarray(logits, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must have shape (num_features, seq_len), got {array.shape}")
    return array


def postprocess_qa_predictions(
    examples: Any,
    features: Any,
    start_logits: Any,
    end_logits: Any,
    *,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    version_2: bool = False,
    null_score_diff_threshold: float = 0.0,
) -> dict[str, str]:
    """Pick the best answer span of every example from the logits of its tokenized windows.

    Args:
        examples: The original examples: a ``datasets.Dataset``, a dict of columns or a sequence of
            row dicts with at least ``id`` and ``context``.
        features: The tokenized windows, aligned row for row with the logits, with ``example_id``
            (the ``id`` of the example the window came from) and ``offset_mapping`` (one
            ``(start_char, end_char)`` pair per token, ``None`` or ``(-1, -1)`` outside the context).
        start_logits: Array-like of shape ``(num_features, seq_len)`` (NumPy or torch).
        end_logits: Array-like of the same shape.
        n_best_size: How many of the highest start and of the highest end logits of each window are
            combined into candidate spans.
        max_answer_length: Longest span allowed, in tokens (``end - start + 1``).
        version_2: SQuAD v2 mode: answer ``""`` when the no-answer score beats the best span.
        null_score_diff_threshold: v2 only; ``""`` is returned when
            ``null_score - best_span_score > null_score_diff_threshold``. The null score is the
            classifier token's start+end logit, the minimum over the example's windows.

    Returns:
        ``{example_id: answer_text}`` for every example. The text is always ``context[a:b]`` for
        some character span of the example's context, or ``""`` (v2 no-answer, or no valid span).
    """
    if n_best_size < 1 or max_answer_length < 1:
        raise ValueError("n_best_size and max_answer_length must be positive")
    start_logits = _as_2d_array(start_logits, "start_logits")
    end_logits = _as_2d_array(end_logits, "end_logits")
    feature_example_ids = _column(features, "example_id")
    feature_offsets = _column(features, "offset_mapping")
    if not (len(feature_example_ids) == start_logits.shape[0] == end_logits.shape[0]):
        raise ValueError(
            f"got {len(feature_example_ids)} features but {start_logits.shape[0]} start and "
            f"{end_logits.shape[0]} end logit rows; they must be aligned row for row"
        )
    if start_logits.shape != end_logits.shape:
        raise ValueError(f"start/end logits shapes differ: {start_logits.shape} vs {end_logits.shape}")

    features_of: dict[str, list[int]] = collections.defaultdict(list)
    for index, example_id in enumerate(feature_example_ids):
        features_of[example_id].append(index)

    predictions: dict[str, str] = {}
    for example_id, context in zip(_column(examples, "id"), _column(examples, "context"), strict=True):
        best_score = -np.inf
        best_chars: tuple[int, int] | None = None
        null_score = np.inf
        for index in features_of.get(example_id, []):
            starts, ends = start_logits[index], end_logits[index]
            offsets = _offsets_array(feature_offsets[index])
            null_score = min(null_score, starts[CLS_INDEX] + ends[CLS_INDEX])
            seq_len = min(len(offsets), len(starts))
            k = min(n_best_size, seq_len)
            # Top-k indices, highest first (argsort is stable on the negated values: ties keep order).
            top_starts = np.argsort(-starts[:seq_len], kind="stable")[:k]
            top_ends = np.argsort(-ends[:seq_len], kind="stable")[:k]
            for s in top_starts:
                if offsets[s, 0] < 0:
                    continue
                for e in top_ends:
                    if e < s or e - s + 1 > max_answer_length or offsets[e, 0] < 0:
                        continue
                    score = starts[s] + ends[e]
                    if score > best_score:
                        best_score = score
                        best_chars = (int(offsets[s, 0]), int(offsets[e, 1]))
        if best_chars is None:
            predictions[example_id] = ""
            continue
        if version_2 and null_score - best_score > null_score_diff_threshold:
            predictions[example_id] = ""
            continue
        predictions[example_id] = context[best_chars[0] : best_chars[1]]
    return predictions


# --------------------------------------------------------------------------------------------------
# Official SQuAD evaluation
# --------------------------------------------------------------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation and the articles a/an/the, and collapse whitespace.

    This is the normalization of the official SQuAD v1.1 and v2.0 evaluation scripts (same steps,
    same order).
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, ground_truth: str) -> float:
    """1.0 when both strings are equal after :func:`normalize_answer`, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1(prediction: str, ground_truth: str, *, version_2: bool = False) -> float:
    """Token-level F1 between the normalized prediction and ground truth.

    Args:
        prediction: Predicted answer text.
        ground_truth: One gold answer text.
        version_2: Apply the SQuAD v2 rule: when either side has no tokens (after normalization),
            the score is 1.0 if both are empty and 0.0 otherwise. Without it (v1.1 script), no
            common token always gives 0.0.
    """
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    if version_2 and (not pred_tokens or not gold_tokens):
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _best_over_gold(prediction: str, golds: Sequence[str], version_2: bool) -> tuple[float, float]:
    if version_2:
        # As in the v2.0 script: gold answers that normalize to nothing are dropped, and a
        # question left without gold answers is scored against the empty answer.
        golds = [g for g in golds if normalize_answer(g)] or [""]
    elif not golds:
        raise ValueError("SQuAD v1.1 evaluation needs at least one gold answer per question")
    em = max(exact_match(prediction, g) for g in golds)
    f = max(f1(prediction, g, version_2=version_2) for g in golds)
    return em, f


def squad_metrics(
    predictions: Mapping[str, str],
    references: Mapping[str, Iterable[str]],
    version_2: bool = False,
) -> dict[str, float]:
    """Exact match and F1 (in percent) over the questions of ``references``.

    Args:
        predictions: ``{question_id: predicted_text}``; ``""`` means "no answer" in v2. Ids not
            in ``references`` are ignored; questions without a prediction score 0 (as in the
            official v1.1 script and torchmetrics).
        references: ``{question_id: [gold_text, ...]}``; an empty list marks an unanswerable (v2)
            question.
        version_2: Use the SQuAD v2.0 rules and add the ``HasAns``/``NoAns`` breakdown.

    Returns:
        ``exact``, ``f1`` and ``total``; in v2 also ``HasAns_total`` and ``NoAns_total`` and, for
        each group with at least one question (the official script omits empty groups),
        ``HasAns_exact``, ``HasAns_f1``, ``NoAns_exact``, ``NoAns_f1``.
    """
    if not references:
        raise ValueError("references is empty")
    golds_of = {qid: list(golds) for qid, golds in references.items()}
    em_scores: dict[str, float] = {}
    f1_scores: dict[str, float] = {}
    for qid, golds in golds_of.items():
        if qid not in predictions:
            em_scores[qid] = f1_scores[qid] = 0.0
            continue
        em_scores[qid], f1_scores[qid] = _best_over_gold(predictions[qid], golds, version_2)

    def mean_percent(scores: dict[str, float], ids: list[str]) -> float:
        return 100.0 * sum(scores[i] for i in ids) / len(ids)

    all_ids = list(golds_of)
    result = {
        "exact": mean_percent(em_scores, all_ids),
        "f1": mean_percent(f1_scores, all_ids),
        "total": float(len(all_ids)),
    }
    if version_2:
        # As in the v2.0 script, a question "has an answer" when its gold list is not empty.
        has_ans = [qid for qid in all_ids if golds_of[qid]]
        no_ans = [qid for qid in all_ids if not golds_of[qid]]
        for prefix, ids in (("HasAns", has_ans), ("NoAns", no_ans)):
            result[f"{prefix}_total"] = float(len(ids))
            if ids:
                result[f"{prefix}_exact"] = mean_percent(em_scores, ids)
                result[f"{prefix}_f1"] = mean_percent(f1_scores, ids)
    return result
