"""Instruction-tuning data (Alpaca-style records or chat ``messages``) for decoder-only language models.

Each example is split into a *prompt* and a *response*. Both are tokenized separately and their ids
concatenated, so the boundary is exact: labels are ``-100`` over the prompt (and over padding) and the response
ids after it, and the loss is computed on the response only.

Prompt formats:

* **Chat template** (the tokenizer has ``chat_template`` set, and ``use_chat_template`` is not ``False``): the
  prompt is ``tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)``; the
  response is the assistant's text followed by the eos token.
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

from datamodules._base import TokenizedDataModule, check_positive, utf8_error

__all__ = ["InstructionDataModule", "InstructionCollator", "read_instruction_records"]

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")
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
        FileNotFoundError: The file does not exist.
        ValueError: An unsupported extension, bytes that are not UTF-8, or invalid JSON (naming file and line).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _EXTENSIONS:
        raise ValueError(f"unsupported file extension {path.suffix!r} for {path}; expected one of {_EXTENSIONS}")
    if not path.is_file():
        raise FileNotFoundError(f"instruction data file not found: {path}")
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
            raise ValueError(f"{path}, line {err.lineno}, column {err.colno}: not valid JSON ({err.msg})") from None
        return [(f"{path}, record {i}", row) for i, row in enumerate(rows)]
    out = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}, line {line_no}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {line_no}: not valid JSON ({err.msg})") from None
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
        if self.keep_index:
            batch["example_index"] = torch.tensor([f["example_index"] for f in features], dtype=torch.long)
        return batch


# ----------------------------------------------------------------------------------------------- the module
class InstructionDataModule(TokenizedDataModule):
    """Instruction/response pairs for supervised fine-tuning of decoder-only (causal) language models.

    Data comes from local files (``train_file``/``validation_file``: ``.jsonl``, ``.json`` holding a list of
    records, or ``.csv`` with a header line) or, without files, from the hub dataset ``dataset_name``. A record
    is either Alpaca style (``instruction``, optional ``input``, ``output``) or a chat: a ``messages`` list of
    ``{"role": "system"|"user"|"assistant", "content": str}`` whose last message, from the assistant, is the
    response (in a CSV file the ``messages`` cell holds the list as JSON). See the module docs for the prompt
    formats: the tokenizer's chat template when it has one, an Alpaca-style plain text otherwise.

    Batches hold ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on prompt tokens and padding), padded
    per batch with the tokenizer's pad token (its eos token without one). Validation batches also carry
    ``example_index``: ``eval_references(split)[i]`` is the reference response of ``example_index == i`` and
    ``eval_prompts(split)[i]`` its prompt, for generation-based evaluation. Remove it before calling the model.

    With ``packing``, training examples are concatenated, in order and whole, into sequences of at most
    ``max_seq_length`` tokens; their labels are concatenated too (each keeps its ``-100`` prompt), so no label
    crosses examples. The attention mask is all ones inside a packed sequence: examples in one sequence can
    attend to earlier ones, as in the usual packing recipes. Validation is never packed.

    Args:
        tokenizer: Hub name or local folder for ``AutoTokenizer``, or a loaded tokenizer. It needs an eos token
            (or, for BERT-style tokenizers, a sep token, used instead).
        train_file: Local training file.
        validation_file: Local validation file (optional).
        dataset_name: Hub dataset id, used when no local file is given.
        dataset_config: Configuration of the hub dataset, if it has several.
        train_split: Hub split used for training.
        validation_split: Hub split used for validation; ``None`` for none.
        instruction_column: Column of the instruction (Alpaca records).
        input_column: Column of the optional input (Alpaca records; missing or empty means no input).
        output_column: Column of the response (Alpaca records).
        messages_column: Column of the chat messages; a record that has it is read as a chat.
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
        batch_size: Training batch size.
        **kwargs: ``eval_batch_size``, ``num_workers``, ``max_train_samples``, ``max_eval_samples`` and
            ``cache_dir``, as documented in :class:`~datamodules._base.TokenizedDataModule`.

    Raises:
        ValueError: No data source, an unsupported file extension, ``packing`` without ``max_seq_length``, or a
            ``max_seq_length`` below ``min_prompt_tokens + min_response_tokens``. At :meth:`setup`: an empty
            file, or a malformed record (the message names the file, the line or record, and the column).
        FileNotFoundError: A data file that does not exist.
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        train_file: str | None = None,
        validation_file: str | None = None,
        dataset_name: str | None = None,
        dataset_config: str | None = None,
        train_split: str = "train",
        validation_split: str | None = "validation",
        instruction_column: str = "instruction",
        input_column: str = "input",
        output_column: str = "output",
        messages_column: str = "messages",
        instruction: str | None = None,
        use_chat_template: bool | None = None,
        max_seq_length: int | None = 1024,
        min_response_tokens: int = 1,
        min_prompt_tokens: int = 0,
        packing: bool = False,
        batch_size: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(tokenizer=tokenizer, batch_size=batch_size, **kwargs)
        self.files: dict[str, Path] = {
            split: Path(f) for split, f in zip(SPLITS, (train_file, validation_file), strict=True) if f is not None
        }
        for path in self.files.values():
            if path.suffix.lower() not in _EXTENSIONS:
                raise ValueError(
                    f"unsupported file extension {path.suffix!r} for {path}; expected one of {_EXTENSIONS}"
                )
            if not path.is_file():
                raise FileNotFoundError(f"instruction data file not found: {path}")
        if self.files and "train" not in self.files:
            raise ValueError("local instruction data needs train_file (validation_file alone is not enough)")
        if not self.files and dataset_name is None:
            raise ValueError("no instruction data: give train_file (and validation_file) or dataset_name")
        check_positive("max_seq_length", max_seq_length, allow_none=True)
        check_positive("min_response_tokens", min_response_tokens)
        if isinstance(min_prompt_tokens, bool) or not isinstance(min_prompt_tokens, int) or min_prompt_tokens < 0:
            raise ValueError(f"min_prompt_tokens must be a non-negative integer, got {min_prompt_tokens!r}")
        if max_seq_length is not None and max_seq_length < min_prompt_tokens + min_response_tokens:
            raise ValueError(
                f"max_seq_length={max_seq_length} cannot hold min_prompt_tokens={min_prompt_tokens} plus "
                f"min_response_tokens={min_response_tokens}; raise --data.max_seq_length"
            )
        if packing and max_seq_length is None:
            raise ValueError("packing needs max_seq_length (the length of the packed sequences)")
        self.dataset_name = dataset_name
        self.dataset_config = dataset_config
        self.splits = {"train": train_split, "validation": validation_split}
        self.instruction_column = instruction_column
        self.input_column = input_column
        self.output_column = output_column
        self.messages_column = messages_column
        if instruction is not None and not instruction.strip():
            raise ValueError("instruction must be a non-empty text (or None to read it from instruction_column)")
        self.instruction = instruction
        self.use_chat_template = use_chat_template
        self.max_seq_length = max_seq_length
        self.min_response_tokens = min_response_tokens
        self.min_prompt_tokens = min_prompt_tokens
        self.packing = packing
        self._examples: dict[str, list[_Example]] = {}
        self._prompts: dict[str, list[str]] = {}
        self._prompt_ids: dict[str, list[list[int]]] = {}
        self._features: dict[str, list[dict[str, Any]]] = {}

    # ------------------------------------------------------------------ tokenizer
    def _check_tokenizer(self, tokenizer: Any) -> None:
        if self._eos_id(tokenizer) is None:
            raise ValueError("the tokenizer has neither an eos nor a sep token to end the responses with")
        if self.use_chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError("use_chat_template=True but the tokenizer has no chat_template")

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

    # ------------------------------------------------------------------ sources
    def available_splits(self) -> tuple[str, ...]:
        """Splits with data: those with a local file, or the hub splits that are set."""
        if self.files:
            return tuple(s for s in SPLITS if s in self.files)
        return tuple(s for s in SPLITS if self.splits[s] is not None)

    def _resolve_split(self, split: str) -> str:
        split = {"val": "validation", "valid": "validation", "dev": "validation", "test": "validation"}.get(
            split, split
        )
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if split not in self.available_splits():
            raise ValueError(f"no {split} data: pass {split}_file (or a hub dataset with that split)")
        return split

    def _records(self, split: str) -> list[tuple[str, Any]]:
        limit = self._sample_limit(split)
        if self.files:
            path = self.files[split]
            records = read_instruction_records(path)[:limit]
            if not records:
                raise ValueError(f"{path}: the file has no examples")
            return records
        ds = self._hub_dataset(
            self.dataset_name, self.dataset_name, self.dataset_config, split=self.splits[split],
            hint="pass local files: --data.train_file /path/to/train.jsonl",
        )
        ds = self._first_rows(ds, split)
        if len(ds) == 0:
            raise ValueError(f"{self.dataset_name} [{self.splits[split]}]: the split has no examples")
        return [(f"{self.dataset_name} [{self.splits[split]}], row {i}", row) for i, row in enumerate(ds)]

    def _parse(self, where: str, row: Any) -> _Example:
        """Validate one record into an :class:`_Example`; errors name ``where`` and the column."""
        if not isinstance(row, dict):
            raise ValueError(f"{where}: the record is a {type(row).__name__}, expected an object")
        col = self.messages_column
        if row.get(col) not in (None, ""):
            messages = row[col]
            if isinstance(messages, str):
                try:
                    messages = json.loads(messages)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{where}, column {col!r}: not a JSON list of messages ({err.msg})") from None
            if not isinstance(messages, list) or len(messages) < 2:
                raise ValueError(
                    f"{where}, column {col!r}: expected a list of at least two messages (a prompt and the "
                    f"assistant's response), got {messages!r:.80}"
                )
            for i, m in enumerate(messages):
                if not isinstance(m, dict) or m.get("role") not in ROLES:
                    raise ValueError(f"{where}, column {col!r}, message {i}: expected a role in {ROLES}, got {m!r:.80}")
                if not isinstance(m.get("content"), str):
                    raise ValueError(
                        f"{where}, column {col!r}, message {i}: 'content' must be a string, "
                        f"got {type(m.get('content')).__name__}"
                    )
            if messages[-1]["role"] != "assistant":
                raise ValueError(
                    f"{where}, column {col!r}: the last message must be the assistant's response, "
                    f"got role {messages[-1]['role']!r}"
                )
            prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
            return _Example(where, prompt, "", "", messages[-1]["content"])
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
                    raise ValueError(f"{where}: column {name!r} {state} (columns: {list(row)}); a record needs {needs}")
                value = ""
            if not isinstance(value, str):
                raise ValueError(f"{where}, column {name!r}: expected a string, got {type(value).__name__}")
            values[name] = value
        instruction = self.instruction if self.instruction is not None else values[self.instruction_column]
        return _Example(where, None, instruction, values[self.input_column], values[self.output_column])

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
        eos = self._eos_id(self.tokenizer)
        prompt_ids = [prefix + ids for ids in self._ids(prompts)]
        response_ids = [ids + [eos] for ids in self._ids([e.response for e in examples])]
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
        """Concatenate whole examples, in order, into sequences of at most ``max_seq_length`` tokens."""
        packed: list[dict[str, Any]] = []
        ids: list[int] = []
        labels: list[int] = []
        for f in features:
            if ids and len(ids) + len(f["input_ids"]) > self.max_seq_length:
                packed.append({"input_ids": ids, "labels": labels})
                ids, labels = [], []
            ids = ids + f["input_ids"]
            labels = labels + f["labels"]
        if ids:
            packed.append({"input_ids": ids, "labels": labels})
        return packed

    # ------------------------------------------------------------------ lightning hooks
    def prepare_data(self) -> None:
        """Download the tokenizer and the hub dataset into the cache (local files need nothing)."""
        self._download_tokenizer()
        if not self.files:
            for split in self.available_splits():
                self._hub_dataset(
                    self.dataset_name, self.dataset_name, self.dataset_config, split=self.splits[split],
                    hint="pass local files: --data.train_file /path/to/train.jsonl",
                )

    def setup(self, stage: str | None = None) -> None:
        """Read, check and tokenize the splits ``stage`` needs (all available splits when ``stage`` is None)."""
        _ = self.tokenizer  # no tokenizer, or one without eos, fails before any reading
        wanted = {"fit": SPLITS, "validate": ("validation",), "test": ("validation",)}.get(stage, SPLITS)
        for split in wanted:
            if split in self.available_splits():
                self._ensure(split)

    def _ensure_examples(self, split: str) -> str:
        split = self._resolve_split(split)
        if split not in self._examples:
            self._examples[split] = [self._parse(where, row) for where, row in self._records(split)]
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
        ``example_index``)."""
        return self._features[self._ensure(split)]

    def eval_prompts(self, split: str = "validation") -> list[str]:
        """Prompt texts of ``split`` (formatted, untruncated), indexed by the batches' ``example_index``."""
        return self._prompts[self._ensure(split)]

    def eval_prompt_ids(self, split: str = "validation") -> list[list[int]]:
        """Token ids of :meth:`eval_prompts` (untruncated; bos first in the plain format), for ``generate``."""
        return self._prompt_ids[self._ensure(split)]

    def eval_references(self, split: str = "validation") -> list[str]:
        """Reference responses of ``split`` (without eos), indexed by the batches' ``example_index``."""
        return [e.response for e in self._examples[self._ensure_examples(split)]]

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
        """The validation loader again (instruction data has no separate test split here)."""
        return self._loader("validation")
