"""Instruction tuning of decoder-only language models (Llama, Mistral, Qwen2, Gemma, Phi-3) with AdaLoRA, LoRA or
full fine-tuning.

Training minimises the cross-entropy of the response tokens: the data module
(:class:`~datamodules.instruction.InstructionDataModule`) sets the labels of prompt tokens and padding to ``-100``,
and the backbone's own loss skips them. Validation and test report, over all response tokens of the split,

- ``{stage}/loss``: the mean negative log-likelihood per response token (token-weighted over the epoch, not a
  mean of batch means), ``{stage}/perplexity`` = ``exp(loss)`` and ``{stage}/token_accuracy`` (the share of
  response tokens that are the argmax of the model's next-token distribution, teacher forced). Every example
  counts once, under DDP too (the rows a distributed sampler repeats are dropped by index,
  :class:`~adalora_pl.tasks.metrics.RowSums`);
- with ``generate_on_validation``, ROUGE-1/2/L (percent) of responses generated from the prompts alone
  (greedy or beam search, ``max_new_tokens``), and the generations as ``predictions_<stage>_epoch<N>.jsonl``
  in the log folder (``id`` is the data's id column when it has one). The stage's own split is used: the test
  prompts at test (the validation ones when the data module has no test data). Generation is skipped during
  Lightning's sanity check unless ``generate_on_sanity_check``, and logs a line when it starts and its progress.

Large models: ``torch_dtype="bfloat16"`` loads the base weights in bfloat16 while the adapters stay in float32
(as PEFT does); ``gradient_checkpointing`` recomputes each block's activations in backward (non-reentrant, so
it works with frozen embeddings). ``quantization="nf4"`` (``fp4``, ``int8``, ``torchao_int8``) loads the base
quantized, QLoRA style, with the norms, embeddings and ``lm_head`` in float32
(:meth:`~adalora_pl.module.AdapterModule.load_quantized_backbone`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Literal, get_args

import torch
from transformers import AutoModelForCausalLM

from adalora_pl.errors import ConfigError
from adalora_pl.io.pretrained import dtype_keyword
from adalora_pl.module import Stage
from adalora_pl.tasks.generation import SPLIT_OF_STAGE, GenerativeModule, check_generation_settings
from adalora_pl.tasks.metrics import RowSums

__all__ = ["CausalLMModule"]

log = logging.getLogger(__name__)

TorchDtype = Literal["float32", "bfloat16", "float16"]
TORCH_DTYPES: tuple[str, ...] = get_args(TorchDtype)


class CausalLMModule(GenerativeModule):
    """Supervised fine-tuning of an ``AutoModelForCausalLM`` backbone on prompt/response pairs.

    Use it with :class:`~datamodules.instruction.InstructionDataModule`: its batches carry ``labels`` with
    ``-100`` on the prompt, and its ``eval_prompt_ids`` / ``eval_references`` feed the generation-based
    evaluation. The adapted layers default to the backbone family's preset (attention and MLP projections of
    every block; see :data:`adalora_pl.injection.TARGET_MODULE_PRESETS`); ``lm_head`` and the embeddings stay
    frozen.

    Args:
        backbone: hub name or local folder of a causal language model.
        torch_dtype: dtype of the base weights (``"bfloat16"`` halves their memory; the adapters stay float32).
            ``None`` keeps the checkpoint's default (float32 in transformers). With ``quantization``: the dtype the
            weights are quantized from.
        gradient_checkpointing: recompute activations in backward to save memory (same gradients); non-reentrant,
            and on a quantized base with input embeddings whose output requires grad
            (:meth:`~adalora_pl.module.AdapterModule.enable_gradient_checkpointing`).
        trust_remote_code: let transformers run model code from the hub repository. Off by default: a model
            folder then runs only code that ships with transformers.
        attn_implementation: transformers' attention kernel (``"sdpa"``, ``"flash_attention_2"``, ``"eager"``);
            ``None`` lets transformers choose (SDPA where the model supports it).
        generate_on_validation: generate a response for every validation/test prompt and score it with ROUGE.
            Off, the evaluation is teacher forced only (loss, perplexity, token accuracy), which is much faster.
        num_beams: beam width of the generation (1: greedy).
        max_new_tokens: most tokens generated per response.
        max_prompt_tokens: prompts longer than this lose their start before generation (the end, with the
            response marker, is kept, as the data module's truncation does); ``None`` takes the data module's
            ``max_seq_length`` minus ``max_new_tokens``.
        rouge_lsum: also compute ROUGE-Lsum.
        write_predictions: write the generations of every evaluation epoch into the log folder.
        generate_on_sanity_check: generate during Lightning's sanity check too (off: it runs the teacher-forced
            evaluation only; see :class:`~adalora_pl.tasks.generation.GenerativeModule`).
        trainable_modules: modules trained in full next to the adapters; none by default (``lm_head`` is often
            tied to the input embeddings).
        **kwargs: method (``adalora``, ``lora``, ``full``, the baselines), ranks, schedule and optimizer
            settings, see :class:`~adalora_pl.module.AdapterModule`.
    """

    auto_class = AutoModelForCausalLM
    bookkeeping_keys = ("example_index",)
    reference_provider = "datamodules.instruction.InstructionDataModule"

    def __init__(
        self,
        backbone: str,
        torch_dtype: TorchDtype | None = None,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        generate_on_validation: bool = True,
        num_beams: int = 1,
        max_new_tokens: int = 64,
        max_prompt_tokens: int | None = None,
        rouge_lsum: bool = False,
        write_predictions: bool = True,
        generate_on_sanity_check: bool = False,
        trainable_modules: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        if torch_dtype is not None and torch_dtype not in TORCH_DTYPES:
            raise ConfigError(f"torch_dtype must be one of {list(TORCH_DTYPES)} or None, got {torch_dtype!r}")
        check_generation_settings(num_beams, max_new_tokens)
        if max_prompt_tokens is not None and max_prompt_tokens < 1:
            raise ConfigError(f"max_prompt_tokens must be >= 1 or None, got {max_prompt_tokens}")
        super().__init__(backbone=backbone, trainable_modules=tuple(trainable_modules), rouge_lsum=rouge_lsum,
                         write_predictions=write_predictions, generate_on_sanity_check=generate_on_sanity_check,
                         **kwargs)
        if gradient_checkpointing:
            # Non-reentrant, cache off; on a quantized base also inputs that require grad (AdapterModule's docstring).
            self.enable_gradient_checkpointing()
        # Per example: summed NLL, correct tokens and response tokens; summed over the distinct examples of the
        # epoch, gathered from every process (token-weighted, each example once).
        self.token_sums = RowSums(width=3)

    def backbone_kwargs(self, backbone: str) -> dict[str, Any]:
        """``dtype`` (``torch_dtype`` before transformers 4.56, see :func:`dtype_keyword`), ``trust_remote_code``
        and ``attn_implementation`` for ``from_pretrained``.

        On a quantized base ``torch_dtype`` is the dtype the weights load in before they are quantized (bitsandbytes
        4-bit records it, torchao's int8 weights dequantize to it); the layers left unquantized are float32 in
        training whatever it is (:meth:`~adalora_pl.module.AdapterModule.prepare_quantized_base`). The
        quantization settings themselves are added by the base class."""
        kwargs: dict[str, Any] = {"trust_remote_code": self.hparams.trust_remote_code}
        if self.hparams.torch_dtype is not None:
            kwargs[dtype_keyword()] = getattr(torch, self.hparams.torch_dtype)
        if self.hparams.attn_implementation is not None:
            kwargs["attn_implementation"] = self.hparams.attn_implementation
        return kwargs

    # ------------------------------------------------------------------ generation

    def _special_ids(self) -> tuple[int, list[int] | None]:
        """(pad id, stop ids) for generation: the data module's padding, and its ``stop_token_ids`` (the end token
        and a chat template's own end of turn, e.g. Gemma's ``<end_of_turn>``); without a data module, the
        tokenizer's end token and the model's ``generation_config`` end tokens (where chat models list their end
        of turn)."""
        tokenizer = self.tokenizer
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        stop = getattr(self.trainer_datamodule, "stop_token_ids", None)
        if stop is None:
            configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
            configured = [configured] if isinstance(configured, int) else list(configured or [])
            stop = list(dict.fromkeys(([] if eos is None else [eos]) + configured))
        pad = getattr(self.trainer_datamodule, "pad_token_id", None)
        if pad is None:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        return pad, list(stop) or None

    def prompt_limit(self) -> int | None:
        """Most prompt tokens kept for generation (see ``max_prompt_tokens``)."""
        if self.hparams.max_prompt_tokens is not None:
            return self.hparams.max_prompt_tokens
        seq = getattr(self.trainer_datamodule, "max_seq_length", None)
        return None if seq is None else max(1, seq - self.hparams.max_new_tokens)

    @torch.no_grad()
    def generate_ids(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Responses to tokenized prompts: the new tokens only, ``(batch, width)``, padded with the pad id.

        Prompts are left-padded into one batch (a decoder continues from the last position of every row) and
        cut to :meth:`prompt_limit` tokens from the left.
        """
        pad, eos = self._special_ids()
        limit = self.prompt_limit()
        rows = [list(p)[-limit:] if limit is not None else list(p) for p in prompts]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long, device=self.device)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long, device=self.device)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, width - len(row):] = 1
        kwargs: dict[str, Any] = {"max_new_tokens": self.hparams.max_new_tokens, "num_beams": self.hparams.num_beams,
                                  "do_sample": False, "pad_token_id": pad, "eos_token_id": eos}
        if self.hparams.num_beams > 1:
            kwargs["early_stopping"] = True
        output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return output[:, width:]

    def generate_text(self, prompts: Sequence[str], chat: bool | None = None) -> list[str]:
        """Responses to prompt texts, decoded.

        Args:
            prompts: user messages (``chat``) or complete prompt texts.
            chat: wrap each prompt as a user message in the tokenizer's chat template (with the generation
                prompt); ``None``: when the tokenizer has a chat template.
        """
        tokenizer = self.tokenizer
        if chat is None:
            chat = bool(getattr(tokenizer, "chat_template", None))
        if chat:
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True) for p in prompts]
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(list(prompts))["input_ids"]
        was_training = self.training
        self.eval()
        try:
            return self.decode(self.generate_ids(ids))
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------ evaluation

    def generation_description(self) -> str:
        """``"up to N tokens, greedy"`` (or ``"up to N tokens, K beams"``), for the log line before generation."""
        beams = self.hparams.num_beams
        return f"up to {self.hparams.max_new_tokens} tokens, " + ("greedy" if beams == 1 else f"{beams} beams")

    def eval_step(self, batch: dict[str, torch.Tensor], stage: Stage, dataloader_idx: int = 0) -> None:
        """Teacher-forced NLL and accuracy of the response tokens per example; the generated responses' token ids
        (from the prompts of the stage's split)."""
        inputs = self.model_inputs(batch, drop=("labels",))
        # Position t predicts token t + 1; only response tokens are scored, in float32 whatever the precision.
        targets = batch["labels"][:, 1:]
        scored = targets != -100
        logits = self(**inputs).logits[:, :-1][scored].float()  # only the scored positions: the vocab is large
        targets = targets[scored]
        row = scored.nonzero()[:, 0]  # the example of each scored token
        per_token = torch.stack([torch.nn.functional.cross_entropy(logits, targets, reduction="none"),
                                 (logits.argmax(-1) == targets).float(), torch.ones_like(targets, dtype=torch.float)],
                                dim=1).double()
        per_example = torch.zeros(len(scored), 3, dtype=torch.float64, device=per_token.device)
        self.token_sums.update(batch["example_index"], per_example.index_add_(0, row, per_token))
        if self.hparams.generate_on_validation and self.should_generate():
            datamodule = self.require_datamodule("eval_prompt_ids", "generates from the prompts of",
                                                 self.reference_provider)
            prompts = datamodule.eval_prompt_ids(SPLIT_OF_STAGE[stage])
            index = batch["example_index"]
            self.generation_starts(stage, dataloader_idx, len(index))
            self.generated.update(index, self.generate_ids([prompts[i] for i in index.tolist()]))
            self.generation_done(stage, dataloader_idx, len(index))

    def log_eval_metrics(self, stage: Stage) -> None:
        """Token-weighted loss, perplexity and accuracy of the epoch; ROUGE and predictions when generating."""
        if self.token_sums.update_count == 0:
            return
        nll, correct, tokens = self.token_sums.compute().tolist()
        if tokens > 0:
            loss = nll / tokens
            self.log(f"{stage}/loss", loss, prog_bar=True)
            self.log(f"{stage}/perplexity", math.exp(loss) if loss < 700 else math.inf)  # exp overflows a float
            self.log(f"{stage}/token_accuracy", correct / tokens)
        self.log_generation_metrics(stage)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> list[str]:
        """Responses generated from each row's prompt: its tokens before the first label (all of them without
        labels)."""
        prompts = []
        for i, ids in enumerate(batch["input_ids"]):
            keep = batch["attention_mask"][i].bool() if "attention_mask" in batch else torch.ones_like(ids).bool()
            if "labels" in batch:
                answer = (batch["labels"][i] != -100).nonzero()
                if len(answer):
                    keep[int(answer[0]):] = False
            prompts.append(ids[keep].tolist())
        return self.decode(self.generate_ids(prompts))
