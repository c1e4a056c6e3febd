"""``GLUEClassifier``: sequence classification and regression on the GLUE tasks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification

from adalora_pl.errors import ConfigError
from adalora_pl.io.pretrained import load_pretrained
from adalora_pl.module import AdapterModule, Stage
from adalora_pl.tasks.glue import get_glue_task, glue_metrics, preds_from_logits
from adalora_pl.tasks.metrics import DistinctRows, RowSums


class GLUEClassifier(AdapterModule):
    """Sequence classification (regression for STS-B) on a GLUE task with AdaLoRA, LoRA or full fine-tuning.

    Args:
        task_name: GLUE task (``cola``, ``sst2``, ``mrpc``, ``qqp``, ``stsb``, ``mnli``, ``qnli``, ``rte``);
            fixes the number of labels and the metrics. Linked to ``--data.task_name`` in the CLI.
        backbone: hub name or local folder (default: the paper's ``microsoft/deberta-v3-base``).
        **kwargs: see :class:`AdapterModule`.
    """

    auto_class = AutoModelForSequenceClassification
    # Evaluation batches carry each row's number (datamodules.glue): under DDP the metrics count every row once.
    bookkeeping_keys = ("example_index",)

    def __init__(self, task_name: str = "cola", backbone: str = "microsoft/deberta-v3-base", **kwargs: Any) -> None:
        self.task = get_glue_task(task_name)  # before super().__init__: backbone_kwargs reads the label count
        super().__init__(backbone=backbone, **kwargs)
        self.val_metrics = nn.ModuleList(DistinctRows(glue_metrics(self.task.name))
                                         for _ in self.task.val_split_names)
        # Per split: the summed loss of its distinct rows and their count (the loss of the whole split).
        self.val_losses = nn.ModuleList(RowSums(width=2) for _ in self.task.val_split_names)

    def setup(self, stage: str) -> None:
        """Refuse data of another GLUE task, then check the lengths (:meth:`AdapterModule.setup`)."""
        data_task = getattr(self.trainer_datamodule, "task_name", None)
        if data_task is not None and data_task != self.task.name:
            raise ConfigError(
                f"the model is set up for GLUE task {self.task.name!r} but the data is {data_task!r}; "
                "set --model.task_name and --data.task_name to the same task"
            )
        super().setup(stage)

    def backbone_kwargs(self, backbone: str) -> dict[str, Any]:
        """A config with the task's label count (and, for STS-B, regression) for ``from_pretrained``."""
        config = load_pretrained(AutoConfig.from_pretrained, backbone, num_labels=self.task.num_labels)
        if self.task.is_regression:
            config.problem_type = "regression"
        # A backbone saved with another head (e.g. 2 labels, used for STS-B) gets a fresh head; transformers
        # reports which weights were re-initialized.
        return {"config": config, "ignore_mismatched_sizes": True}

    def eval_step(self, batch: dict[str, torch.Tensor], stage: Stage, dataloader_idx: int = 0) -> None:
        """Update the loss and the metrics of the batch's validation split, row by row (each row counts once)."""
        logits = self(**self.model_inputs(batch, drop=("labels",))).logits
        labels, index = batch["labels"], batch["example_index"]
        self.val_losses[dataloader_idx].update(
            index, torch.stack([self.row_losses(logits, labels), torch.ones_like(index, dtype=torch.float64)], 1))
        self.val_metrics[dataloader_idx].update(index, preds_from_logits(self.task.name, logits), labels)

    def row_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The backbone's loss of each row, in float64: cross-entropy, or the squared error for STS-B."""
        if self.task.is_regression:
            return (logits.reshape(-1).double() - labels.double()) ** 2
        return nn.functional.cross_entropy(logits.double(), labels, reduction="none")

    def log_eval_metrics(self, stage: Stage) -> None:
        """Loss and metrics per validation split (``val/loss``, ``val/mcc``; ``val/loss_validation_matched`` and
        ``val/accuracy_validation_matched`` for MNLI), over the distinct rows of the split."""
        for split, metrics, losses in zip(self.task.val_split_names, self.val_metrics, self.val_losses, strict=True):
            suffix = "" if len(self.task.val_split_names) == 1 else f"_{split}"
            loss_sum, rows = losses.compute()
            values = {f"{stage}/{k}{suffix}": v for k, v in metrics.compute().items()}
            self.log(f"{stage}/loss_{split}", (loss_sum / rows).float(), add_dataloader_idx=False)
            self.log_dict(values, prog_bar=True, add_dataloader_idx=False)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Predicted labels (scores for STS-B) of the batch; its labels, if any, are ignored."""
        return preds_from_logits(self.task.name, self(**self.model_inputs(batch, drop=("labels",))).logits)
