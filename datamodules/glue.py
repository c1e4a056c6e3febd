"""GLUE data for sequence classification: one LightningDataModule for all eight tasks.

The data comes either from the Hugging Face hub (``nyu-mll/glue``) or from a folder with the original
GLUE TSV files (the layout that GLUE's ``download_glue_data.py`` writes). Both sources end up as
``datasets.Dataset`` objects with the hub's column names and label ids, so everything after loading
is shared: tokenization with ``Dataset.map`` (truncation only) and dynamic padding per batch.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets
from torch.utils.data import DataLoader

from adalora_pl.errors import ConfigError, MissingFileError
from adalora_pl.tasks.glue import GlueTask, get_glue_task
from datamodules._base import TokenizedDataModule, check_positive, untruncated_lengths, utf8_error

HUB_DATASET = "nyu-mll/glue"
LABEL_COLUMN = "labels"
#: Row number of an evaluation example, carried in its batches: under DDP the distributed sampler repeats rows to
#: even out the processes, and the metrics drop the repeats by this index (adalora_pl.tasks.metrics).
EXAMPLE_INDEX_COLUMN = "example_index"
_FULL_LENGTH = "_full_length"  # transient column: token count before truncation, to report it
STSB_SCORE_RANGE = (0.0, 5.0)


def _parse_label(task: GlueTask, raw: str, where: str) -> int | float:
    """Label id (classification) or score (STS-B) of one TSV field; ``where`` names file and line."""
    if task.tsv_labels is not None:
        try:
            return task.tsv_labels.index(raw)
        except ValueError:
            raise ConfigError(
                f"{where}: label {raw!r} in column {task.tsv_label_column!r} is not one of "
                f"{list(task.tsv_labels)}"
            ) from None
    low, high = STSB_SCORE_RANGE
    try:
        score = float(raw)
    except ValueError:
        score = math.nan
    if not low <= score <= high:  # also catches nan
        raise ConfigError(
            f"{where}: score {raw!r} in column {task.tsv_label_column!r} is not a number in [{low}, {high}]"
        )
    return score


def read_glue_tsv(path: str | Path, task: GlueTask | str) -> dict[str, list[Any]]:
    """Read one GLUE TSV file into columns: the task's hub text columns plus ``"label"``.

    Files are read as GLUE's own processors read them: tab separated, ``csv.QUOTE_NONE`` (bare
    ``"`` characters are text), ``utf-8-sig`` (MRPC's header starts with a byte order mark). Texts
    are kept exactly as written (SST-2 sentences end in a space). Every line is a row: nothing is
    skipped.

    Args:
        path: The TSV file.
        task: A :class:`GlueTask` or a task name.

    Returns:
        ``{text column: [str, ...], ..., "label": [int or float, ...]}`` in file order.

    Raises:
        adalora_pl.errors.MissingFileError: ``path`` does not exist (a ``FileNotFoundError``).
        ConfigError: The file has no examples (empty, or a header only), is not UTF-8, a required
            column is missing from the header, a line has the wrong number of fields, or a label is
            outside the task's label set (or an STS-B score is not a number in [0, 5]). The message
            names the file, the 1-based line number and the offending value.
    """
    task = task if isinstance(task, GlueTask) else get_glue_task(task)
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"GLUE {task.name} file not found: {path}")
    try:
        columns = _read_tsv_columns(path, task)
    except UnicodeDecodeError as err:
        raise utf8_error(path, err) from None
    if not columns["label"]:
        # Zero rows would only surface much later, as a scheduler without steps ("pass total_step=").
        what = "the file is empty" if path.stat().st_size == 0 else "it holds no line after the header"
        raise ConfigError(f"{path} has no examples ({what}); GLUE {task.name} needs one example per line")
    return columns


def _read_tsv_columns(path: Path, task: GlueTask) -> dict[str, list[Any]]:
    columns: dict[str, list[Any]] = {name: [] for name in (*task.text_columns, "label")}
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        fieldnames = task.tsv_fieldnames
        if fieldnames is None:
            fieldnames = tuple(next(reader, ()))
            if not fieldnames:
                return columns  # an empty file: read_glue_tsv says so
            wanted = (*task.tsv_text_columns, task.tsv_label_column)
            missing = [name for name in wanted if name not in fieldnames]
            if missing:
                raise ConfigError(
                    f"{path}, line 1: header {list(fieldnames)} lacks column(s) {missing} "
                    f"(GLUE {task.name} needs {list(wanted)})"
                )
        text_idx = [fieldnames.index(name) for name in task.tsv_text_columns]
        label_idx = fieldnames.index(task.tsv_label_column)
        for fields in reader:
            where = f"{path}, line {reader.line_num}"
            if len(fields) != len(fieldnames):
                raise ConfigError(
                    f"{where}: expected {len(fieldnames)} tab-separated fields {list(fieldnames)}, "
                    f"got {len(fields)}: {repr(fields)[:300]}"
                )
            for name, idx in zip(task.text_columns, text_idx, strict=True):
                columns[name].append(fields[idx])
            columns["label"].append(_parse_label(task, fields[label_idx], where))
    return columns


def glue_features(task: GlueTask) -> datasets.Features:
    """Column types of a raw GLUE split (the hub's, minus ``idx``)."""
    features = {name: datasets.Value("string") for name in task.text_columns}
    if task.is_regression:
        features["label"] = datasets.Value("float32")
    else:
        features["label"] = datasets.ClassLabel(names=list(task.label_names))
    return datasets.Features(features)


def resolve_task_dir(data_dir: str | Path, task: GlueTask) -> Path:
    """The folder with ``task``'s TSV files: ``data_dir/<folder>`` when it exists, else ``data_dir``.

    So ``data_dir`` may be either the GLUE root (holding ``CoLA/``, ``SST-2/``, ...) or the task folder.
    """
    nested = Path(data_dir) / task.folder
    return nested if nested.is_dir() else Path(data_dir)


def load_tsv_split(data_dir: str | Path, task: GlueTask, split: str) -> datasets.Dataset:
    """One split read from GLUE TSV files as a ``datasets.Dataset`` (columns as on the hub)."""
    path = resolve_task_dir(data_dir, task) / task.file_name(split)
    if not path.is_file():
        raise MissingFileError(
            f"GLUE {task.name} split {split!r} needs {path}, which does not exist "
            f"(expected files: {[file for _, file in task.split_files]})"
        )
    return datasets.Dataset.from_dict(read_glue_tsv(path, task), features=glue_features(task))


class GLUEDataModule(TokenizedDataModule):
    """GLUE (CoLA, SST-2, MRPC, QQP, STS-B, MNLI, QNLI, RTE) for sequence classification.

    Rows come from the Hugging Face hub (``datasets.load_dataset("nyu-mll/glue", task)``) or, when
    ``data_dir`` is given, from the original GLUE TSV files (``train.tsv``, ``dev.tsv``; MNLI has
    ``dev_matched.tsv`` and ``dev_mismatched.tsv``). Label ids follow the hub's ``glue`` dataset;
    STS-B labels are float scores in [0, 5]. Texts are tokenized once with ``Dataset.map``
    (truncated to ``max_seq_length``, not padded) and padded per batch by
    ``transformers.DataCollatorWithPadding``.

    Batches are dicts with ``input_ids``, ``attention_mask``, ``token_type_ids`` (when the tokenizer
    makes them) and ``labels`` (``torch.long``, or ``torch.float`` for STS-B).

    GLUE's test labels are hidden, so the test and predict loaders serve the validation splits.
    For MNLI, the validation loaders are a list: matched first, then mismatched.

    Args:
        task_name: One of ``cola``, ``sst2``, ``mrpc``, ``qqp``, ``stsb``, ``mnli``, ``qnli``,
            ``rte`` (case, ``-`` and ``_`` are ignored: ``"SST-2"`` and ``"STS-B"`` work).
        tokenizer: Hub name or local folder for ``AutoTokenizer.from_pretrained``; normally the
            model's backbone. Required by :meth:`setup`.
        data_dir: Folder with the GLUE TSV files, either the task folder itself or the GLUE root
            holding it (``<data_dir>/CoLA/train.tsv`` ...). ``None`` loads from the hub.
        max_seq_length: Longest tokenized input; longer inputs are truncated, and :meth:`setup` logs the share
            of truncated examples per split. Below the special tokens plus one token per text it is refused.
        batch_size: Training batch size.
        **kwargs: ``eval_batch_size``, ``num_workers``, ``max_train_samples``, ``max_eval_samples`` and
            ``cache_dir``, as documented in :class:`~datamodules._base.TokenizedDataModule`.

    Raises:
        ConfigError: Unknown task name, or a size that is not a positive integer
            (``num_workers`` may be 0).
    """

    def __init__(
        self,
        task_name: str = "cola",
        tokenizer: str | None = None,
        data_dir: str | None = None,
        max_seq_length: int = 128,
        batch_size: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__(tokenizer=tokenizer, batch_size=batch_size, **kwargs)
        self.task = get_glue_task(task_name)
        check_positive("max_seq_length", max_seq_length)
        self.task_name = self.task.name
        self.data_dir = data_dir
        self.max_seq_length = max_seq_length
        self.collator = None
        self.datasets: dict[str, datasets.Dataset] = {}

    # ---- task facts -------------------------------------------------------------------------

    @property
    def num_labels(self) -> int:
        """Number of model outputs: classes, or 1 for STS-B."""
        return self.task.num_labels

    @property
    def is_regression(self) -> bool:
        """True for STS-B (a similarity score), False for the classification tasks."""
        return self.task.is_regression

    @property
    def label_names(self) -> tuple[str, ...] | None:
        """Class names in label-id order; ``None`` for STS-B."""
        return self.task.label_names

    @property
    def val_split_names(self) -> tuple[str, ...]:
        """Validation split names in loader order (two for MNLI: matched, mismatched)."""
        return self.task.val_split_names

    # ---- loading ----------------------------------------------------------------------------

    def _load_hub(self) -> datasets.DatasetDict:
        return self._hub_dataset(
            f"GLUE {self.task.name}", HUB_DATASET, self.task.name,
            hint=f"pass the GLUE TSV files: --data.data_dir /path/to/glue/{self.task.folder}",
        )

    def prepare_data(self) -> None:
        """Download the hub dataset and the tokenizer (once per node); nothing to do for TSV files."""
        if self.data_dir is None:
            self._load_hub()
        self._download_tokenizer()

    def _check_max_seq_length(self) -> None:
        """Refuse a length that leaves no token for some text once the special tokens are in."""
        pair = len(self.task.text_columns) == 2
        special = self.tokenizer.num_special_tokens_to_add(pair=pair)
        needed = special + len(self.task.text_columns)
        if self.max_seq_length < needed:
            raise ConfigError(
                f"max_seq_length={self.max_seq_length} cannot hold a GLUE {self.task.name} input: the tokenizer "
                f"adds {special} special tokens, which leaves {max(0, self.max_seq_length - special)} for "
                f"{len(self.task.text_columns)} text(s); set --data.max_seq_length to at least {needed} "
                "(128 keeps most GLUE examples whole)"
            )

    def _raw_splits(self, splits: list[str]) -> dict[str, datasets.Dataset]:
        if self.data_dir is not None:
            return {split: load_tsv_split(self.data_dir, self.task, split) for split in splits}
        hub = self._load_hub()
        missing = [split for split in splits if split not in hub]
        if missing:
            raise MissingFileError(f"hub dataset {HUB_DATASET}/{self.task.name} has no split(s) {missing}")
        raw = {}
        for split in splits:
            dataset = hub[split]
            if "idx" in dataset.column_names:  # hub-only row index; the TSV rows have none
                dataset = dataset.remove_columns("idx")
            raw[split] = dataset
        return raw

    def _tokenize(self, dataset: datasets.Dataset, split: str) -> datasets.Dataset:
        dataset = self._first_rows(dataset, split)
        text_columns = self.task.text_columns
        tokenizer = self.tokenizer

        evaluation = split != "train"

        def encode(batch: Mapping[str, list], indices: list[int]) -> dict[str, list]:
            texts = [batch[name] for name in text_columns]
            encoded = tokenizer(*texts, truncation=True, max_length=self.max_seq_length)
            extra = {EXAMPLE_INDEX_COLUMN: indices} if evaluation else {}
            return {**encoded, LABEL_COLUMN: batch["label"], **extra,
                    _FULL_LENGTH: untruncated_lengths(tokenizer, *texts)}

        encoded = dataset.map(
            encode, batched=True, with_indices=True, remove_columns=dataset.column_names,
            desc=f"Tokenizing {self.task.name}",
        )
        self._warn_truncated(
            f"GLUE {self.task.name} {split}", "examples", encoded[_FULL_LENGTH], self.max_seq_length,
            "max_seq_length", name_limit=True,
        )
        return encoded.remove_columns(_FULL_LENGTH)

    def setup(self, stage: str | None = None) -> None:
        """Read and tokenize the splits ``stage`` needs.

        ``"fit"`` (and ``None``) needs train and validation; ``"validate"``, ``"test"`` and
        ``"predict"`` need only the validation split(s). Splits already loaded are kept.

        Logs a warning per split with the share of examples that ``max_seq_length`` truncates.

        Raises:
            ConfigError: No tokenizer was given, ``max_seq_length`` cannot hold the special tokens and one
                token per text, or a TSV file is empty or malformed (see :func:`read_glue_tsv`).
            adalora_pl.errors.MissingFileError: A needed TSV file (or hub split) is missing; the message names
                it (a ``FileNotFoundError``).
            adalora_pl.io.pretrained.LoadError: The tokenizer folder does not exist, or the hub cannot be reached.
        """
        tokenizer = self.tokenizer  # first: without one, fail before reading (or downloading) any data
        needed = list(self.val_split_names)
        if stage in (None, "fit"):
            needed.insert(0, "train")
        needed = [split for split in needed if split not in self.datasets]
        if not needed:
            return
        raw = self._raw_splits(needed)  # reads (and checks) every file before tokenizing any
        if self.collator is None:
            from transformers import DataCollatorWithPadding

            self.collator = DataCollatorWithPadding(tokenizer)
        self._check_max_seq_length()
        for split, dataset in raw.items():
            self.datasets[split] = self._tokenize(dataset, split)

    # ---- loaders ----------------------------------------------------------------------------

    def _loader(self, split: str) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"split {split!r} is not loaded; call setup() for the right stage first")
        return self._dataloader(self.datasets[split], train=split == "train", collate_fn=self.collator)

    def _eval_loaders(self) -> DataLoader | list[DataLoader]:
        loaders = [self._loader(split) for split in self.val_split_names]
        return loaders if len(loaders) > 1 else loaders[0]

    def train_dataloader(self) -> DataLoader:
        """The training loader (shuffled)."""
        return self._loader("train")

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """The validation loader; for MNLI a list, matched then mismatched."""
        return self._eval_loaders()

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        """The validation loaders: GLUE's test labels are not public."""
        return self._eval_loaders()

    def predict_dataloader(self) -> DataLoader | list[DataLoader]:
        """The validation loaders, as for :meth:`test_dataloader`."""
        return self._eval_loaders()
