"""What the generating task modules share: the tokenizer, decoding, ROUGE of generated texts, predictions files.

:class:`~adalora_pl.tasks.summarization_module.Seq2SeqSummarizer` (encoder-decoder) and
:class:`~adalora_pl.tasks.causal_lm_module.CausalLMModule` (decoder-only) generate texts at validation and
test, keep their token ids in a :class:`~adalora_pl.tasks.metrics.GeneratedTexts` (gathered from every process at
the epoch's end), decode them with the data module's tokenizer, score them against the references with
:func:`~adalora_pl.tasks.rouge.rouge_scores` and write them to the log folder, one JSON object a line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from adalora_pl.module import AdapterModule, Stage
from adalora_pl.tasks.metrics import GeneratedTexts
from adalora_pl.tasks.rouge import rouge_scores

__all__ = ["GenerativeModule", "check_generation_settings"]

log = logging.getLogger(__name__)

#: The data split evaluated at each stage (the data modules keep a test set only as "validation" files).
SPLIT_OF_STAGE = {"val": "validation", "test": "test"}


def check_generation_settings(num_beams: int, max_new_tokens: int | None) -> None:
    """Refuse a beam width below 1 or a generation length below 1 (``None``: left to the module's default)."""
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


class GenerativeModule(AdapterModule):
    """Base of the task modules that generate text: decoding, ROUGE and the predictions file.

    A subclass calls ``self.generated.update(example_index, new_token_ids)`` in its ``eval_step`` and
    :meth:`log_generation_metrics` from ``log_eval_metrics``; the data module must provide
    ``eval_references(split)`` (and, optionally, ``example_ids(split)``).

    Args:
        rouge_lsum: also compute ROUGE-Lsum (sentence-level LCS; the CNN/DailyMail convention).
        write_predictions: write ``predictions_<stage>_epoch<N>.jsonl`` (``id``, ``prediction``, ``reference``)
            into the log folder after every validation/test epoch (not after the sanity check).
        **kwargs: backbone, method, ranks, schedule and optimizer settings, see :class:`AdapterModule`.
    """

    #: Where ``require_datamodule`` errors point to: the data module class that provides the references.
    reference_provider: str = "a data module with eval_references(split)"

    def __init__(self, rouge_lsum: bool = False, write_predictions: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.generated = GeneratedTexts()
        self._own_tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        """The data module's tokenizer (it tokenized the inputs), else the backbone's (loaded once)."""
        tokenizer = getattr(self.trainer_datamodule, "tokenizer", None)
        if tokenizer is None:
            if self._own_tokenizer is None:
                from transformers import AutoTokenizer

                self._own_tokenizer = AutoTokenizer.from_pretrained(self.backbone_name)
            tokenizer = self._own_tokenizer
        return tokenizer

    def decode(self, token_ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        """Texts of rows of generated token ids (special tokens and padding dropped, outer spaces stripped)."""
        # The tokenizer's own clean-up setting: forcing it on would strip spaces before punctuation from BPE text.
        texts = self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)
        return [t.strip() for t in texts]

    def log_generation_metrics(self, stage: Stage) -> None:
        """ROUGE (percent) of the epoch's generated texts, from every process; then the predictions file.

        Args:
            stage: ``"val"`` or ``"test"``; names the logged values (``val/rougeL``), the file and the data
                module's split holding the references (:data:`SPLIT_OF_STAGE`; a data module without a test
                split maps ``"test"`` to its validation data itself).
        """
        if self.generated.update_count == 0:
            return
        self.generated.decode = self.decode
        predictions = self.generated.compute()  # {example_index: text}, sorted
        datamodule = self.require_datamodule("eval_references", "reads the references from", self.reference_provider)
        split = SPLIT_OF_STAGE[stage]
        references = datamodule.eval_references(split)
        indices = list(predictions)
        preds = [predictions[i] for i in indices]
        refs = [references[i] for i in indices]
        scores = rouge_scores(preds, refs, use_stemmer=True, lsum=self.hparams.rouge_lsum)
        for name, value in scores.items():
            self.log(f"{stage}/{name}", 100.0 * value, prog_bar=True)
        if self.hparams.write_predictions and not self.trainer.sanity_checking:
            ids = datamodule.example_ids(split) if hasattr(datamodule, "example_ids") else [str(i) for i in indices]
            self.write_predictions(stage, [ids[i] for i in indices], preds, refs)

    def write_predictions(self, stage: str, ids: list[str], preds: list[str], refs: list[str]) -> Path | None:
        """Write ``predictions_<stage>_epoch<N>.jsonl`` into the log folder (on the global-zero process)."""
        directory = self.trainer.log_dir or self.trainer.default_root_dir  # every rank asks (a collective)
        if not self.trainer.is_global_zero:
            return None
        path = Path(directory) / f"predictions_{stage}_epoch{self.current_epoch}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            for example_id, prediction, reference in zip(ids, preds, refs, strict=True):
                f.write(json.dumps({"id": example_id, "prediction": prediction, "reference": reference},
                                   ensure_ascii=False) + "\n")
        log.info("wrote %d %s generations to %s", len(ids), stage, path)
        return path
