"""Extractive question answering (SQuAD v1.1 / v2.0) with AdaLoRA, LoRA or full fine-tuning.

Training uses the start/end token labels of :class:`~datamodules.squad.SquadDataModule` and the model's
own loss. Validation and test keep the start/end logits of every window together with its
``feature_index`` in a :class:`~adalora_pl.tasks.metrics.SquadMetric` until the epoch ends (gathered from
every process); then the data module maps the windows back to their questions, picks the answers and
scores them with the official SQuAD metric (``val/exact``, ``val/f1``, and for v2.0 ``val/HasAns_*`` and
``val/NoAns_*``, all in percent).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForQuestionAnswering

from adalora_pl.errors import ConfigError
from adalora_pl.module import AdapterModule, Stage
from adalora_pl.tasks.metrics import SquadMetric

__all__ = ["QuestionAnswering"]

# Shown in the progress bar; the other numbers (totals, HasAns/NoAns exact) are logged only.
_PROG_BAR_METRICS = frozenset({"exact", "f1", "HasAns_f1", "NoAns_f1"})


class QuestionAnswering(AdapterModule):
    """Span extraction on SQuAD with an ``AutoModelForQuestionAnswering`` backbone.

    Args:
        backbone: hub name or local folder (default: the paper's ``microsoft/deberta-v3-base``). A
            backbone saved without a span head gets a fresh ``qa_outputs`` layer, trained in full (it
            is in the default ``trainable_modules``).
        version_2: SQuAD v2.0 rules: questions may be unanswerable and the answer ``""`` is predicted
            when the no-answer score wins. Must agree with the data module's ``version``.
        n_best_size: start and end candidates per window combined into answer spans.
        max_answer_length: longest answer, in tokens.
        null_score_diff_threshold: v2 only: predict ``""`` when the no-answer score exceeds the best
            span's score by more than this.
        **kwargs: method, ranks, schedule and optimizer settings, see :class:`AdapterModule`.
    """

    auto_class = AutoModelForQuestionAnswering
    bookkeeping_keys = ("feature_index",)

    def __init__(
        self,
        backbone: str = "microsoft/deberta-v3-base",
        version_2: bool = False,
        n_best_size: int = 20,
        max_answer_length: int = 30,
        null_score_diff_threshold: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if n_best_size < 1 or max_answer_length < 1:
            raise ConfigError(
                f"n_best_size and max_answer_length must be positive, got {n_best_size} and {max_answer_length}"
            )
        super().__init__(backbone=backbone, **kwargs)
        self.version_2 = version_2
        self.squad_metric = SquadMetric(self.score_answers, n_best_size=n_best_size,
                                        max_answer_length=max_answer_length, version_2=version_2,
                                        null_score_diff_threshold=null_score_diff_threshold)

    def setup(self, stage: str) -> None:
        """Refuse data of the other SQuAD version, then check the lengths (:meth:`AdapterModule.setup`)."""
        data_v2 = getattr(self.trainer_datamodule, "version_2", None)
        if data_v2 is not None and bool(data_v2) != self.version_2:
            raise ConfigError(
                f"the model is set up for SQuAD {'v2.0' if self.version_2 else 'v1.1'} (version_2={self.version_2}) "
                f"but the data is SQuAD {'v2.0' if data_v2 else 'v1.1'}; set --model.version_2 to match --data.version"
            )
        super().setup(stage)

    # ------------------------------------------------------------------ evaluation

    def _span_logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # The span labels go too, where a batch has them: evaluation scores answers, not the loss.
        out = self(**self.model_inputs(batch, drop=("start_positions", "end_positions")))
        return batch["feature_index"], out.start_logits, out.end_logits

    def eval_step(self, batch: dict[str, torch.Tensor], stage: Stage, dataloader_idx: int = 0) -> None:
        """Keep the batch's windows (``feature_index`` with start/end logits) for the epoch's scoring."""
        self.squad_metric.update(*self._span_logits(batch))

    def log_eval_metrics(self, stage: Stage) -> None:
        """SQuAD exact/F1 (and v2's HasAns/NoAns numbers) over the epoch's windows, from every process."""
        if self.squad_metric.update_count == 0:
            return
        # Empty when no question had all of its windows scored (e.g. a sanity check over few batches).
        for name, value in self.squad_metric.compute().items():
            self.log(f"{stage}/{name}", value, prog_bar=name in _PROG_BAR_METRICS)

    def score_answers(self, feature_index: torch.Tensor, start_logits: torch.Tensor, end_logits: torch.Tensor,
                      **settings: Any) -> dict[str, float]:
        """The :class:`~adalora_pl.tasks.metrics.SquadMetric` scorer: the data module's ``compute_metrics`` (it maps
        the windows back to their questions), looked up when the metric computes."""
        datamodule = self.require_datamodule(
            "compute_metrics", "scores answers through", "datamodules.squad.SquadDataModule"
        )
        return datamodule.compute_metrics(feature_index, start_logits, end_logits, **settings)

    def predict_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, torch.Tensor]:
        """Per-window logits with their ``feature_index``; ``datamodule.postprocess`` turns them into answers."""
        index, start, end = self._span_logits(batch)
        return {"feature_index": index, "start_logits": start, "end_logits": end}
