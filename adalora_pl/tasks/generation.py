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
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from adalora_pl.errors import ConfigError
from adalora_pl.module import AdapterModule, Stage
from adalora_pl.tasks.metrics import GeneratedTexts
from adalora_pl.tasks.rouge import rouge_scores

__all__ = ["GenerativeModule", "check_generation_settings"]

log = logging.getLogger(__name__)

#: The data split evaluated at each stage; a data module without test data maps "test" to its validation split.
SPLIT_OF_STAGE = {"val": "validation", "test": "test"}


def check_generation_settings(num_beams: int, max_new_tokens: int | None) -> None:
    """Refuse a beam width below 1 or a generation length below 1 (``None``: left to the module's default)."""
    if num_beams < 1:
        raise ConfigError(f"num_beams must be >= 1, got {num_beams}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


class GenerativeModule(AdapterModule):
    """Base of the task modules that generate text: decoding, ROUGE and the predictions file.

    A subclass asks :meth:`should_generate` in its ``eval_step``, generates between :meth:`generation_starts` and
    :meth:`generation_done` (they log what is happening: generation is by far the slowest part of an evaluation),
    calls ``self.generated.update(example_index, new_token_ids)`` and, from ``log_eval_metrics``,
    :meth:`log_generation_metrics`; the data module must provide ``eval_references(split)`` (and, optionally,
    ``example_ids(split)``).

    Args:
        rouge_lsum: also compute ROUGE-Lsum (sentence-level LCS; the CNN/DailyMail convention).
        write_predictions: write ``predictions_<stage>_epoch<N>.jsonl`` (``id``, ``prediction``, ``reference``)
            into the log folder after every validation/test epoch (not after the sanity check).
        generate_on_sanity_check: also generate during Lightning's sanity check (the few validation batches run
            before training). Off by default: the check then runs the teacher-forced part only, which finds the
            same bugs in seconds, where generating 64 tokens for 1,024-token prompts of a 135M model takes minutes
            on a CPU. ``--trainer.num_sanity_val_steps 0`` skips the whole check.
        **kwargs: backbone, method, ranks, schedule and optimizer settings, see :class:`AdapterModule`.
    """

    #: Where ``require_datamodule`` errors point to: the data module class that provides the references.
    reference_provider: str = "a data module with eval_references(split)"
    #: Seconds between two progress lines of an evaluation epoch's generation (its first batch always logs one).
    progress_every_s: float = 30.0

    def __init__(self, rouge_lsum: bool = False, write_predictions: bool = True,
                 generate_on_sanity_check: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.generated = GeneratedTexts(self.decode)  # decodes with the tokenizer known when it computes
        self._own_tokenizer: Any = None
        self._progress: dict[str, Any] = {}

    # ------------------------------------------------------------------ when to generate, and saying so

    def should_generate(self) -> bool:
        """False during Lightning's sanity check unless ``generate_on_sanity_check``; True otherwise."""
        trainer = self._trainer
        if trainer is not None and trainer.sanity_checking and not self.hparams.generate_on_sanity_check:
            if not self._progress.get("skip_logged"):
                rank_zero_info("sanity check: teacher-forced evaluation only, no generation "
                               "(--model.generate_on_sanity_check true generates there too)")
                self._progress["skip_logged"] = True
            return False
        return True

    def _batches(self, stage: Stage, dataloader_idx: int) -> int | None:
        """Batches of this evaluation epoch (the limits applied), for the progress lines."""
        trainer = self._trainer
        if trainer is None:
            return None
        if trainer.sanity_checking:
            counts = trainer.num_sanity_val_batches
        else:
            counts = trainer.num_val_batches if stage == "val" else trainer.num_test_batches
        count = counts[dataloader_idx] if dataloader_idx < len(counts) else float("inf")
        return None if count == float("inf") else int(count)  # a loader without a length has no known count

    def generation_starts(self, stage: Stage, dataloader_idx: int, rows: int) -> None:
        """Before a batch's generation: on the epoch's first batch, one line that says what comes and how to skip it."""
        if "start" in self._progress:  # reset when an evaluation epoch starts
            return
        total = self._batches(stage, dataloader_idx)
        how = self.generation_description()
        batches = f"{total} batches" if total is not None else "every batch"
        rank_zero_info(f"{stage}: generating {how} for {batches} of about {rows} prompts each, usually "
                       "the slowest part of an evaluation (--model.generate_on_validation false skips it)")
        self._progress = {"start": time.perf_counter(), "done": 0, "rows": 0, "last": float("-inf")}

    def generation_done(self, stage: Stage, dataloader_idx: int, rows: int) -> None:
        """After a batch's generation: a progress line, at most every :attr:`progress_every_s` seconds and after the
        epoch's first and last batch."""
        progress = self._progress
        progress["done"] += 1
        progress["rows"] += rows
        now = time.perf_counter()
        total = self._batches(stage, dataloader_idx)
        last = total is not None and progress["done"] >= total
        if progress["done"] == 1 or last or now - progress["last"] >= self.progress_every_s:
            progress["last"] = now
            elapsed = now - progress["start"]
            of = f"/{total}" if total is not None else ""
            left = ""
            if total is not None and not last:
                left = f", about {elapsed / progress['done'] * (total - progress['done']):.0f} s left"
            rank_zero_info(f"{stage} generation: batch {progress['done']}{of} ({progress['rows']} responses) "
                           f"in {elapsed:.0f} s{left}")

    def generation_description(self) -> str:
        """How the module generates, for the log line (e.g. ``"up to 64 tokens, greedy"``)."""
        return "responses"

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._progress = {}

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._progress = {}

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
