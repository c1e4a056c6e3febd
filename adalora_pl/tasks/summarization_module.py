"""Abstractive summarization (XSum, CNN/DailyMail) on encoder-decoder models with AdaLoRA, LoRA or full fine-tuning.

Training minimises the teacher-forced cross-entropy of the reference summary (the model's own loss on
``labels``). Validation and test log ``{stage}/loss``, the teacher-forced NLL per summary token over the split
(token-weighted, each document once, under DDP too), generate a summary for every document with beam search, keep
its token ids in a :class:`~adalora_pl.tasks.metrics.GeneratedTexts` (gathered from every process at the epoch's
end), decode it with the data module's tokenizer and score it against the reference with ROUGE-1/2/L (plus
ROUGE-Lsum when asked, as for CNN/DailyMail); the summaries are also written to the log folder, one JSON object a
line. Lightning's sanity check runs the teacher-forced part only, unless ``generate_on_sanity_check``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import AutoModelForSeq2SeqLM

from adalora_pl.module import Stage
from adalora_pl.tasks.generation import GenerativeModule, check_generation_settings
from adalora_pl.tasks.metrics import RowSums

__all__ = ["Seq2SeqSummarizer"]


class Seq2SeqSummarizer(GenerativeModule):
    """Summarization with an ``AutoModelForSeq2SeqLM`` backbone (BART, T5, ...).

    Generation settings left at ``None`` fall back to the backbone's ``generation_config`` (for
    ``facebook/bart-large`` that includes ``no_repeat_ngram_size=3``, which the authors' runs used).

    ROUGE is logged in percent (``val/rouge1``, ``val/rouge2``, ``val/rougeL``, ``val/rougeLsum``), as
    in the paper's tables, computed by :func:`adalora_pl.tasks.rouge.rouge_scores` with stemming.

    Args:
        backbone: hub name or local folder (default: the paper's ``facebook/bart-large``).
        num_beams: beam width at validation/test.
        max_new_tokens: most tokens generated per summary; ``None`` takes the data module's
            ``max_target_length`` (the label length), else 128. (Named apart from the data module's
            ``max_target_length``: Lightning refuses model and data hyperparameters that share a name but
            not a value.)
        min_new_tokens: fewest tokens generated per summary (``None``: the backbone's default).
        length_penalty: beam-search length penalty (``None``: the backbone's default).
        no_repeat_ngram_size: forbid repeating n-grams of this size (``None``: the backbone's default;
            0 turns it off).
        rouge_lsum: also compute ROUGE-Lsum (sentence-level LCS; the CNN/DailyMail convention).
        write_predictions: write ``predictions_<stage>_epoch<N>.jsonl`` (``id``, ``prediction``,
            ``reference``) into the log folder after every validation/test epoch.
        generate_on_sanity_check: generate during Lightning's sanity check too (off: the check runs the
            teacher-forced loss only).
        trainable_modules: modules trained in full next to the adapters. Empty by default: BART's and
            T5's ``lm_head`` share their weight with the input embeddings, so training it would
            change the frozen embeddings too.
        **kwargs: method, ranks, schedule and optimizer settings, see :class:`AdapterModule`.
    """

    auto_class = AutoModelForSeq2SeqLM
    bookkeeping_keys = ("example_index",)
    reference_provider = "datamodules.summarization.SummarizationDataModule"

    def __init__(
        self,
        backbone: str = "facebook/bart-large",
        num_beams: int = 4,
        max_new_tokens: int | None = None,
        min_new_tokens: int | None = None,
        length_penalty: float | None = None,
        no_repeat_ngram_size: int | None = None,
        rouge_lsum: bool = False,
        write_predictions: bool = True,
        generate_on_sanity_check: bool = False,
        trainable_modules: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        check_generation_settings(num_beams, max_new_tokens)
        super().__init__(backbone=backbone, trainable_modules=tuple(trainable_modules), rouge_lsum=rouge_lsum,
                         write_predictions=write_predictions, generate_on_sanity_check=generate_on_sanity_check,
                         **kwargs)
        # Per document: summed NLL of its summary tokens and their count, over the distinct documents of the epoch.
        self.token_sums = RowSums(width=2)

    # ------------------------------------------------------------------ generation

    def generation_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``generate``: beams, length and the optional settings that are set."""
        h = self.hparams
        max_new = h.max_new_tokens
        if max_new is None:
            max_new = getattr(self.trainer_datamodule, "max_target_length", None) or 128
        kwargs: dict[str, Any] = {"num_beams": h.num_beams, "max_new_tokens": int(max_new)}
        if h.num_beams > 1:
            kwargs["early_stopping"] = True
        for name, key in (("min_new_tokens", "min_new_tokens"), ("length_penalty", "length_penalty"),
                          ("no_repeat_ngram_size", "no_repeat_ngram_size")):
            if h[name] is not None:
                kwargs[key] = h[name]
        return kwargs

    @torch.no_grad()
    def generate_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Beam-search summaries of a batch of tokenized documents: ``(batch, width)`` token ids, padded."""
        return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **self.generation_kwargs())

    def generate_summaries(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[str]:
        """Beam-search summaries of a batch of tokenized documents, decoded to text."""
        return self.decode(self.generate_ids(input_ids, attention_mask))

    # ------------------------------------------------------------------ evaluation

    def generation_description(self) -> str:
        """The beam width and length, for the log line before generation."""
        kwargs = self.generation_kwargs()
        return f"up to {kwargs['max_new_tokens']} tokens, {kwargs['num_beams']} beams"

    def eval_step(self, batch: dict[str, torch.Tensor], stage: Stage, dataloader_idx: int = 0) -> None:
        """Keep each document's teacher-forced NLL (when the batch has labels) and its generated summary's ids."""
        inputs = self.model_inputs(batch)
        index = batch["example_index"]
        if "labels" in inputs:
            labels = inputs["labels"]
            scored = labels != -100
            # logits[b, t] predicts labels[b, t] (the model shifts the labels into its decoder inputs); float32
            # and only the scored positions, whatever the precision.
            logits = self(**inputs).logits[scored].float()
            nll = torch.nn.functional.cross_entropy(logits, labels[scored], reduction="none").double()
            per_token = torch.stack([nll, torch.ones_like(nll)], dim=1)
            per_document = torch.zeros(len(labels), 2, dtype=torch.float64, device=nll.device)
            self.token_sums.update(index, per_document.index_add_(0, scored.nonzero()[:, 0], per_token))
        if self.should_generate():
            self.generation_starts(stage, dataloader_idx, len(index))
            self.generated.update(index, self.generate_ids(inputs["input_ids"], inputs.get("attention_mask")))
            self.generation_done(stage, dataloader_idx, len(index))

    def log_eval_metrics(self, stage: Stage) -> None:
        """The token-weighted loss and ROUGE (percent) of the epoch's summaries, from every process; then the
        predictions file."""
        if self.token_sums.update_count:
            nll, tokens = self.token_sums.compute().tolist()
            if tokens > 0:
                self.log(f"{stage}/loss", nll / tokens)
        self.log_generation_metrics(stage)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> list[str]:
        """Generated summaries of the batch, as text."""
        return self.generate_summaries(batch["input_ids"], batch.get("attention_mask"))
