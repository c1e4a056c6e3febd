"""Instruction-tuning data (Alpaca-style records or chat ``messages``) for decoder-only language models.

Each example is split into a *prompt* and a *response*. Both are tokenized separately and their ids
concatenated, so the boundary is exact: labels are ``-100`` over the prompt (and over padding) and the response
ids after it, and the loss is computed on the response only.

Prompt formats:

* **Chat template** (the tokenizer has ``chat_template`` set, and ``use_chat_template`` is not ``False``): the
  prompt is ``tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)``; the
  response is the assistant's text followed by the template's own end of turn (what it writes after an assistant
  message: Gemma's ``<end_of_turn>``, Phi-3's ``<|end|>``, ChatML's ``<|im_end|>``; see
  :func:`chat_turn_end`), or the eos token when the template writes none.
* **Plain** (otherwise): an Alpaca-style text (the tokenizer's bos token first, when it has one)::

      ### Instruction:
      {instruction}

      ### Input:
      {input}

      ### Response:
      {response}<eos>

  The ``### Input`` block is left out when the input is empty. Chat records are written as one
  ``### System:``/``### User:``/``### Assistant:`` block per message, then ``### Response:\\n``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from adalora_pl.errors import ConfigError, MissingFileError
from datamodules._base import TokenizedDataModule, check_positive, utf8_error

__all__ = ["InstructionDataModule", "InstructionCollator", "chat_turn_end", "read_instruction_records"]

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation"}
# At most this many records are named in the warning about empty responses or inputs.
_SHOWN = 20
_EXTENSIONS = (".jsonl", ".json", ".csv")
ROLES = ("system", "user", "assistant")
PLAIN_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PLAIN_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
PLAIN_RESPONSE_HEADER = "### Response:\n"


@dataclass
class _Example:
    """One validated example: the prompt (instruction/input or chat messages) and the response text."""

    where: str  # "file, line 3" / "file, record 2" / "hub_id [split], row 5"
    messages: list[dict[str, str]] | None  # chat prompt (the assistant's last message excluded)
    instruction: str
    input: str
    response: str
    response_field: str  # the column the response came from, for messages about it
    id: str = ""  # the record's id column, else its position in the split (set when the split is read)


# An assistant message no template rewrites: where it ends in the rendered chat, the template's end of turn starts.
_RESPONSE_PROBE = "ADALORA-RESPONSE-PROBE-5b1e"


def chat_turn_end(tokenizer: Any) -> str | None:
    """What the tokenizer's chat template writes after an assistant message, outer whitespace stripped.

    That is the template's own end of a turn: ``<end_of_turn>`` for Gemma, ``<|end|>`` for Phi-3, ``<|im_end|>`` for
    ChatML templates (Qwen2, SmolLM2), ``<|eot_id|>`` for Llama 3, ``</s>`` for Mistral's. It is found by rendering a
    one-turn chat whose answer is a probe text and reading what follows the probe, so no table of model families is
    needed.

    Returns:
        The end-of-turn text, or ``None`` when the tokenizer has no chat template, the template writes nothing but
        whitespace after the answer, or it cannot render a user/assistant chat.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": _RESPONSE_PROBE}]
    try:
        text = tokenizer.apply_chat_template(chat, tokenize=False)
    except Exception as err:  # jinja's TemplateError, or raise_exception() inside the template: any failure here
        log.warning("the chat template cannot render an assistant message (%s); responses end with eos", err)
        return None
    at = text.rfind(_RESPONSE_PROBE)
    if at < 0:
        return None
    return text[at + len(_RESPONSE_PROBE):].strip() or None


# ----------------------------------------------------------------------------------------------- reading
def _read_text(path: Path, encoding: str) -> str:
    try:
        with path.open(encoding=encoding, newline="") as f:
            return f.read()
    except UnicodeDecodeError as err:
        raise utf8_error(path, err) from None


def read_instruction_records(path: str | Path) -> list[tuple[str, Any]]:
    """Read a ``.jsonl``, ``.json`` (a list of records, or one record per line) or ``.csv`` file.

    Args:
        path: The file.

    Returns:
        ``(where, record)`` pairs; ``where`` names the file and the 1-based line (JSONL, CSV) or the 0-based
        record (a JSON list), for error messages.

    Raises:
        MissingFileError: The file does not exist (a ``FileNotFoundError`` too).
        ConfigError: An unsupported extension, bytes that are not UTF-8, or invalid JSON (naming file and line).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _EXTENSIONS:
        raise ConfigError(f"unsupported file extension {path.suffix!r} for {path}; expected one of {_EXTENSIONS}")
    if not path.is_file():
        raise MissingFileError(f"instruction data file not found: {path}")
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(_read_text(path, "utf-8-sig"), newline=""))
        out = []
        for row in reader:
            out.append((f"{path}, line {reader.line_num}", row))
        return out
    text = _read_text(path, "utf-8")
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}, line {err.lineno}, column {err.colno}: not valid JSON ({err.msg})") from None
        return [(f"{path}, record {i}", row) for i, row in enumerate(rows)]
    out = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}, line {line_no}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}, line {line_no}: not valid JSON ({err.msg})") from None
    return out


# ----------------------------------------------------------------------------------------------- batching
class _ListDataset(Dataset):
    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


class InstructionCollator:
    """Pads a list of features to the longest in the batch (right padding).

    Features that carry ``position_ids`` (packed rows, see ``packed_position_ids``) get them padded with 0 into the
    batch; the padding is masked out, so its positions do not matter.

    Args:
        pad_token_id: Id written into ``input_ids`` padding.
        keep_index: Add ``example_index`` (long) from the features (evaluation batches).
    """

    def __init__(self, pad_token_id: int, keep_index: bool = False) -> None:
        self.pad_token_id = pad_token_id
        self.keep_index = keep_index

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
            mask[row, :n] = 1
            labels[row, :n] = torch.tensor(f["labels"], dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if "position_ids" in features[0]:
            positions = torch.zeros((len(features), width), dtype=torch.long)
            for row, f in enumerate(features):
                positions[row, : len(f["position_ids"])] = torch.tensor(f["position_ids"], dtype=torch.long)
            batch["position_ids"] = positions
        if self.keep_index:
            batch["example_index"] = torch.tensor([f["example_index"] for f in features], dtype=torch.long)
        return batch


# ----------------------------------------------------------------------------------------------- the module
class InstructionDataModule(TokenizedDataModule):
    """Instruction/response pairs for supervised fine-tuning of decoder-only (causal) language models.

    Data comes from local files (``train_file``/``validation_file``/``test_file``: ``.jsonl``, ``.json`` holding a
    list of records, or ``.csv`` with a header line) or, without files, from the hub dataset ``dataset_name``. A
    record is either Alpaca style (``instruction``, optional ``input``, ``output``) or a chat: a ``messages`` list of
    ``{"role": "system"|"user"|"assistant", "content": str}`` whose last message, from the assistant, is the
    response (in a CSV file the ``messages`` cell holds the list as JSON). See the module docs for the prompt
    formats: the tokenizer's chat template when it has one, an Alpaca-style plain text otherwise.

    Splits: ``validation_holdout=N`` makes the last N records of the training data the validation split (they are
    then not trained on), so one file (e.g. the 1000 XSum rows of ``../shared/data``) gives both. Testing uses the
    test split (``test_file`` / ``test_split``) and, without one, the validation split.

    Batches hold ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on prompt tokens and padding), padded
    per batch with the tokenizer's pad token (its eos token without one). Validation and test batches also carry
    ``example_index``: ``eval_references(split)[i]`` is the reference response of ``example_index == i``,
    ``eval_prompts(split)[i]`` its prompt and ``example_ids(split)[i]`` its id, for generation-based evaluation.
    Remove it before calling the model.

    Empty responses (and, under a fixed ``instruction``, empty inputs) are kept, as the summarization data module
    keeps empty summaries and documents: :meth:`setup` logs a warning that names each such record's file and line
    (or hub row) and column. An empty response trains the model to end at once and scores ROUGE 0 as a reference.

    With ``packing``, training examples are concatenated, in order and whole, into sequences of at most
    ``max_seq_length`` tokens; their labels are concatenated too (each keeps its ``-100`` prompt), so no label
    crosses examples. The attention mask is all ones inside a packed sequence: examples in one sequence can
    attend to earlier ones, as in the usual packing recipes, and without ``packed_position_ids`` the model numbers
    the positions of a packed sequence straight through, so the second example starts at the first one's length.
    Validation and test are never packed.

    Args:
        tokenizer: Hub name or local folder for ``AutoTokenizer``, or a loaded tokenizer. It needs an eos token
            (or, for BERT-style tokenizers, a sep token, used instead).
        train_file: Local training file.
        validation_file: Local validation file (optional).
        test_file: Local test file (optional; testing uses the validation split without one).
        dataset_name: Hub dataset id, used when no local file is given.
        dataset_config: Configuration of the hub dataset, if it has several.
        train_split: Hub split used for training.
        validation_split: Hub split used for validation; ``None`` for none.
        test_split: Hub split used for testing; ``None``: test on the validation split.
        validation_holdout: Hold out the last N records of the training data (file or hub split) as the
            validation split; they are not trained on. Replaces ``validation_split``; refused together with
            ``validation_file``. ``max_train_samples``/``max_eval_samples`` then cut what each side holds.
        instruction_column: Column of the instruction (Alpaca records).
        input_column: Column of the optional input (Alpaca records; missing or empty means no input).
        output_column: Column of the response (Alpaca records).
        messages_column: Column of the chat messages; a record that has it is read as a chat.
        id_column: Column of the record ids written to the predictions file (XSum's ``id``); a record without
            it gets its position in the split.
        instruction: One instruction for every Alpaca record (e.g. ``"Summarize the article in one sentence."``);
            the records then need only ``input_column`` and ``output_column`` (e.g. XSum's ``document`` and
            ``summary``), and ``instruction_column`` is not read. ``None``: read it from ``instruction_column``.
        use_chat_template: ``None`` uses the tokenizer's chat template when it has one; ``False`` always uses the
            plain format; ``True`` requires a chat template.
        max_seq_length: Maximum tokens per example (``None``: no limit). Longer examples lose the start of their
            prompt first (its end, with the response marker, is kept), down to ``min_prompt_tokens``; then the
            end of their response, which keeps at least ``min_response_tokens``. :meth:`setup` logs the share of
            examples truncated.
        min_response_tokens: Response tokens that truncation always keeps (fewer only for shorter responses).
        min_prompt_tokens: Prompt tokens (the last ones) that truncation always keeps.
        packing: Pack training examples into sequences of ``max_seq_length`` tokens (needs ``max_seq_length``).
        packed_position_ids: With ``packing``, give packed batches ``position_ids`` that restart at 0 at every
            example, so each example sees the positions (rotary or learned) it would see alone and at inference.
            What it does not change: attention still crosses examples (the attention mask of a packed row is all
            ones, and the model gets it with the batch, so transformers does not derive a block-diagonal mask from
            the positions); only a block mask would stop that, at the cost of a ``(batch, 1, L, L)`` mask per step,
            which keeps SDPA off its flash kernel. Costs nothing itself: one more integer tensor per batch.
        batch_size: Training batch size.
        **kwargs: ``eval_batch_size``, ``num_workers``, ``max_train_samples``, ``max_eval_samples`` and
            ``cache_dir``, as documented in :class:`~datamodules._base.TokenizedDataModule`.

    Raises:
        ConfigError: No data source, an unsupported file extension, ``packing`` without ``max_seq_length``,
            ``packed_position_ids`` without ``packing``, ``validation_holdout`` with ``validation_file``, or a
            ``max_seq_length`` below ``min_prompt_tokens + min_response_tokens``. At :meth:`setup`: an empty
            file, a hold-out that leaves no training records, or a malformed record (the message names the file,
            the line or record, and the column).
        MissingFileError: A data file that does not exist (a ``FileNotFoundError`` too).
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        train_file: str | None = None,
        validation_file: str | None = None,
        test_file: str | None = None,
        dataset_name: str | None = None,
        dataset_config: str | None = None,
        train_split: str = "train",
        validation_split: str | None = "validation",
        test_split: str | None = None,
        validation_holdout: int | None = None,
        instruction_column: str = "instruction",
        input_column: str = "input",
        output_column: str = "output",
        messages_column: str = "messages",
        id_column: str = "id",
        instruction: str | None = None,
        use_chat_template: bool | None = None,
        max_seq_length: int | None = 1024,
        min_response_tokens: int = 1,
        min_prompt_tokens: int = 0,
        packing: bool = False,
        packed_position_ids: bool = False,
        batch_size: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(tokenizer=tokenizer, batch_size=batch_size, **kwargs)
        given = (train_file, validation_file, test_file)
        self.files: dict[str, Path] = {split: Path(f) for split, f in zip(SPLITS, given, strict=True) if f is not None}
        for split, path in self.files.items():
            if path.suffix.lower() not in _EXTENSIONS:
                raise ConfigError(
                    f"{split}_file: unsupported file extension {path.suffix!r} for {path}; expected one of "
                    f"{_EXTENSIONS}"
                )
            if not path.is_file():
                raise MissingFileError(f"{split}_file: instruction data file not found: {path}")
        if self.files and "train" not in self.files:
            raise ConfigError(
                "local instruction data needs train_file (validation_file or test_file alone is not enough)"
            )
        if not self.files and dataset_name is None:
            raise ConfigError("no instruction data: give train_file (and validation_file) or dataset_name")
        if validation_holdout is not None:
            holdout = validation_holdout
            if isinstance(holdout, bool) or not isinstance(holdout, int) or holdout < 1:
                raise ConfigError(f"validation_holdout must be a positive integer, got {validation_holdout!r}")
            if validation_file is not None:
                raise ConfigError(
                    f"validation_holdout={validation_holdout} and validation_file={validation_file} both set the "
                    "validation split; give one"
                )
        check_positive("max_seq_length", max_seq_length, allow_none=True)
        check_positive("min_response_tokens", min_response_tokens)
        if isinstance(min_prompt_tokens, bool) or not isinstance(min_prompt_tokens, int) or min_prompt_tokens < 0:
            raise ConfigError(f"min_prompt_tokens must be a non-negative integer, got {min_prompt_tokens!r}")
        if max_seq_length is not None and max_seq_length < min_prompt_tokens + min_response_tokens:
            raise ConfigError(
                f"max_seq_length={max_seq_length} cannot hold min_prompt_tokens={min_prompt_tokens} plus "
                f"min_response_tokens={min_response_tokens}; raise --data.max_seq_length"
            )
        if packing and max_seq_length is None:
            raise ConfigError("packing needs max_seq_length (the length of the packed sequences)")
        if packed_position_ids and not packing:
            raise ConfigError(
                "packed_position_ids=True needs packing=True (unpacked rows start at position 0 anyway)"
            )
        self.dataset_name = dataset_name
        self.dataset_config = dataset_config
        self.splits = {"train": train_split, "validation": validation_split, "test": test_split}
        self.validation_holdout = validation_holdout
        self.instruction_column = instruction_column
        self.input_column = input_column
        self.output_column = output_column
        self.messages_column = messages_column
        self.id_column = id_column
        if instruction is not None and not instruction.strip():
            raise ConfigError("instruction must be a non-empty text (or None to read it from instruction_column)")
        self.instruction = instruction
        self.use_chat_template = use_chat_template
        self.max_seq_length = max_seq_length
        self.min_response_tokens = min_response_tokens
        self.min_prompt_tokens = min_prompt_tokens
        self.packing = packing
        self.packed_position_ids = packed_position_ids
        self._file_records: dict[Path, list[tuple[str, Any]]] = {}
        self._examples: dict[str, list[_Example]] = {}
        self._prompts: dict[str, list[str]] = {}
        self._prompt_ids: dict[str, list[list[int]]] = {}
        self._features: dict[str, list[dict[str, Any]]] = {}
        self._response_end: list[int] | None = None

    # ------------------------------------------------------------------ tokenizer
    def _check_tokenizer(self, tokenizer: Any) -> None:
        if self._eos_id(tokenizer) is None:
            raise ConfigError("the tokenizer has neither an eos nor a sep token to end the responses with")
        if self.use_chat_template and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("use_chat_template=True but the tokenizer has no chat_template")

    @staticmethod
    def _eos_id(tokenizer: Any) -> int | None:
        eos = getattr(tokenizer, "eos_token_id", None)
        return eos if eos is not None else getattr(tokenizer, "sep_token_id", None)

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad token id, or its eos token id when it has no pad token."""
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return pad if pad is not None else self._eos_id(self.tokenizer)

    @property
    def chat_format(self) -> bool:
        """Whether prompts are written with the tokenizer's chat template (else the plain format)."""
        if self.use_chat_template is False:
            return False
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def response_end_ids(self) -> list[int]:
        """The token ids that end every response: in the chat format, the template's own end of turn
        (:func:`chat_turn_end`, e.g. Gemma's ``<end_of_turn>``); in the plain format,
        or when the template writes no end of turn, the eos token."""
        if self._response_end is None:
            end = chat_turn_end(self.tokenizer) if self.chat_format else None
            self._response_end = self._ids([end])[0] if end else [self._eos_id(self.tokenizer)]
        return self._response_end

    @property
    def stop_token_ids(self) -> list[int]:
        """Token ids at which generation stops: eos, and the chat template's end of turn when that is one other
        token (Gemma's generation would otherwise run on past ``<end_of_turn>``)."""
        eos = self._eos_id(self.tokenizer)
        end = self.response_end_ids
        return [eos] + end if len(end) == 1 and end[0] != eos else [eos]

    # ------------------------------------------------------------------ sources
    def available_splits(self) -> tuple[str, ...]:
        """Splits with data: those with a local file, or the hub splits that are set (validation also through
        ``validation_holdout``)."""
        if self.files:
            has = {s: s in self.files for s in SPLITS}
        else:
            has = {s: self.splits[s] is not None for s in SPLITS}
        has["validation"] = has["validation"] or self.validation_holdout is not None
        return tuple(s for s in SPLITS if has[s])

    def _resolve_split(self, split: str) -> str:
        """The split that serves ``split``: aliases (``val``, ``dev``) resolved, ``test`` falling back to the
        validation split when there is no test data."""
        split = _SPLIT_ALIASES.get(split, split)
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; expected one of {SPLITS}")
        available = self.available_splits()
        if split == "test" and "test" not in available:
            split = "validation"  # no test data: test on the validation split
        if split not in available:
            extra = " or validation_holdout" if split == "validation" else ""
            raise ConfigError(f"no {split} data: pass {split}_file{extra} (or a hub dataset with that split)")
        return split

    def _file(self, path: Path) -> list[tuple[str, Any]]:
        """The records of a local file, read once (the hold-out reads the training file for two splits)."""
        if path not in self._file_records:
            records = read_instruction_records(path)
            if not records:
                raise ConfigError(f"{path}: the file has no examples")
            self._file_records[path] = records
        return self._file_records[path]

    def _held_out_range(self, split: str, total: int, source: str) -> tuple[int, int]:
        """``[start, stop)`` of ``split``'s records among the ``total`` records of its source."""
        holdout = self.validation_holdout
        if holdout is None or split not in ("train", "validation"):
            return 0, total
        if holdout >= total:
            raise ConfigError(f"validation_holdout={holdout} leaves no training records: {source} has {total}")
        return (total - holdout, total) if split == "validation" else (0, total - holdout)

    def _records(self, split: str) -> list[tuple[str, Any]]:
        """``(where, record)`` pairs of ``split``, after the hold-out and the sample limit."""
        source = "train" if split == "validation" and self.validation_holdout is not None else split
        limit = self._sample_limit(split)
        if self.files:
            path = self.files[source]
            records = self._file(path)
            start, stop = self._held_out_range(split, len(records), str(path))
            return records[start:stop][:limit]
        hub_split = self.splits[source]
        ds = self._hub_dataset(
            self.dataset_name, self.dataset_name, self.dataset_config, split=hub_split,
            hint="pass local files: --data.train_file /path/to/train.jsonl",
        )
        if len(ds) == 0:
            raise ConfigError(f"{self.dataset_name} [{hub_split}]: the split has no examples")
        start, stop = self._held_out_range(split, len(ds), f"{self.dataset_name} [{hub_split}]")
        if limit is not None:
            stop = min(stop, start + limit)
        rows = ds.select(range(start, stop)) if (start, stop) != (0, len(ds)) else ds
        return [(f"{self.dataset_name} [{hub_split}], row {start + i}", row) for i, row in enumerate(rows)]

    def _parse(self, where: str, row: Any) -> _Example:
        """Validate one record into an :class:`_Example`; errors name ``where`` and the column."""
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: the record is a {type(row).__name__}, expected an object")
        col = self.messages_column
        if row.get(col) not in (None, ""):
            messages = row[col]
            if isinstance(messages, str):
                try:
                    messages = json.loads(messages)
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{where}, column {col!r}: not a JSON list of messages ({err.msg})") from None
            if not isinstance(messages, list) or len(messages) < 2:
                raise ConfigError(
                    f"{where}, column {col!r}: expected a list of at least two messages (a prompt and the "
                    f"assistant's response), got {messages!r:.80}"
                )
            for i, m in enumerate(messages):
                if not isinstance(m, dict) or m.get("role") not in ROLES:
                    raise ConfigError(
                        f"{where}, column {col!r}, message {i}: expected a role in {ROLES}, got {m!r:.80}"
                    )
                if not isinstance(m.get("content"), str):
                    raise ConfigError(
                        f"{where}, column {col!r}, message {i}: 'content' must be a string, "
                        f"got {type(m.get('content')).__name__}"
                    )
            if messages[-1]["role"] != "assistant":
                raise ConfigError(
                    f"{where}, column {col!r}: the last message must be the assistant's response, "
                    f"got role {messages[-1]['role']!r}"
                )
            prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
            return _Example(where, prompt, "", "", messages[-1]["content"], col)
        values = {}
        columns = [(self.input_column, False), (self.output_column, True)]
        if self.instruction is None:
            columns.insert(0, (self.instruction_column, True))
        for name, required in columns:
            value = row.get(name)
            if value is None:
                if required:
                    state = "is missing" if name not in row else "is empty (null)"
                    needs = (
                        f"{self.output_column!r} (the instruction is fixed)" if self.instruction is not None
                        else f"{self.instruction_column!r} and {self.output_column!r}, or {self.messages_column!r}"
                    )
                    raise ConfigError(
                        f"{where}: column {name!r} {state} (columns: {list(row)}); a record needs {needs}"
                    )
                value = ""
            if not isinstance(value, str):
                raise ConfigError(f"{where}, column {name!r}: expected a string, got {type(value).__name__}")
            values[name] = value
        instruction = self.instruction if self.instruction is not None else values[self.instruction_column]
        return _Example(where, None, instruction, values[self.input_column], values[self.output_column],
                        self.output_column)

    def _warn_empty(self, split: str, examples: list[_Example]) -> None:
        """Log the records whose response (or, under a fixed instruction, input) is empty: they are kept, as the
        summarization data keeps empty summaries, but never silently."""
        checks = [("responses", lambda e: not e.response.strip(), lambda e: e.response_field,
                   "their target is the end-of-response token alone")]
        if self.instruction is not None:
            checks.append(("inputs", lambda e: e.messages is None and not e.input.strip(),
                           lambda e: self.input_column, "their prompt is the instruction alone"))
        for kind, is_empty, field, consequence in checks:
            empty = [e for e in examples if is_empty(e)]
            if empty:
                named = "; ".join(f"{e.where}, column {field(e)!r}" for e in empty[:_SHOWN])
                more = "; ..." if len(empty) > _SHOWN else ""
                log.warning("instruction %s: %d of %d %s are empty (%s%s); kept: %s",
                            split, len(empty), len(examples), kind, named, more, consequence)

    # ------------------------------------------------------------------ formatting
    def format_prompt(self, example: _Example) -> str:
        """The prompt text of ``example`` (chat template or plain format), ending where the response starts."""
        if self.chat_format:
            messages = example.messages
            if messages is None:
                content = example.instruction + (f"\n\n{example.input}" if example.input else "")
                messages = [{"role": "user", "content": content}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if example.messages is not None:
            blocks = [f"### {m['role'].capitalize()}:\n{m['content']}\n\n" for m in example.messages]
            return "".join(blocks) + PLAIN_RESPONSE_HEADER
        if example.input:
            return PLAIN_WITH_INPUT.format(instruction=example.instruction, input=example.input)
        return PLAIN_NO_INPUT.format(instruction=example.instruction)

    def _ids(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]

    def _truncate(self, prompt: list[int], response: list[int]) -> tuple[list[int], list[int]]:
        """Cut the prompt from the left, then the response from the right, to ``max_seq_length`` tokens."""
        limit = self.max_seq_length
        if limit is None or len(prompt) + len(response) <= limit:
            return prompt, response
        keep_prompt = max(limit - len(response), min(len(prompt), self.min_prompt_tokens))
        prompt = prompt[len(prompt) - keep_prompt :] if keep_prompt else []
        return prompt, response[: limit - len(prompt)]

    def _tokenize(self, split: str, examples: list[_Example]) -> list[dict[str, Any]]:
        prompts = [self.format_prompt(e) for e in examples]
        bos = getattr(self.tokenizer, "bos_token_id", None)
        prefix = [bos] if bos is not None and not self.chat_format else []
        end = self.response_end_ids
        prompt_ids = [prefix + ids for ids in self._ids(prompts)]
        response_ids = [ids + end for ids in self._ids([e.response for e in examples])]
        features, lengths = [], []
        for i, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
            lengths.append(len(p) + len(r))
            p, r = self._truncate(p, r)
            features.append({"example_index": i, "input_ids": p + r, "labels": [-100] * len(p) + r})
        if self.max_seq_length is not None:
            self._warn_truncated(f"instruction {split}", "examples", lengths, self.max_seq_length, "max_seq_length")
        self._prompts[split] = prompts
        self._prompt_ids[split] = prompt_ids
        return features

    def _pack(self, features: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Concatenate whole examples, in order, into sequences of at most ``max_seq_length`` tokens (with
        ``position_ids`` restarting at every example under ``packed_position_ids``)."""
        packed: list[dict[str, Any]] = []
        current: dict[str, list[int]] = {}
        for f in features:
            if current and len(current["input_ids"]) + len(f["input_ids"]) > self.max_seq_length:
                packed.append(current)
                current = {}
            if not current:
                current = {"input_ids": [], "labels": []} | ({"position_ids": []} if self.packed_position_ids else {})
            current["input_ids"] += f["input_ids"]
            current["labels"] += f["labels"]
            if self.packed_position_ids:
                current["position_ids"] += list(range(len(f["input_ids"])))
        if current:
            packed.append(current)
        return packed

    # ------------------------------------------------------------------ lightning hooks
    def prepare_data(self) -> None:
        """Download the tokenizer and the hub dataset into the cache (local files need nothing)."""
        self._download_tokenizer()
        if not self.files:
            sources = {("train" if s == "validation" and self.validation_holdout else s) for s in
                       self.available_splits()}
            for split in sorted(sources):
                self._hub_dataset(
                    self.dataset_name, self.dataset_name, self.dataset_config, split=self.splits[split],
                    hint="pass local files: --data.train_file /path/to/train.jsonl",
                )

    def setup(self, stage: str | None = None) -> None:
        """Read, check and tokenize the splits ``stage`` needs (all available splits when ``stage`` is None)."""
        _ = self.tokenizer  # no tokenizer, or one without eos, fails before any reading
        wanted = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",),
                  "predict": ("test",)}.get(stage, SPLITS)
        for split in wanted:
            try:
                split = self._resolve_split(split)
            except ConfigError:
                continue  # this split has no data; its dataloader raises a clear error if asked for
            self._ensure(split)

    def _ensure_examples(self, split: str) -> str:
        split = self._resolve_split(split)
        if split not in self._examples:
            examples = []
            for i, (where, row) in enumerate(self._records(split)):
                example = self._parse(where, row)
                ident = row.get(self.id_column)
                example.id = str(i) if ident is None or ident == "" else str(ident)
                examples.append(example)
            self._warn_empty(split, examples)
            self._examples[split] = examples
        return split

    def _ensure(self, split: str) -> str:
        split = self._ensure_examples(split)
        if split not in self._features:
            features = self._tokenize(split, self._examples[split])
            if self.packing and split == "train":
                features = self._pack(features)
            self._features[split] = features
        return split

    # ------------------------------------------------------------------ access
    def features(self, split: str) -> list[dict[str, Any]]:
        """The tokenized examples of ``split``: dicts of ``input_ids`` and ``labels`` lists (and, unpacked,
        ``example_index``; packed with ``packed_position_ids``, ``position_ids``)."""
        return self._features[self._ensure(split)]

    def eval_prompts(self, split: str = "validation") -> list[str]:
        """Prompt texts of ``split`` (formatted, untruncated), indexed by the batches' ``example_index``."""
        return self._prompts[self._ensure(split)]

    def eval_prompt_ids(self, split: str = "validation") -> list[list[int]]:
        """Token ids of :meth:`eval_prompts` (untruncated; bos first in the plain format), for ``generate``."""
        return self._prompt_ids[self._ensure(split)]

    def eval_references(self, split: str = "validation") -> list[str]:
        """Reference responses of ``split`` (without their end token), indexed by the batches' ``example_index``."""
        return [e.response for e in self._examples[self._ensure_examples(split)]]

    def example_ids(self, split: str = "validation") -> list[str]:
        """Ids of ``split``'s records (``id_column``, else the position in the split), indexed by
        ``example_index``: the ``id`` of the predictions file."""
        return [e.id for e in self._examples[self._ensure_examples(split)]]

    def collator(self, keep_index: bool) -> InstructionCollator:
        """Dynamic-padding collator; ``keep_index`` adds the ``example_index`` of evaluation batches."""
        return InstructionCollator(self.pad_token_id, keep_index=keep_index)

    def _loader(self, split: str) -> DataLoader:
        train = split == "train"
        return self._dataloader(_ListDataset(self.features(split)), train=train, collate_fn=self.collator(not train))

    def train_dataloader(self) -> DataLoader:
        """The training loader (shuffled; packed with ``packing``)."""
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        """The validation loader; batches carry ``example_index``."""
        return self._loader("validation")

    def test_dataloader(self) -> DataLoader:
        """The test loader (the validation data without test data); batches carry ``example_index``."""
        return self._loader("test")
