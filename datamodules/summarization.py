"""Abstractive summarization data (XSum, CNN/DailyMail, or local JSONL/CSV files) for seq2seq models."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from adalora_pl.errors import ConfigError, MissingFileError
from datamodules._base import TokenizedDataModule, check_positive, untruncated_lengths, utf8_error

log = logging.getLogger(__name__)

# name -> (hub id, hub config, text column, summary column)
DATASETS: dict[str, tuple[str, str | None, str, str]] = {
    "xsum": ("EdinburghNLP/xsum", None, "document", "summary"),
    "cnn_dailymail": ("abisee/cnn_dailymail", "3.0.0", "article", "highlights"),
}
SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation"}
_EXTENSIONS = (".jsonl", ".json", ".csv")
ID_COLUMN = "id"
# Transient columns: untruncated token counts, to report truncation.
_FULL_SOURCE, _FULL_TARGET = "_source_length", "_target_length"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file (one object per line, blank lines skipped).

    A ``.json`` file whose content is a single JSON array of objects is accepted as well.
    """
    text = _read_text(path, "utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(
                f"{path}, line {err.lineno}, column {err.colno}: not valid JSON ({err.msg}); "
                "a file that ends early is probably an incomplete download"
            ) from None
    else:
        rows = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}: line {line_no} is not valid JSON ({err.msg})") from err
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ConfigError(f"{path}: record {i} is a {type(row).__name__}, expected a JSON object")
    return rows


def _read_text(path: Path, encoding: str) -> str:
    """The whole file; bytes that are not UTF-8 raise a ConfigError naming the file and line."""
    try:
        with path.open(encoding=encoding, newline="") as f:  # newline="": csv sees quoted newlines as written
            return f.read()
    except UnicodeDecodeError as err:
        raise utf8_error(path, err) from None


def _read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV file with a header line; quoted fields may span several lines."""
    text = _read_text(path, "utf-8-sig")
    return list(csv.DictReader(io.StringIO(text, newline="")))


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a ``.jsonl``/``.json`` (one JSON object per line) or ``.csv`` file into a list of dicts.

    Raises:
        MissingFileError: If the file does not exist (a ``FileNotFoundError`` too).
        ConfigError: If the extension is not one of ``.jsonl``, ``.json``, ``.csv``, or the file is not UTF-8
            or not valid JSON (the message names the file and the line).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _EXTENSIONS:
        raise ConfigError(
            f"unsupported file extension {path.suffix!r} for {path}; expected one of {', '.join(_EXTENSIONS)}"
        )
    if not path.is_file():
        raise MissingFileError(f"summarization data file not found: {path}")
    return _read_csv(path) if suffix == ".csv" else _read_jsonl(path)


def _as_text(value: Any) -> str:
    return "" if value is None else str(value)


class _Collator:
    """``DataCollatorForSeq2Seq`` plus, for evaluation, an ``example_index`` long tensor."""

    def __init__(self, seq2seq_collator: Any, keep_index: bool) -> None:
        self.seq2seq_collator = seq2seq_collator
        self.keep_index = keep_index

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        indices = [f["example_index"] for f in features]
        batch = self.seq2seq_collator(
            [{k: v for k, v in f.items() if k != "example_index"} for f in features]
        )
        batch = dict(batch)
        if self.keep_index:
            batch["example_index"] = torch.tensor(indices, dtype=torch.long)
        return batch


class SummarizationDataModule(TokenizedDataModule):
    """Document/summary pairs tokenized for encoder-decoder models (XSum, CNN/DailyMail, local files).

    Data comes either from the Hugging Face hub (``dataset`` set and no file given: XSum is
    ``EdinburghNLP/xsum`` with columns ``document``/``summary``; CNN/DailyMail is
    ``abisee/cnn_dailymail`` config ``3.0.0`` with columns ``article``/``highlights``) or from local
    files (any of ``train_file``/``validation_file``/``test_file`` given; then only those splits
    exist, and no download happens). Local files are ``.jsonl``/``.json`` (one JSON object per line)
    or ``.csv`` with a header line (parsed with :mod:`csv`, so quoted fields may hold newlines).
    Column names default from ``dataset`` and are overridden by ``text_column``/``summary_column``.
    An ``id`` column is used for the example ids when present, else the row number.

    Inputs are ``source_prefix + text`` truncated to ``max_source_length`` tokens; labels are the
    summary tokenized with ``tokenizer(text_target=...)`` truncated to ``max_target_length``.
    Batches come from :class:`transformers.DataCollatorForSeq2Seq`: ``input_ids``,
    ``attention_mask`` and ``labels`` (padded with -100), plus ``decoder_input_ids`` if a model is
    attached with :meth:`set_collator_model`. Validation and test batches also carry
    ``example_index`` (long): the position of each example in its split, so
    ``eval_references(split)[i]`` is the reference summary of ``example_index == i``. Remove it
    before calling the model. Token type ids are never produced (seq2seq models do not take them).

    Empty documents are kept, not dropped: real XSum has such rows, and dropping them would change
    the evaluation set silently. They are encoded as the tokenizer's special tokens only (plus the
    prefix, if any), and :meth:`setup` logs, per split, how many there are and their ids. Empty
    summaries are kept and logged the same way. ``None`` values count as empty text.

    Args:
        dataset: ``"xsum"``, ``"cnn_dailymail"``, or ``None`` for local files with explicit columns.
        tokenizer: Hub name or local folder for :class:`transformers.AutoTokenizer` (the CLI links it
            to the model's backbone).
        train_file: Local training file.
        validation_file: Local validation file.
        test_file: Local test file; when absent, testing uses the validation split.
        text_column: Column holding the document (default from ``dataset``).
        summary_column: Column holding the reference summary (default from ``dataset``).
        source_prefix: String put before every document (e.g. ``"summarize: "`` for T5).
        max_source_length: Maximum input length in tokens (longer inputs are truncated; :meth:`setup` logs the
            share per split, and refuses a length that holds only the special tokens and prefix).
        max_target_length: Maximum label length in tokens (likewise for the summaries).
        batch_size: Training batch size.
        **kwargs: ``eval_batch_size``, ``num_workers``, ``max_train_samples``, ``max_eval_samples`` (for the
            validation and the test split) and ``cache_dir`` (hub datasets and tokenizer), as documented in
            :class:`~datamodules._base.TokenizedDataModule`.

    Raises:
        ConfigError: For an unknown ``dataset``, an unsupported file extension, no data source,
            missing column names, or a length or size that is not a positive integer; at :meth:`setup`, for
            a column missing from a file.
        MissingFileError: For a data file that does not exist (a ``FileNotFoundError`` too).
    """

    def __init__(
        self,
        dataset: str | None = "xsum",
        tokenizer: str | None = None,
        train_file: str | None = None,
        validation_file: str | None = None,
        test_file: str | None = None,
        text_column: str | None = None,
        summary_column: str | None = None,
        source_prefix: str = "",
        max_source_length: int = 1024,
        max_target_length: int = 128,
        batch_size: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(tokenizer=tokenizer, batch_size=batch_size, **kwargs)
        if dataset is not None and dataset not in DATASETS:
            raise ConfigError(
                f"unknown summarization dataset {dataset!r}; expected one of {sorted(DATASETS)} or None"
            )
        self.files: dict[str, Path] = {
            split: Path(f)
            for split, f in zip(SPLITS, (train_file, validation_file, test_file), strict=True)
            if f is not None
        }
        for split, path in self.files.items():
            if path.suffix.lower() not in _EXTENSIONS:
                raise ConfigError(
                    f"{split}_file: unsupported file extension {path.suffix!r} for {path}; "
                    f"expected one of {', '.join(_EXTENSIONS)}"
                )
            if not path.is_file():
                raise MissingFileError(f"{split}_file: summarization data file not found: {path}")
        if dataset is None and not self.files:
            raise ConfigError(
                "no summarization data: set dataset ('xsum' or 'cnn_dailymail') or give local files"
            )
        defaults = DATASETS[dataset][2:] if dataset is not None else (None, None)
        self.text_column = text_column or defaults[0]
        self.summary_column = summary_column or defaults[1]
        if self.text_column is None or self.summary_column is None:
            raise ConfigError("dataset=None needs text_column and summary_column to name the file columns")
        check_positive("max_source_length", max_source_length)
        check_positive("max_target_length", max_target_length)

        self.dataset_name = dataset
        self.source_prefix = source_prefix
        self.max_source_length = max_source_length
        self.max_target_length = max_target_length

        self.collator_model: Any = None
        self._raw: dict[str, dict[str, list[str]]] = {}  # split -> {"id", "text", "summary"}
        self._tokenized: dict[str, Any] = {}  # split -> datasets.Dataset
        self._hub: Any = None  # the hub DatasetDict, once loaded

    # ------------------------------------------------------------------ sources
    @property
    def uses_local_files(self) -> bool:
        return bool(self.files)

    def available_splits(self) -> tuple[str, ...]:
        """Splits with data: the hub's three, or those with a local file."""
        return SPLITS if not self.uses_local_files else tuple(s for s in SPLITS if s in self.files)

    def _resolve_split(self, split: str) -> str:
        split = _SPLIT_ALIASES.get(split, split)
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; expected one of {SPLITS}")
        if split == "test" and "test" not in self.available_splits():
            split = "validation"  # no test file: test on the validation data
        if split not in self.available_splits():
            raise ConfigError(f"no {split} data: pass {split}_file (local files given: {sorted(self.files)})")
        return split

    def _load_hub(self) -> Any:
        if self._hub is None:
            hub_id, config, _, _ = DATASETS[self.dataset_name]
            self._hub = self._hub_dataset(
                self.dataset_name, hub_id, config,
                hint="pass local files: --data.train_file /path/to/train.jsonl "
                "--data.validation_file /path/to/validation.jsonl",
            )
        return self._hub

    def _columns_of(self, split: str) -> dict[str, list[str]]:
        """``{"id", "text", "summary"}`` lists of one split, after ``max_*_samples``."""
        if self.uses_local_files:
            path = self.files[split]
            rows = read_records(path)[: self._sample_limit(split)]  # [:None] keeps every row
            if not rows:
                raise ConfigError(f"{path}: the file has no examples")
            for col in (self.text_column, self.summary_column):
                bad = next((i for i, row in enumerate(rows) if col not in row), None)
                if bad is not None:
                    where = "" if bad == 0 else f" from record {bad}"
                    raise ConfigError(
                        f"{path}: column {col!r} is missing{where} (columns: {list(rows[bad])}); "
                        "set text_column/summary_column to the file's column names"
                    )
            ids = [_as_text(row.get(ID_COLUMN, i)) for i, row in enumerate(rows)]
            texts = [_as_text(row[self.text_column]) for row in rows]
            summaries = [_as_text(row[self.summary_column]) for row in rows]
        else:
            ds = self._first_rows(self._load_hub()[split], split)
            for col in (self.text_column, self.summary_column):
                if col not in ds.column_names:
                    raise ConfigError(
                        f"{DATASETS[self.dataset_name][0]} [{split}]: column {col!r} is missing "
                        f"(columns: {ds.column_names})"
                    )
            n = len(ds)
            ids = (
                [_as_text(x) for x in ds[ID_COLUMN]]
                if ID_COLUMN in ds.column_names
                else [str(i) for i in range(n)]
            )
            texts = [_as_text(x) for x in ds[self.text_column]]
            summaries = [_as_text(x) for x in ds[self.summary_column]]
        source = str(self.files[split]) if self.uses_local_files else f"{DATASETS[self.dataset_name][0]} [{split}]"
        for kind, column, values in (("documents", self.text_column, texts),
                                     ("summaries", self.summary_column, summaries)):
            empty = [ids[i] for i, v in enumerate(values) if not v.strip()]
            if empty:
                # Kept, never dropped (that would change the evaluation set silently), and never silent: the
                # instruction data module warns the same way about empty responses.
                shown = ", ".join(empty[:20]) + (", ..." if len(empty) > 20 else "")
                log.warning(
                    "summarization %s: %d of %d %s are empty (%s, column %r; ids: %s); kept, encoded as special "
                    "tokens only",
                    split,
                    len(empty),
                    len(values),
                    kind,
                    source,
                    column,
                    shown,
                )
        return {"id": ids, "text": texts, "summary": summaries}

    # ------------------------------------------------------------------ lightning hooks
    def prepare_data(self) -> None:
        """Download the hub dataset and tokenizer into the cache (local files need nothing)."""
        self._download_tokenizer()
        if not self.uses_local_files:
            self._load_hub()

    def _check_lengths(self) -> None:
        """Refuse lengths that leave no token of document or summary once special tokens (and prefix) are in."""
        fixed_source = len(self.tokenizer(self.source_prefix)["input_ids"])  # special tokens + prefix
        fixed_target = len(self.tokenizer(text_target="")["input_ids"])  # special tokens
        for name, value, fixed, what in (
            ("max_source_length", self.max_source_length, fixed_source, "special tokens and source_prefix"),
            ("max_target_length", self.max_target_length, fixed_target, "special tokens"),
        ):
            if value <= fixed:
                raise ConfigError(
                    f"{name}={value} leaves no room for text: the {what} already take {fixed} tokens; "
                    f"set --data.{name} to at least {fixed + 1} (the configs use 64 to 1024)"
                )

    def setup(self, stage: str | None = None) -> None:
        """Read and tokenize the splits ``stage`` needs (all available splits when ``stage`` is None)."""
        self._check_lengths()  # loads the tokenizer: no tokenizer, or no room for text, fails before any reading
        wanted = {
            "fit": ("train", "validation"),
            "validate": ("validation",),
            "test": ("test",),
            "predict": ("test",),
        }.get(stage, SPLITS)
        for split in wanted:
            try:
                self._resolve_split(split)
            except ConfigError:
                continue  # this split has no data; its dataloader raises a clear error if asked for
            self._ensure_split(split)

    def _ensure_raw(self, split: str) -> str:
        split = self._resolve_split(split)
        if split not in self._raw:
            self._raw[split] = self._columns_of(split)
        return split

    def _ensure_split(self, split: str) -> str:
        split = self._ensure_raw(split)
        if split not in self._tokenized:
            self._tokenized[split] = self._tokenize(split, self._raw[split])
        return split

    def _tokenize(self, split: str, columns: dict[str, list[str]]) -> Any:
        from datasets import Dataset

        self._check_lengths()
        ds = Dataset.from_dict(
            {
                "example_index": list(range(len(columns["id"]))),
                "text": columns["text"],
                "summary": columns["summary"],
            }
        )
        tokenizer, prefix = self.tokenizer, self.source_prefix

        def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
            sources = [prefix + text for text in batch["text"]]
            model_inputs = tokenizer(
                sources,
                max_length=self.max_source_length,
                truncation=True,
                return_token_type_ids=False,
            )
            labels = tokenizer(
                text_target=batch["summary"],
                max_length=self.max_target_length,
                truncation=True,
                return_token_type_ids=False,
            )
            return {
                "input_ids": model_inputs["input_ids"],
                "attention_mask": model_inputs["attention_mask"],
                "labels": labels["input_ids"],
                _FULL_SOURCE: untruncated_lengths(tokenizer, sources),
                _FULL_TARGET: untruncated_lengths(tokenizer, text_target=batch["summary"]),
            }

        ds = ds.map(encode, batched=True, remove_columns=["text", "summary"], desc="Tokenizing")
        for column, kind, limit, option in (
            (_FULL_SOURCE, "documents", self.max_source_length, "max_source_length"),
            (_FULL_TARGET, "summaries", self.max_target_length, "max_target_length"),
        ):
            self._warn_truncated(f"summarization {split}", kind, ds[column], limit, option)
        return ds.remove_columns([_FULL_SOURCE, _FULL_TARGET])

    # ------------------------------------------------------------------ access
    def tokenized(self, split: str) -> Any:
        """The tokenized ``datasets.Dataset`` of ``split``.

        Columns: ``example_index``, ``input_ids``, ``attention_mask``, ``labels``.
        """
        return self._tokenized[self._ensure_split(split)]

    def eval_references(self, split: str = "validation") -> list[str]:
        """Reference summaries of ``split``, indexed by the batches' ``example_index``."""
        return self._raw[self._ensure_raw(split)]["summary"]

    def eval_documents(self, split: str = "validation") -> list[str]:
        """Raw (un-prefixed, untruncated) documents of ``split``, indexed by ``example_index``."""
        return self._raw[self._ensure_raw(split)]["text"]

    def example_ids(self, split: str = "validation") -> list[str]:
        """Example ids of ``split`` (the ``id`` column, or the row number as a string)."""
        return self._raw[self._ensure_raw(split)]["id"]

    def set_collator_model(self, model: Any) -> None:
        """Give ``DataCollatorForSeq2Seq`` a model so batches carry ``decoder_input_ids`` (optional)."""
        self.collator_model = model

    def collator(self, keep_index: bool) -> _Collator:
        """``DataCollatorForSeq2Seq`` for this tokenizer; ``keep_index`` adds the ``example_index`` of eval batches."""
        from transformers import DataCollatorForSeq2Seq

        base = DataCollatorForSeq2Seq(self.tokenizer, model=self.collator_model, label_pad_token_id=-100)
        return _Collator(base, keep_index=keep_index)

    def _loader(self, split: str) -> DataLoader:
        train = split == "train"
        return self._dataloader(self.tokenized(split), train=train, collate_fn=self.collator(keep_index=not train))

    def train_dataloader(self) -> DataLoader:
        """The training loader (shuffled)."""
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        """The validation loader; batches carry ``example_index``."""
        return self._loader("validation")

    def test_dataloader(self) -> DataLoader:
        """The test loader (the validation data when there is no test file); batches carry ``example_index``."""
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        """The test loader (generation over the test file, or the validation data without one)."""
        return self.test_dataloader()
