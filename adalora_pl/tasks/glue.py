"""The GLUE benchmark as this project knows it: the eight tasks (names, label sets, the original TSV layout) and
their official metrics as torchmetrics collections.

| task | metrics (first = main metric, used for checkpoint selection) |
|---|---|
| cola | ``mcc`` (Matthews correlation) |
| stsb | ``pearson``, ``spearman`` |
| mrpc, qqp | ``f1`` (positive class 1), ``accuracy`` |
| sst2, qnli, rte, mnli | ``accuracy`` |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchmetrics import (
    Accuracy,
    F1Score,
    MatthewsCorrCoef,
    MetricCollection,
    PearsonCorrCoef,
    SpearmanCorrCoef,
)

from adalora_pl.errors import ConfigError


@dataclass(frozen=True)
class GlueTask:
    """Everything the loaders need to know about one GLUE task.

    Attributes:
        name: Canonical task name, the hub config name (``"cola"``, ``"sst2"``, ...).
        folder: Folder name of the task in the official GLUE download (``"CoLA"``, ``"SST-2"``, ...).
        text_columns: Text column names in the hub dataset (one for single-sentence tasks, two for
            pairs). The TSV reader produces the same names.
        tsv_text_columns: TSV column names holding those texts, in the same order.
        tsv_label_column: TSV column name holding the label or score.
        label_names: Class names in label-id order (the hub's ``ClassLabel`` names); ``None`` for
            the regression task STS-B.
        tsv_labels: The raw label strings of the TSV files, in label-id order; ``None`` for STS-B.
        tsv_fieldnames: Column names of a header-less TSV file (only CoLA); ``None`` when the
            first line of each file is its header.
        split_files: ``(split name, TSV file name)`` pairs; the first is the training split, the
            others are the validation splits, in the order the validation loaders come in.
    """

    name: str
    folder: str
    text_columns: tuple[str, ...]
    tsv_text_columns: tuple[str, ...]
    tsv_label_column: str
    label_names: tuple[str, ...] | None
    tsv_labels: tuple[str, ...] | None
    tsv_fieldnames: tuple[str, ...] | None = None
    split_files: tuple[tuple[str, str], ...] = (("train", "train.tsv"), ("validation", "dev.tsv"))

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def val_split_names(self) -> tuple[str, ...]:
        return tuple(split for split, _ in self.split_files[1:])

    def file_name(self, split: str) -> str:
        """TSV file name of ``split`` (``"train"`` or one of :attr:`val_split_names`)."""
        for name, file_name in self.split_files:
            if name == split:
                return file_name
        known = [name for name, _ in self.split_files]
        raise ValueError(f"task {self.name!r} has no split {split!r}; its splits are {known}")


_BINARY = ("0", "1")
_NLI_2 = ("entailment", "not_entailment")

GLUE_TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask(
            name="cola",
            folder="CoLA",
            text_columns=("sentence",),
            tsv_text_columns=("sentence",),
            tsv_label_column="label",
            label_names=("unacceptable", "acceptable"),
            tsv_labels=_BINARY,
            tsv_fieldnames=("source", "label", "original_label", "sentence"),
        ),
        GlueTask(
            name="sst2",
            folder="SST-2",
            text_columns=("sentence",),
            tsv_text_columns=("sentence",),
            tsv_label_column="label",
            label_names=("negative", "positive"),
            tsv_labels=_BINARY,
        ),
        GlueTask(
            name="mrpc",
            folder="MRPC",
            text_columns=("sentence1", "sentence2"),
            tsv_text_columns=("#1 String", "#2 String"),
            tsv_label_column="Quality",
            label_names=("not_equivalent", "equivalent"),
            tsv_labels=_BINARY,
        ),
        GlueTask(
            name="qqp",
            folder="QQP",
            text_columns=("question1", "question2"),
            tsv_text_columns=("question1", "question2"),
            tsv_label_column="is_duplicate",
            label_names=("not_duplicate", "duplicate"),
            tsv_labels=_BINARY,
        ),
        GlueTask(
            name="stsb",
            folder="STS-B",
            text_columns=("sentence1", "sentence2"),
            tsv_text_columns=("sentence1", "sentence2"),
            tsv_label_column="score",
            label_names=None,
            tsv_labels=None,
        ),
        GlueTask(
            name="mnli",
            folder="MNLI",
            text_columns=("premise", "hypothesis"),
            tsv_text_columns=("sentence1", "sentence2"),
            tsv_label_column="gold_label",
            label_names=("entailment", "neutral", "contradiction"),
            tsv_labels=("entailment", "neutral", "contradiction"),
            split_files=(
                ("train", "train.tsv"),
                ("validation_matched", "dev_matched.tsv"),
                ("validation_mismatched", "dev_mismatched.tsv"),
            ),
        ),
        GlueTask(
            name="qnli",
            folder="QNLI",
            text_columns=("question", "sentence"),
            tsv_text_columns=("question", "sentence"),
            tsv_label_column="label",
            label_names=_NLI_2,
            tsv_labels=_NLI_2,
        ),
        GlueTask(
            name="rte",
            folder="RTE",
            text_columns=("sentence1", "sentence2"),
            tsv_text_columns=("sentence1", "sentence2"),
            tsv_label_column="label",
            label_names=_NLI_2,
            tsv_labels=_NLI_2,
        ),
    )
}


def normalize_task_name(task_name: str) -> str:
    """Map a GLUE task name to its canonical key in :data:`GLUE_TASKS`.

    Case, ``-``, ``_`` and spaces are ignored, so ``"CoLA"``, ``"SST-2"`` and ``"sts_b"`` all work.

    Raises:
        ConfigError: ``task_name`` is not one of the eight GLUE tasks.
    """
    key = "".join(ch for ch in str(task_name).lower() if ch not in "-_ ")
    if key not in GLUE_TASKS:
        raise ConfigError(f"unknown GLUE task {task_name!r}; expected one of {sorted(GLUE_TASKS)}")
    return key


def get_glue_task(task_name: str) -> GlueTask:
    """The :class:`GlueTask` for ``task_name`` (any spelling :func:`normalize_task_name` accepts)."""
    return GLUE_TASKS[normalize_task_name(task_name)]



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
    """Key of the task's headline metric in GLUE's own reporting: cola ``mcc``, stsb ``pearson``, mrpc/qqp ``f1``,
    else ``accuracy`` (for a ``ModelCheckpoint(monitor="val/" + name, mode="max")`` of your own; the CLI's
    checkpoints keep the last epoch)."""
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
