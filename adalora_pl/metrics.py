"""The official GLUE metrics as torchmetrics collections.

| task | metrics (first = main metric, used for checkpoint selection) |
|---|---|
| cola | ``mcc`` (Matthews correlation) |
| stsb | ``pearson``, ``spearman`` |
| mrpc, qqp | ``f1`` (positive class 1), ``accuracy`` |
| sst2, qnli, rte, mnli | ``accuracy`` |
"""

from __future__ import annotations

import torch
from torchmetrics import (
    Accuracy,
    F1Score,
    MatthewsCorrCoef,
    MetricCollection,
    PearsonCorrCoef,
    SpearmanCorrCoef,
)

from datamodules.glue import get_glue_task, normalize_task_name

_MAIN_METRIC = {"cola": "mcc", "stsb": "pearson", "mrpc": "f1", "qqp": "f1"}


def glue_metrics(task_name: str, prefix: str | None = None) -> MetricCollection:
    """A fresh ``MetricCollection`` with the official metric(s) of a GLUE task.

    The metrics take ``preds`` from :func:`preds_from_logits` (class ids, or scores for STS-B) and
    the batch ``labels``.

    Args:
        task_name: A GLUE task name (``"cola"``, ``"SST-2"``, ...).
        prefix: Optional prefix for the result keys, e.g. ``"val/"``.

    Raises:
        ValueError: Unknown task name.
    """
    task = get_glue_task(task_name)
    if task.name == "cola":
        metrics = {"mcc": MatthewsCorrCoef(task="binary")}
    elif task.name == "stsb":
        metrics = {"pearson": PearsonCorrCoef(), "spearman": SpearmanCorrCoef()}
    elif task.name in ("mrpc", "qqp"):
        metrics = {"f1": F1Score(task="binary"), "accuracy": Accuracy(task="binary")}
    elif task.num_labels == 2:
        metrics = {"accuracy": Accuracy(task="binary")}
    else:
        metrics = {"accuracy": Accuracy(task="multiclass", num_classes=task.num_labels)}
    return MetricCollection(metrics, prefix=prefix)


def main_metric_name(task_name: str) -> str:
    """Key of the metric that ranks checkpoints: cola ``mcc``, stsb ``pearson``, mrpc/qqp ``f1``,
    else ``accuracy``."""
    return _MAIN_METRIC.get(normalize_task_name(task_name), "accuracy")


def preds_from_logits(task_name: str, logits: torch.Tensor) -> torch.Tensor:
    """Predictions for :func:`glue_metrics` from model outputs.

    Classification: the arg-max class id of ``logits`` of shape ``(batch, num_labels)``.
    STS-B: the score, ``logits`` of shape ``(batch, 1)`` or ``(batch,)`` squeezed to ``(batch,)``
    and cast to float32 (the correlation metrics need a float dtype, e.g. under bf16).

    Raises:
        ValueError: ``logits`` does not have the shape the task needs.
    """
    task = get_glue_task(task_name)
    if task.is_regression:
        if logits.ndim == 2 and logits.shape[-1] == 1:
            logits = logits.squeeze(-1)
        if logits.ndim != 1:
            raise ValueError(
                f"stsb expects logits of shape (batch, 1) or (batch,), got {tuple(logits.shape)}"
            )
        return logits.float()
    if logits.ndim != 2 or logits.shape[-1] != task.num_labels:
        raise ValueError(
            f"{task.name} expects logits of shape (batch, {task.num_labels}), got {tuple(logits.shape)}"
        )
    return logits.argmax(dim=-1)
