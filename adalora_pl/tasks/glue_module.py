"""``GLUEClassifier``: sequence classification and regression on the GLUE tasks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification

from adalora_pl.io.pretrained import load_pretrained
from adalora_pl.module import AdapterModule, Stage
from adalora_pl.tasks.glue import get_glue_task, glue_metrics, main_metric_name, preds_from_logits


class GLUEClassifier(AdapterModule):
    """Sequence classification (regression for STS-B) on a GLUE task with AdaLoRA, LoRA or full fine-tuning.

    Args:
        task_name: GLUE task (``cola``, ``sst2``, ``mrpc``, ``qqp``, ``stsb``, ``mnli``, ``qnli``, ``rte``);
            fixes the number of labels and the metrics. Linked to ``--data.task_name`` in the CLI.
        backbone: hub name or local folder (default: the paper's ``microsoft/deberta-v3-base``).
        **kwargs: see :class:`AdapterModule`.
    """

    auto_class = AutoModelForSequenceClassification

    def __init__(self, task_name: str = "cola", backbone: str = "microsoft/deberta-v3-base", **kwargs: Any) -> None:
        self.task = get_glue_task(task_name)  # before super().__init__: backbone_kwargs reads the label count
        super().__init__(backbone=backbone, **kwargs)
        self.main_metric = main_metric_name(self.task.name)
        self.val_metrics = nn.ModuleList(glue_metrics(self.task.name) for _ in self.task.val_split_names)

    def setup(self, stage: str) -> None:
        data_task = getattr(self.trainer_datamodule, "task_name", None)
        if data_task is not None and data_task != self.task.name:
            raise ValueError(
                f"the model is set up for GLUE task {self.task.name!r} but the data is {data_task!r}; "
                "set --model.task_name and --data.task_name to the same task"
            )

    def backbone_kwargs(self, backbone: str) -> dict[str, Any]:
        """A config with the task's label count (and, for STS-B, regression) for ``from_pretrained``."""
        config = load_pretrained(AutoConfig.from_pretrained, backbone, num_labels=self.task.num_labels)
        if self.task.is_regression:
            config.problem_type = "regression"
        # A backbone saved with another head (e.g. 2 labels, used for STS-B) gets a fresh head; transformers
        # reports which weights were re-initialized.
        return {"config": config, "ignore_mismatched_sizes": True}

    def eval_step(self, batch: dict[str, torch.Tensor], stage: Stage, dataloader_idx: int = 0) -> None:
        """Log the loss per validation split (``val/loss_validation_matched`` for MNLI) and update its metrics."""
        out = self(**batch)
        split = self.task.val_split_names[dataloader_idx]
        self.log(f"{stage}/loss_{split}", out.loss, add_dataloader_idx=False)
        self.val_metrics[dataloader_idx].update(preds_from_logits(self.task.name, out.logits), batch["labels"])

    def log_eval_metrics(self, stage: Stage) -> None:
        """The task's metrics per validation split (``val/mcc``; ``val/accuracy_validation_matched`` for MNLI)."""
        for split, metrics in zip(self.task.val_split_names, self.val_metrics, strict=True):
            suffix = "" if len(self.task.val_split_names) == 1 else f"_{split}"
            values = {f"{stage}/{k}{suffix}": v for k, v in metrics.compute().items()}
            self.log_dict(values, prog_bar=True, add_dataloader_idx=False)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Predicted labels (scores for STS-B) of the batch; its labels, if any, are ignored."""
        return preds_from_logits(self.task.name, self(**self.model_inputs(batch, drop=("labels",))).logits)
