"""What the GLUE, SQuAD, summarization and instruction DataModules share, in one place.

The four differ in how they read and tokenize their examples. Everything around that is the same and lives
here: the loader arguments and their checks (:class:`TokenizedDataModule`), the tokenizer (loaded through
:mod:`adalora_pl.io.pretrained`, so a missing folder or an offline hub gets the same message everywhere),
hub downloads with an offline hint, the ``DataLoader`` settings, the truncation report, and the error for a
local file that is not UTF-8.

Wrong arguments and wrong files raise :class:`~adalora_pl.errors.ConfigError` (a missing file:
:class:`~adalora_pl.errors.MissingFileError`, also a ``FileNotFoundError``), which the CLI prints as one line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.accelerators import CUDAAccelerator
from torch.utils.data import DataLoader

from adalora_pl.errors import ConfigError, MissingFileError
from adalora_pl.io.pretrained import LoadError, check_tokenizer, load_pretrained

__all__ = [
    "ConfigError", "MissingFileError", "TokenizedDataModule", "check_positive", "pin_memory_for",
    "untruncated_lengths", "utf8_error",
]


def check_positive(name: str, value: int | None, *, allow_none: bool = False) -> None:
    """Raise ConfigError unless ``value`` is a positive int (or ``None`` when ``allow_none``).

    ``bool`` is refused although it is an ``int``: ``batch_size: true`` in a config is a mistake, not a batch of 1.
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def pin_memory_for(trainer: Any) -> bool:
    """Whether loaders feeding ``trainer`` pin their batches: on a CUDA accelerator only.

    Pinned (page-locked) host memory makes the copies to the GPU faster and lets them overlap with compute; on any
    other accelerator, or with no Trainer attached (``None``), it only costs memory.
    """
    return isinstance(getattr(trainer, "accelerator", None), CUDAAccelerator)


def utf8_error(path: Path, err: UnicodeDecodeError) -> ConfigError:
    """A ConfigError naming ``path`` and the 1-based line of its first bytes that are not UTF-8.

    The decoder's offset counts from its last buffer, not from the file start, so the line is found again by
    decoding the file line by line (``\\n`` is never part of a multi-byte UTF-8 character).
    """
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as line_err:
                bad = raw[line_err.start : line_err.end]
                return ConfigError(
                    f"{path}, line {line_no}: bytes {bad!r} are not valid UTF-8 ({line_err.reason}); "
                    "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                )
    return ConfigError(f"{path}: not valid UTF-8 ({err}); convert the file to UTF-8")


def untruncated_lengths(tokenizer: Any, *args: Any, **kwargs: Any) -> list[int]:
    """Token counts of ``tokenizer(*args, **kwargs)`` without truncation, to count what truncation cuts.

    ``verbose=False``: these inputs are meant to be longer than the model's maximum, so transformers' warning
    about that would only be noise.
    """
    return [len(ids) for ids in tokenizer(*args, verbose=False, **kwargs)["input_ids"]]


class TokenizedDataModule(L.LightningDataModule):
    """Base of the DataModules that tokenize text for a Hugging Face model.

    It holds the arguments every such module takes, checks them once, loads the tokenizer on first use and
    builds the ``DataLoader`` objects. Subclasses read and tokenize their data and choose the splits.

    Subclasses declare ``tokenizer`` and ``batch_size`` themselves (their defaults and docs differ) and pass
    the other arguments on as ``**kwargs``; LightningCLI follows ``super().__init__(**kwargs)`` and still lists
    every argument below under ``--data.*``, with these docs.

    Args:
        tokenizer: Hub name or local folder for ``AutoTokenizer.from_pretrained``, or a loaded tokenizer.
            ``None`` means :attr:`default_tokenizer`; without one, :attr:`tokenizer` raises.
        batch_size: Training batch size.
        eval_batch_size: Batch size of the validation/test/predict loaders (default: ``batch_size``).
        num_workers: Worker processes per ``DataLoader`` (0 loads in the main process).
        max_train_samples: Keep only the first N training examples (for quick runs).
        max_eval_samples: Keep only the first N examples of each validation/test split.
        cache_dir: Cache folder for hub downloads (``datasets``' and ``transformers``' default when ``None``).

    Raises:
        ConfigError: A batch size or sample limit that is not a positive integer, or ``num_workers`` below 0.
    """

    #: Tokenizer loaded when ``tokenizer`` is None; None makes the ``tokenizer`` argument required.
    default_tokenizer: str | None = None

    def __init__(
        self,
        tokenizer: Any = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        check_positive("batch_size", batch_size)
        check_positive("eval_batch_size", eval_batch_size, allow_none=True)
        check_positive("max_train_samples", max_train_samples, allow_none=True)
        check_positive("max_eval_samples", max_eval_samples, allow_none=True)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"num_workers must be a non-negative integer, got {num_workers!r}")
        # Lightning collects the arguments of every __init__ up the call chain (the subclass's too, **kwargs
        # flattened). A tokenizer object is left out: it does not belong in a checkpoint's hparams.
        by_name = isinstance(tokenizer, (str, type(None)))
        self.save_hyperparameters(ignore=None if by_name else ["tokenizer"])
        self.tokenizer_name: str | None = tokenizer if by_name else None
        self._tokenizer: Any = None if by_name else tokenizer
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.max_train_samples = max_train_samples
        self.max_eval_samples = max_eval_samples
        self.cache_dir = cache_dir

    # ---- tokenizer ----------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        """The tokenizer, loaded on first use.

        Raises:
            ConfigError: No ``tokenizer`` was given and the class has no default, or (see
                :meth:`_check_tokenizer`) the tokenizer does not suit the task.
            adalora_pl.io.pretrained.LoadError: The tokenizer folder does not exist, or the hub cannot be reached.
        """
        if self._tokenizer is None:
            self._tokenizer = self._load_tokenizer()
        self._check_tokenizer(self._tokenizer)
        return self._tokenizer

    def _load_tokenizer(self) -> Any:
        name = self.tokenizer_name or self.default_tokenizer
        if name is None:
            raise ConfigError(
                f"{type(self).__name__} needs a tokenizer (`tokenizer`: a hub name or a local tokenizer folder)"
            )
        from transformers import AutoTokenizer  # imported here: transformers is slow to import

        return load_pretrained(
            AutoTokenizer.from_pretrained, check_tokenizer(name), what="tokenizer", **self._tokenizer_kwargs()
        )

    def _tokenizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``AutoTokenizer.from_pretrained``."""
        return {"cache_dir": self.cache_dir}

    def _check_tokenizer(self, tokenizer: Any) -> None:
        """Raise ConfigError when ``tokenizer`` cannot serve this task; every tokenizer can, unless overridden."""

    def _download_tokenizer(self) -> None:
        """Fetch the named tokenizer into the cache, for :meth:`prepare_data`.

        The object is not kept: ``prepare_data`` runs on one process per node, so state set there would be
        missing on the others; :attr:`tokenizer` loads it again from the cache.
        """
        if self.tokenizer_name is not None:
            self._load_tokenizer()

    # ---- data ---------------------------------------------------------------------------------

    def _hub_dataset(self, what: str, hub_id: str, config: str | None = None, *, hint: str, **kwargs: Any) -> Any:
        """``datasets.load_dataset(hub_id[, config], cache_dir=..., **kwargs)``; failures say how to go offline.

        Args:
            what: The data, for the message (e.g. ``"GLUE cola"``).
            hub_id: The hub dataset.
            config: Its configuration, if it has several.
            hint: What to pass instead without network (e.g. ``"pass local files: --data.train_file ..."``).
            **kwargs: More arguments for ``load_dataset`` (e.g. ``split``).

        Raises:
            adalora_pl.io.pretrained.LoadError: The hub could not be reached, or has no such dataset.
        """
        import datasets  # imported here: only hub runs need it before tokenizing

        args = (hub_id,) if config is None else (hub_id, config)
        try:
            return datasets.load_dataset(*args, cache_dir=self.cache_dir, **kwargs)
        except OSError as err:  # ConnectionError offline / HF_HUB_OFFLINE=1; DatasetNotFoundError
            raise LoadError(
                f"could not load {what} from the Hugging Face hub ({hub_id}): {err}; without network, {hint}"
            ) from err

    def _sample_limit(self, split: str) -> int | None:
        """``max_train_samples`` for the train split, ``max_eval_samples`` for the others."""
        return self.max_train_samples if split == "train" else self.max_eval_samples

    def _first_rows(self, dataset: Any, split: str) -> Any:
        """The first :meth:`_sample_limit` rows of a ``datasets.Dataset`` (all of them without a limit)."""
        limit = self._sample_limit(split)
        if limit is None or limit >= len(dataset):
            return dataset
        return dataset.select(range(limit))

    def _warn_truncated(
        self, where: str, kind: str, lengths: Sequence[int], limit: int, option: str, *, name_limit: bool = False
    ) -> None:
        """Log how many of ``lengths`` (untruncated token counts) exceed ``limit``, when any do.

        Truncating at a sensible length is expected (long MNLI pairs, XSum articles), but never silently. The
        warning goes to the subclass's module logger (``datamodules.glue``, ...), so it can be filtered there.

        Args:
            where: Start of the message, e.g. ``"GLUE rte train"``.
            kind: What was counted, e.g. ``"examples"`` or ``"documents"``.
            lengths: Token count of each item before truncation.
            limit: The length they were truncated to.
            option: The argument that sets ``limit`` (the message suggests ``--data.<option>``).
            name_limit: Write the limit as ``<option>=<limit>`` rather than the bare number.
        """
        truncated = sum(n > limit for n in lengths)
        if truncated:
            logging.getLogger(type(self).__module__).warning(
                "%s: %d of %d %s (%.1f%%) are longer than %s tokens and were truncated; raise --data.%s to keep "
                "them whole",
                where, truncated, len(lengths), kind, 100.0 * truncated / len(lengths),
                f"{option}={limit}" if name_limit else limit, option,
            )

    def _dataloader(self, dataset: Any, *, train: bool, collate_fn: Callable[[list], Any] | None = None) -> DataLoader:
        """A loader over ``dataset``: shuffled, by ``batch_size`` for training; in order, by ``eval_batch_size``
        otherwise.

        Workers persist across epochs (starting them again for every validation run is slow); that needs workers.
        Batches are pinned when the attached Trainer runs on CUDA (:func:`pin_memory_for`).
        """
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            num_workers=self.num_workers,
            collate_fn=collate_fn,
            persistent_workers=self.num_workers > 0,
            pin_memory=pin_memory_for(self.trainer),
        )
