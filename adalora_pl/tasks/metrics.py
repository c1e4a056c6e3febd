"""torchmetrics ``Metric`` classes that hold a task's evaluation outputs until the epoch ends.

SQuAD answers and generated summaries can only be scored once every window or example of the evaluation set has
been seen, and under DDP each process sees a part of it. These metrics keep the per-batch outputs as list states
reduced with ``dist_reduce_fx="cat"``, so that torchmetrics gathers them from every process when ``compute`` runs.
Text cannot be a Metric state, so what is kept are tensors (feature and example indices, logits, token ids); the
scoring or decoding function, which needs the data module or the tokenizer, is given at construction (a task module
passes one of its methods, which looks the data module or tokenizer up when ``compute`` calls it), so ``compute``
needs nothing but the metric itself.

Every row counts once. Under DDP, Lightning's ``DistributedSampler`` pads the evaluation set to a multiple of the
number of processes by repeating its first rows, so a metric that sums what each process saw counts those rows
twice (a 1001-row set on 8 GPUs: 7 rows twice). Each metric here keeps the row's index (``example_index``, SQuAD's
``feature_index``) beside its values and drops the repeats when it computes: :class:`RowSums` (token-weighted
losses), :class:`DistinctRows` (any torchmetrics metric of predictions and targets, e.g. the GLUE metrics),
:class:`GeneratedTexts` (one text per index); the SQuAD scorer maps windows to questions by index.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.utilities import dim_zero_cat

__all__ = ["DistinctRows", "GeneratedTexts", "RowSums", "SquadMetric", "first_of_each_row"]

#: ``scorer(feature_index, start_logits, end_logits, **settings) -> {metric name: value}``.
SquadScorer = Callable[..., Mapping[str, float]]
#: ``decode(token_rows) -> texts``: one text per row of token ids.
Decoder = Callable[[list[list[int]]], list[str]]


def first_of_each_row(index: torch.Tensor) -> torch.Tensor:
    """Positions that keep each distinct value of ``index`` once (its first occurrence), in ascending index order.

    ``index[first_of_each_row(index)]`` is ``index.unique()``; the same positions select the values kept beside it.
    Sorting by index also fixes the order of later sums, so the result does not depend on how rows were split over
    processes or batches.
    """
    order = torch.argsort(index, stable=True)
    ordered = index[order]
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    return order[first]


def _require_callable(metric: str, argument: str, value: Any, what: str) -> None:
    """Refuse a scorer/decoder that is missing or not a function, at construction, naming what it must be."""
    if not callable(value):
        raise TypeError(f"{metric} needs {argument}: {what}; got {value!r}")


def _this_process_only() -> bool:
    """A ``distributed_available_fn`` that keeps a metric from syncing (a module-level function: it must pickle)."""
    return False


class RowSums(Metric):
    """Per-row values (a row's summed loss, its token count, ...) summed over the distinct rows of an evaluation set.

    ``update`` keeps each row's ``example_index`` and its values; ``compute`` gathers them from every process, keeps
    one copy of each row (the repeats a distributed sampler adds are dropped) and sums them in float64, in index
    order.

    Args:
        width: how many values each row carries.
        **kwargs: passed to :class:`torchmetrics.Metric`.
    """

    is_differentiable = False
    full_state_update = False

    example_index: list[torch.Tensor]
    values: list[torch.Tensor]

    def __init__(self, width: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.width = width
        self.add_state("example_index", default=[], dist_reduce_fx="cat")
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, example_index: torch.Tensor, values: torch.Tensor) -> None:
        """Keep a batch: ``example_index`` ``(batch,)`` and ``values`` ``(batch, width)``."""
        if values.ndim != 2 or values.shape != (example_index.numel(), self.width):
            raise ValueError(f"RowSums expects values of shape ({example_index.numel()}, {self.width}), "
                             f"got {tuple(values.shape)}")
        self.example_index.append(example_index.detach().reshape(-1).long())
        self.values.append(values.detach().double())

    def compute(self) -> torch.Tensor:
        """``(width,)`` float64 sums over the distinct rows seen since the last reset, on every process."""
        index, values = dim_zero_cat(self.example_index), dim_zero_cat(self.values)
        return values[first_of_each_row(index)].sum(0)


class DistinctRows(Metric):
    """A torchmetrics metric of ``(preds, target)`` computed over the distinct rows of an evaluation set.

    ``update(example_index, preds, target)`` keeps the rows with their index; ``compute`` gathers them from every
    process, keeps one copy of each row and computes the wrapped ``metric`` over those, on each process alone (its
    own synchronisation is switched off: the rows are already all here). Use it where a metric's state is a sum
    that cannot be undone afterwards (a confusion matrix, the moments of a correlation).

    Args:
        metric: a ``Metric`` or ``MetricCollection`` (e.g. :func:`adalora_pl.tasks.glue.glue_metrics`).
        **kwargs: passed to :class:`torchmetrics.Metric`.
    """

    is_differentiable = False
    full_state_update = False

    example_index: list[torch.Tensor]
    preds: list[torch.Tensor]
    target: list[torch.Tensor]

    def __init__(self, metric: Metric | MetricCollection, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.metric = metric
        for module in metric.modules():
            if isinstance(module, Metric):
                module.distributed_available_fn = _this_process_only
        for name in ("example_index", "preds", "target"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, example_index: torch.Tensor, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Keep a batch: ``example_index`` ``(batch,)``, ``preds`` and ``target`` with ``batch`` rows."""
        self.example_index.append(example_index.detach().reshape(-1).long())
        self.preds.append(preds.detach())
        self.target.append(target.detach())

    def compute(self) -> Any:
        """The wrapped metric's result over the distinct rows seen since the last reset (the same on every
        process)."""
        index = dim_zero_cat(self.example_index)
        keep = first_of_each_row(index)
        self.metric.reset()
        self.metric.update(dim_zero_cat(self.preds)[keep], dim_zero_cat(self.target)[keep])
        return self.metric.compute()


class SquadMetric(Metric):
    """SQuAD exact match / F1 of span logits, scored by a post-processing function over the whole evaluation set.

    ``update`` keeps each window's ``feature_index`` and its start/end logits (as float32); ``compute`` passes
    all of them, gathered from every process, to ``scorer`` (the data module's ``compute_metrics``, which maps
    windows back to questions, picks the answers and applies the official metric) with the answer settings.

    Args:
        scorer: called by ``compute`` as ``scorer(feature_index, start_logits, end_logits, n_best_size=...,
            max_answer_length=..., version_2=..., null_score_diff_threshold=...)``; returns ``{name: value}``
            (empty when no question had all of its windows scored). A task module passes a method of its own that
            calls its data module's ``compute_metrics``, which is not known when the module is built.
        n_best_size: start and end candidates per window combined into answer spans.
        max_answer_length: longest answer, in tokens.
        version_2: SQuAD v2.0 rules (the answer ``""`` when the no-answer score wins).
        null_score_diff_threshold: v2 only: margin of the no-answer score over the best span's.
        **kwargs: passed to :class:`torchmetrics.Metric`.

    Raises:
        TypeError: ``scorer`` is not callable.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    feature_index: list[torch.Tensor]
    start_logits: list[torch.Tensor]
    end_logits: list[torch.Tensor]

    def __init__(
        self,
        scorer: SquadScorer,
        n_best_size: int = 20,
        max_answer_length: int = 30,
        version_2: bool = False,
        null_score_diff_threshold: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.settings: dict[str, Any] = {
            "n_best_size": n_best_size,
            "max_answer_length": max_answer_length,
            "version_2": version_2,
            "null_score_diff_threshold": null_score_diff_threshold,
        }
        _require_callable("SquadMetric", "scorer", scorer,
                          "the function that scores the windows' logits, e.g. a SquadDataModule's compute_metrics")
        self.scorer = scorer
        for name in ("feature_index", "start_logits", "end_logits"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, feature_index: torch.Tensor, start_logits: torch.Tensor, end_logits: torch.Tensor) -> None:
        """Keep a batch of windows: ``feature_index`` ``(batch,)``, start/end logits ``(batch, seq_len)``."""
        self.feature_index.append(feature_index.detach())
        # float32 whatever the training precision: the post-processing compares sums of logits
        self.start_logits.append(start_logits.detach().float())
        self.end_logits.append(end_logits.detach().float())

    def compute(self) -> dict[str, float]:
        """``{name: value}`` from ``scorer`` over every window kept since the last reset, on every process."""
        index, start, end = (dim_zero_cat(s).cpu() for s in (self.feature_index, self.start_logits, self.end_logits))
        return {name: float(value) for name, value in self.scorer(index, start, end, **self.settings).items()}


class GeneratedTexts(Metric):
    """Generated token ids by example index, gathered from every process and decoded into ``{index: text}``.

    Batches generate rows of different widths, so ``update`` flattens each batch's rows and keeps their widths
    beside them (``cat`` states must agree in every dimension but the first); ``compute`` splits them back into
    rows and decodes them with ``decode``.

    Args:
        decode: called by ``compute`` with the rows of token ids (lists of ints, padding included, as ``generate``
            returned them); returns one text per row. A task module passes its own ``decode``, which finds the
            tokenizer (the data module's) when it is called.
        **kwargs: passed to :class:`torchmetrics.Metric`.

    Raises:
        TypeError: ``decode`` is not callable.
    """

    is_differentiable = False
    full_state_update = False

    example_index: list[torch.Tensor]
    token_ids: list[torch.Tensor]
    widths: list[torch.Tensor]

    def __init__(self, decode: Decoder, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _require_callable("GeneratedTexts", "decode", decode, "the function that turns rows of token ids into texts")
        self.decode = decode
        for name in ("example_index", "token_ids", "widths"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, example_index: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Keep a batch: ``example_index`` ``(batch,)`` and the generated ``token_ids`` ``(batch, width)``."""
        rows, width = token_ids.shape
        self.example_index.append(example_index.detach().reshape(-1).long())
        self.token_ids.append(token_ids.detach().reshape(-1).long())
        self.widths.append(torch.full((rows,), width, dtype=torch.long, device=token_ids.device))

    def compute(self) -> dict[int, str]:
        """``{example_index: text}`` sorted by index; the rows a padded sampler repeats collapse into one."""
        index = dim_zero_cat(self.example_index)
        rows = torch.split(dim_zero_cat(self.token_ids).cpu(), dim_zero_cat(self.widths).tolist())
        keep = first_of_each_row(index).tolist()  # decode each row once
        texts = self.decode([rows[i].tolist() for i in keep])
        return dict(zip(index[keep].tolist(), texts, strict=True))
