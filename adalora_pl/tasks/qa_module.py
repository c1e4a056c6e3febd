"""Extractive question answering (SQuAD v1.1 / v2.0) with AdaLoRA, LoRA or full fine-tuning.

Training uses the start/end token labels of :class:`~datamodules.squad.SquadDataModule` and the model's
own loss. Validation and test keep the start/end logits of every window together with its
``feature_index`` until the epoch ends; then the data module maps the windows back to their questions,
picks the answers and scores them with the official SQuAD metric (``val/exact``, ``val/f1``, and for
v2.0 ``val/HasAns_*`` and ``val/NoAns_*``, all in percent).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoModelForQuestionAnswering

from adalora_pl.module import AdapterModule

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
            raise ValueError(
                f"n_best_size and max_answer_length must be positive, got {n_best_size} and {max_answer_length}"
            )
        super().__init__(backbone=backbone, **kwargs)
        self.version_2 = version_2
        self._eval_rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def build_backbone(self, backbone: str) -> nn.Module:
        from adalora_pl.io.pretrained import check_backbone, load_pretrained

        return load_pretrained(AutoModelForQuestionAnswering.from_pretrained, check_backbone(backbone))

    def setup(self, stage: str) -> None:
        data_v2 = getattr(getattr(self.trainer, "datamodule", None), "version_2", None)
        if data_v2 is not None and bool(data_v2) != self.version_2:
            raise ValueError(
                f"the model is set up for SQuAD {'v2.0' if self.version_2 else 'v1.1'} (version_2={self.version_2}) "
                f"but the data is SQuAD {'v2.0' if data_v2 else 'v1.1'}; set --model.version_2 to match --data.version"
            )

    def forward(self, **batch: torch.Tensor):
        return self.model(**batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss  # cross-entropy of the start and end positions, averaged
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    # ------------------------------------------------------------------ evaluation

    def _span_logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inputs = {k: v for k, v in batch.items() if k not in ("feature_index", "start_positions", "end_positions")}
        out = self.model(**inputs)
        return batch["feature_index"], out.start_logits, out.end_logits

    def _collect(self, batch: dict[str, torch.Tensor]) -> None:
        index, start, end = self._span_logits(batch)
        self._eval_rows.append((index.detach().cpu(), start.detach().float().cpu(), end.detach().float().cpu()))

    def on_validation_epoch_start(self) -> None:
        self._eval_rows = []

    def on_test_epoch_start(self) -> None:
        self._eval_rows = []

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._collect(batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._collect(batch)

    def _gathered_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """This epoch's rows from every process (a distributed sampler gives each the same count)."""
        if not self._eval_rows:
            return None
        index, start, end = (torch.cat(parts) for parts in zip(*self._eval_rows, strict=True))
        if self.trainer.world_size > 1:
            # (world_size, rows, ...) -> (world_size * rows, ...); duplicates from the sampler's padding are fine
            index, start, end = (
                self.all_gather(t.to(self.device)).flatten(0, 1).cpu() for t in (index, start, end)
            )
        return index, start, end

    def _log_squad_metrics(self, stage: str) -> None:
        rows = self._gathered_rows()
        self._eval_rows = []
        if rows is None:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "compute_metrics"):
            raise RuntimeError(
                "QuestionAnswering scores answers through its data module's compute_metrics "
                "(datamodules.squad.SquadDataModule); pass it as `datamodule=` to the Trainer"
            )
        h = self.hparams
        metrics = datamodule.compute_metrics(
            *rows,
            n_best_size=h.n_best_size,
            max_answer_length=h.max_answer_length,
            version_2=self.version_2,
            null_score_diff_threshold=h.null_score_diff_threshold,
        )
        # Empty when no question had all of its windows scored (e.g. a sanity check over few batches).
        for name, value in metrics.items():
            self.log(f"{stage}/{name}", float(value), prog_bar=name in _PROG_BAR_METRICS)

    def on_validation_epoch_end(self) -> None:
        self._log_squad_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_squad_metrics("test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0):
        """Per-window logits with their ``feature_index``; ``datamodule.postprocess`` turns them into answers."""
        index, start, end = self._span_logits(batch)
        return {"feature_index": index, "start_logits": start, "end_logits": end}
