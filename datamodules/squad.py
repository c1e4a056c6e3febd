"""SQuAD v1.1 / v2.0 for extractive question answering (Lightning data module).

Examples come from the Hugging Face hub (``rajpurkar/squad``, ``rajpurkar/squad_v2``) or from local
files in the official SQuAD JSON format, and are flattened to the hub's columns: ``id``, ``title``,
``context``, ``question`` and ``answers = {"text": [...], "answer_start": [...]}`` (both lists empty
for an unanswerable v2 question).

Each example is tokenized as ``[CLS] question [SEP] context [SEP]`` into one or more windows
("features") of ``max_seq_length`` tokens that overlap by ``doc_stride`` context tokens.

Offsets representation (validation features): ``offset_mapping`` is a ``(max_seq_length, 2)``
list of integer ``[start_char, end_char]`` pairs into the example's context, with ``[-1, -1]`` for
every token that is not a context token (special tokens, question, padding). Plain integers keep a
fixed Arrow type (``list<list<int64>>``, no nulls) and collate into a regular tensor, unlike
``None``. :func:`adalora_pl.tasks.squad.postprocess_qa_predictions` reads both conventions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader

from adalora_pl.errors import ConfigError, MissingFileError
from adalora_pl.tasks.squad import CLS_INDEX, postprocess_qa_predictions, squad_metrics
from datamodules._base import TokenizedDataModule, check_positive, utf8_error

__all__ = ["SquadDataModule", "read_squad_json", "SQUAD_FEATURES", "HUB_DATASETS"]

_VERSION_ALIASES = {
    "v1": "v1",
    "v1.1": "v1",
    "1.1": "v1",
    "v2": "v2",
    "v2.0": "v2",
    "2.0": "v2",
}
#: Hub dataset used for each version when no local file is given.
HUB_DATASETS = {"v1": "rajpurkar/squad", "v2": "rajpurkar/squad_v2"}
#: Tokenizer used when none is given (the AdaLoRA paper fine-tunes DeBERTaV3-base on SQuAD).
DEFAULT_TOKENIZER = "microsoft/deberta-v3-base"
#: Offset pair marking a token outside the context in validation features.
NO_OFFSET = [-1, -1]

SQUAD_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "title": datasets.Value("string"),
        "context": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answers": {
            "text": datasets.List(datasets.Value("string")),
            "answer_start": datasets.List(datasets.Value("int32")),
        },
    }
)

_MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")
#: The official layout, appended to the messages about a file that departs from it.
SQUAD_LAYOUT = ("SQuAD JSON is {data: [{title, paragraphs: [{context, qas: [{id, question, answers: [{text, "
                "answer_start}]}]}]}]}")


def _field(path: Path, node: Any, where: str, key: str, kind: type | None = None, default: Any = ...) -> Any:
    """``node[key]`` of the JSON object at ``where`` (e.g. ``data[0].paragraphs[1]``) in ``path``.

    Raises ConfigError naming the file, the place and the key when ``node`` is not an object, the key is missing
    (and there is no ``default``), or its value is not a ``kind``.
    """
    if not isinstance(node, dict):
        raise ConfigError(f"{path}: {where} is a {type(node).__name__}, expected an object; {SQUAD_LAYOUT}")
    if key not in node:
        if default is not ...:
            return default
        raise ConfigError(f"{path}: {where} has no key {key!r}; {SQUAD_LAYOUT}")
    value = node[key]
    if kind is not None and not isinstance(value, kind):
        raise ConfigError(
            f"{path}: {where}.{key} is a {type(value).__name__}, expected a {kind.__name__}; {SQUAD_LAYOUT}"
        )
    return value


def read_squad_json(path: str | Path, *, allow_unanswerable: bool = True) -> datasets.Dataset:
    """Read an official-format SQuAD JSON file into a flat ``datasets.Dataset``.

    Args:
        path: File with ``data -> [title, paragraphs -> [context, qas -> [id, question, answers
            [, is_impossible]]]]``.
        allow_unanswerable: Accept questions without answers (SQuAD v2.0). When False (v1.1), such a
            question raises ``ConfigError``.

    Returns:
        One row per question with columns ``id``, ``title``, ``context``, ``question`` and
        ``answers`` (``{"text": [...], "answer_start": [...]}``), in file order.

    Raises:
        adalora_pl.errors.MissingFileError: ``path`` does not exist (a ``FileNotFoundError``).
        ConfigError: The file is not UTF-8 or not valid JSON (the message gives the line and column; a
            truncated download ends like this), departs from the layout above (the message names the place, e.g.
            ``data[0].paragraphs[1].qas[2]``, and the missing key), has no questions, an answer's text differs from
            the context at its ``answer_start``, a question marked ``is_impossible`` has answers, or (v1.1) a
            question has no answer.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"SQuAD file not found: {path}")
    payload = _load_json(path)
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        raise ConfigError(f"{path}: not a SQuAD JSON file (expected a top-level 'data' list)")

    rows: dict[str, list[Any]] = {name: [] for name in SQUAD_FEATURES}
    for a, article in enumerate(payload["data"]):
        at = f"data[{a}]"
        title = _field(path, article, at, "title", default="")
        for p, paragraph in enumerate(_field(path, article, at, "paragraphs", list)):
            at = f"data[{a}].paragraphs[{p}]"
            context = _field(path, paragraph, at, "context", str)
            for q, qa in enumerate(_field(path, paragraph, at, "qas", list)):
                at = f"data[{a}].paragraphs[{p}].qas[{q}]"
                qid = _field(path, qa, at, "id")
                question = _field(path, qa, at, "question", str)
                texts, starts = [], []
                for i, answer in enumerate(_field(path, qa, at, "answers", list, default=[])):
                    where = f"{at}.answers[{i}]"
                    text = _field(path, answer, where, "text", str)
                    raw_start = _field(path, answer, where, "answer_start")
                    try:
                        start = int(raw_start)
                    except (TypeError, ValueError):
                        raise ConfigError(f"{path}: {where}.answer_start is {raw_start!r}, expected a character "
                                          f"offset into the context (an integer); {SQUAD_LAYOUT}") from None
                    found = context[start : start + len(text)]
                    if found != text:
                        raise ConfigError(
                            f"{path}: question {qid!r}: answer text {text!r} does not match the "
                            f"context at answer_start={start}, which reads {found!r}"
                        )
                    texts.append(text)
                    starts.append(start)
                if qa.get("is_impossible", False) and texts:
                    raise ConfigError(f"{path}: question {qid!r} is marked is_impossible but has answers")
                if not texts and not allow_unanswerable:
                    raise ConfigError(
                        f"{path}: question {qid!r} has no answer, which SQuAD v1.1 does not allow "
                        "(use version='v2' for unanswerable questions)"
                    )
                rows["id"].append(str(qid))
                rows["title"].append(title)
                rows["context"].append(context)
                rows["question"].append(question)
                rows["answers"].append({"text": texts, "answer_start": starts})
    if not rows["id"]:
        raise ConfigError(f"{path} has no examples (no question in 'data'); SQuAD needs at least one question")
    return datasets.Dataset.from_dict(rows, features=SQUAD_FEATURES)


def _load_json(path: Path) -> Any:
    """The parsed JSON of ``path``; decoding and syntax errors become ConfigErrors naming file and line."""
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except UnicodeDecodeError as err:
        raise utf8_error(path, err) from None
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{path}, line {err.lineno}, column {err.colno}: not valid JSON ({err.msg}); "
            "a file that ends early is probably an incomplete download"
        ) from None


def _tokenize(batch: dict[str, list], tokenizer, max_seq_length: int, doc_stride: int):
    # Some SQuAD questions start with a lot of whitespace, which would only waste window space.
    questions = [q.lstrip() for q in batch["question"]]
    try:
        return tokenizer(
            questions,
            batch["context"],
            truncation="only_second",
            max_length=max_seq_length,
            stride=doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            padding="max_length",
        )
    except Exception as err:  # the Rust tokenizer raises when the question leaves no room
        raise ConfigError(
            f"could not split question+context into windows of max_seq_length={max_seq_length} with "
            f"doc_stride={doc_stride}; a question is probably too long for that window ({err})"
        ) from err


def check_questions_fit(
    examples: datasets.Dataset, tokenizer, max_seq_length: int, doc_stride: int, split: str
) -> None:
    """Refuse windows that cannot hold every question with more than ``doc_stride`` context tokens.

    The tokenizer needs ``max_seq_length - specials - question tokens > doc_stride`` for each question (else
    it fails with a Rust panic that ``except Exception`` does not catch). Raises ConfigError naming the longest
    question and the settings that would fit it.
    """
    if len(examples) == 0:
        return
    special = tokenizer.num_special_tokens_to_add(pair=True)
    questions = [q.lstrip() for q in examples["question"]]  # as _tokenize strips them
    lengths = [len(ids) for ids in tokenizer(questions, add_special_tokens=False, verbose=False)["input_ids"]]
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    room = max_seq_length - special - lengths[longest]
    if room <= doc_stride:
        too_long = sum(max_seq_length - special - n <= doc_stride for n in lengths)
        raise ConfigError(
            f"SQuAD {split}: {too_long} of {len(lengths)} questions do not fit max_seq_length={max_seq_length} "
            f"with doc_stride={doc_stride}: question {examples[longest]['id']!r} has {lengths[longest]} tokens, "
            f"which with {special} special tokens leaves {max(room, 0)} context tokens per window, and a window "
            f"needs more than doc_stride; set --data.max_seq_length to at least "
            f"{special + lengths[longest] + doc_stride + 1} or lower --data.doc_stride"
        )


def _context_span(sequence_ids: Sequence[int | None]) -> tuple[int, int]:
    """First and last token index of the context (sequence id 1) in one window."""
    first = sequence_ids.index(1)
    last = len(sequence_ids) - 1 - sequence_ids[::-1].index(1)
    return first, last


def prepare_train_features(batch: dict[str, list], tokenizer, max_seq_length: int, doc_stride: int):
    """Tokenize a batch of examples into training windows with start/end token labels.

    The label is the first answer. A window whose context does not contain the whole answer (and
    any window of an unanswerable question) is labelled with the classifier token, index 0.
    """
    encoded = _tokenize(batch, tokenizer, max_seq_length, doc_stride)
    sample_map = encoded.pop("overflow_to_sample_mapping")
    all_offsets = encoded.pop("offset_mapping")
    start_positions, end_positions = [], []
    for i, offsets in enumerate(all_offsets):
        start_token = end_token = CLS_INDEX
        answers = batch["answers"][sample_map[i]]
        if answers["text"]:
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
            sequence_ids = list(encoded.sequence_ids(i))
            first, last = _context_span(sequence_ids) if 1 in sequence_ids else (-1, -1)
            if first >= 0 and offsets[first][0] <= start_char and offsets[last][1] >= end_char:
                # Last context token starting at or before the answer, first one ending at or after it.
                start_token = first
                while start_token + 1 <= last and offsets[start_token + 1][0] <= start_char:
                    start_token += 1
                end_token = last
                while end_token - 1 >= first and offsets[end_token - 1][1] >= end_char:
                    end_token -= 1
        start_positions.append(start_token)
        end_positions.append(end_token)
    encoded["start_positions"] = start_positions
    encoded["end_positions"] = end_positions
    return encoded


def prepare_eval_features(batch: dict[str, list], tokenizer, max_seq_length: int, doc_stride: int):
    """Tokenize a batch of examples into evaluation windows with ``example_id`` and context offsets.

    Offsets of tokens outside the context are replaced by ``[-1, -1]`` (see the module docstring).
    """
    encoded = _tokenize(batch, tokenizer, max_seq_length, doc_stride)
    sample_map = encoded.pop("overflow_to_sample_mapping")
    example_ids, context_offsets = [], []
    for i, offsets in enumerate(encoded["offset_mapping"]):
        sequence_ids = encoded.sequence_ids(i)
        example_ids.append(batch["id"][sample_map[i]])
        context_offsets.append(
            [list(pair) if seq == 1 else NO_OFFSET for pair, seq in zip(offsets, sequence_ids, strict=True)]
        )
    encoded["example_id"] = example_ids
    encoded["offset_mapping"] = context_offsets
    return encoded


def _to_numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().float().cpu().numpy() if values.is_floating_point() else values.cpu().numpy()
    return np.asarray(values)


class SquadDataModule(TokenizedDataModule):
    """SQuAD v1.1 / v2.0 extractive question answering, tokenized into overlapping windows.

    Each split comes from its local file when one is given (official SQuAD JSON; ``train_file`` and
    ``validation_file`` may be the same file), otherwise from the hub (``rajpurkar/squad`` or
    ``rajpurkar/squad_v2``). Local answers are checked against their contexts.

    Batches hold only tensors: ``input_ids``, ``attention_mask``, ``token_type_ids`` (when the
    tokenizer makes them), plus ``start_positions``/``end_positions`` for training and
    ``feature_index`` (row of :attr:`eval_features`) for validation/test. To score a validation
    epoch, collect ``feature_index`` with the start/end logits and call :meth:`compute_metrics`
    (or :meth:`postprocess` and :func:`adalora_pl.tasks.squad.squad_metrics`).

    Args:
        version: ``"v1"`` (also ``"1.1"``) or ``"v2"`` (also ``"2.0"``, unanswerable questions).
        tokenizer: Name or path of a fast tokenizer (``AutoTokenizer``), or a tokenizer object;
            ``None`` means ``microsoft/deberta-v3-base``.
        train_file: Local SQuAD JSON for training (default: the hub's train split).
        validation_file: Local SQuAD JSON for validation and test (default: the hub's validation split).
        max_seq_length: Tokens per window, question and special tokens included; :meth:`setup` refuses it when
            a question leaves no more than ``doc_stride`` context tokens.
        doc_stride: Context tokens shared by consecutive windows; must be below ``max_seq_length``.
        batch_size: Training batch size.
        **kwargs: ``eval_batch_size``, ``num_workers``, ``max_train_samples``, ``max_eval_samples`` (both
            counted in examples, before windowing) and ``cache_dir`` (here only for the hub dataset, not the
            tokenizer), as documented in :class:`~datamodules._base.TokenizedDataModule`.

    Attributes:
        eval_examples: Flattened validation examples (after ``max_eval_samples``), set by ``setup``.
        eval_features: Validation windows with ``example_id``, ``offset_mapping`` (``[-1, -1]`` off
            the context) and ``feature_index`` besides the model inputs, set by ``setup``.
        train_features: Training windows, set by ``setup("fit")``.
    """

    default_tokenizer = DEFAULT_TOKENIZER

    def __init__(
        self,
        version: str = "v1",
        tokenizer: str | None = None,
        train_file: str | None = None,
        validation_file: str | None = None,
        max_seq_length: int = 384,
        doc_stride: int = 128,
        batch_size: int = 16,
        **kwargs: Any,
    ) -> None:
        super().__init__(tokenizer=tokenizer, batch_size=batch_size, **kwargs)
        key = str(version).strip().lower()
        if key not in _VERSION_ALIASES:
            raise ConfigError(f"unknown SQuAD version {version!r}; expected one of {sorted(_VERSION_ALIASES)}")
        check_positive("max_seq_length", max_seq_length)
        check_positive("doc_stride", doc_stride)
        if doc_stride >= max_seq_length:
            raise ConfigError(f"doc_stride ({doc_stride}) must be smaller than max_seq_length ({max_seq_length})")
        self.version = _VERSION_ALIASES[key]
        self.train_file = train_file
        self.validation_file = validation_file
        self.max_seq_length = max_seq_length
        self.doc_stride = doc_stride

        self.train_examples: datasets.Dataset | None = None
        self.train_features: datasets.Dataset | None = None
        self.eval_examples: datasets.Dataset | None = None
        self.eval_features: datasets.Dataset | None = None
        self._parsed: dict[str, datasets.Dataset] = {}
        self._eval_cache: dict[str, Any] | None = None

    # ------------------------------------------------------------------ loading

    @property
    def version_2(self) -> bool:
        """True for SQuAD v2.0 (unanswerable questions)."""
        return self.version == "v2"

    def _tokenizer_kwargs(self) -> dict[str, Any]:
        # Only a fast tokenizer gives offset mappings. cache_dir is documented as the datasets cache here, so the
        # tokenizer keeps transformers' own cache.
        return {"use_fast": True}

    def _check_tokenizer(self, tokenizer: Any) -> None:
        """Refuse a tokenizer without offset mappings, or one that pads on the left."""
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError("SquadDataModule needs a fast tokenizer (offset mappings)")
        if getattr(tokenizer, "padding_side", "right") != "right":
            raise ConfigError("SquadDataModule needs a right-padding tokenizer (question first, context second)")

    def _file_for(self, split: str) -> str | None:
        if split == "train":
            return self.train_file
        if split == "validation":
            return self.validation_file
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'validation'")

    def load_examples(self, split: str) -> datasets.Dataset:
        """All flattened examples of ``split`` (``"train"`` or ``"validation"``), before any cut."""
        path = self._file_for(split)
        if path is None:
            return self._load_hub(split)
        resolved = str(Path(path).expanduser().resolve())
        if resolved not in self._parsed:  # the same file for train and validation is read once
            self._parsed[resolved] = read_squad_json(resolved, allow_unanswerable=self.version_2)
        return self._parsed[resolved]

    def prepare_data(self) -> None:
        """Check the local files; with no local file at all, download the hub dataset (one process).

        When only one split has a local file, the other hub split is loaded lazily by ``setup`` for
        the stages that need it, so ``validate`` with a local validation file works offline.
        """
        for split in ("train", "validation"):
            path = self._file_for(split)
            if path is not None and not Path(path).expanduser().is_file():
                raise MissingFileError(f"SQuAD {split} file not found: {path}")
        if self.train_file is None and self.validation_file is None:
            self._load_hub(None)

    def _load_hub(self, split: str | None) -> datasets.Dataset | datasets.DatasetDict:
        return self._hub_dataset(
            f"SQuAD {self.version}", HUB_DATASETS[self.version], split=split,
            hint="pass official SQuAD JSON files: --data.train_file /path/to/train.json "
            "--data.validation_file /path/to/dev.json",
        )

    def _featurize(self, examples: datasets.Dataset, split: str) -> datasets.Dataset:
        check_questions_fit(examples, self.tokenizer, self.max_seq_length, self.doc_stride, split)
        return examples.map(
            prepare_train_features if split == "train" else prepare_eval_features,
            batched=True,
            remove_columns=examples.column_names,
            fn_kwargs={
                "tokenizer": self.tokenizer,
                "max_seq_length": self.max_seq_length,
                "doc_stride": self.doc_stride,
            },
            desc=f"SQuAD {split} windows",
        )

    def setup(self, stage: str | None = None) -> None:
        """Read the examples and cut them into windows: train for ``"fit"`` (and ``None``), validation always.

        Raises:
            ConfigError: A question leaves no more than ``doc_stride`` context tokens, a local file is malformed
                (see :func:`read_squad_json`), or the tokenizer is not a fast, right-padding one.
            adalora_pl.errors.MissingFileError: A local file does not exist (a ``FileNotFoundError``).
            adalora_pl.io.pretrained.LoadError: The tokenizer folder does not exist, or the hub cannot be reached.
        """
        if stage in (None, "fit") and self.train_features is None:
            examples = self._first_rows(self.load_examples("train"), "train")
            self.train_examples = examples
            self.train_features = self._featurize(examples, "train")
        if self.eval_features is None:  # every stage validates/tests on the validation split
            examples = self._first_rows(self.load_examples("validation"), "validation")
            features = self._featurize(examples, "validation")
            self.eval_examples = examples
            self.eval_features = features.add_column("feature_index", list(range(len(features))))
            self._eval_cache = None

    # ------------------------------------------------------------------ loaders

    def _model_columns(self, dataset: datasets.Dataset, extra: Sequence[str]) -> list[str]:
        return [c for c in _MODEL_INPUTS if c in dataset.column_names] + list(extra)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training windows with their start/end token labels."""
        if self.train_features is None:
            raise RuntimeError("call setup('fit') before train_dataloader()")
        columns = self._model_columns(self.train_features, ("start_positions", "end_positions"))
        return self._dataloader(self.train_features.with_format("torch", columns=columns), train=True)

    def val_dataloader(self) -> DataLoader:
        """Validation windows in order, each with its ``feature_index`` (see :meth:`postprocess`)."""
        if self.eval_features is None:
            raise RuntimeError("call setup() before val_dataloader()")
        columns = self._model_columns(self.eval_features, ("feature_index",))
        return self._dataloader(self.eval_features.with_format("torch", columns=columns), train=False)

    def test_dataloader(self) -> DataLoader:
        """Same as :meth:`val_dataloader` (SQuAD has no public test set)."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """Same as :meth:`val_dataloader`."""
        return self.val_dataloader()

    # ------------------------------------------------------------------ evaluation helpers

    def _eval_columns(self) -> dict[str, Any]:
        if self.eval_features is None or self.eval_examples is None:
            raise RuntimeError("call setup() before post-processing")
        if self._eval_cache is None:
            self._eval_cache = {
                "example_id": list(self.eval_features["example_id"]),
                "offset_mapping": self.eval_features.with_format("numpy")["offset_mapping"],
                "id": list(self.eval_examples["id"]),
                "context": list(self.eval_examples["context"]),
                "answers": [a["text"] for a in self.eval_examples["answers"]],
            }
        return self._eval_cache

    @property
    def references(self) -> dict[str, list[str]]:
        """``{question_id: gold answer texts}`` of :attr:`eval_examples` (``[]`` = unanswerable)."""
        cols = self._eval_columns()
        return dict(zip(cols["id"], cols["answers"], strict=True))

    def postprocess(self, feature_index: Any, start_logits: Any, end_logits: Any, **kwargs: Any) -> dict[str, str]:
        """Answers for the validation examples whose windows all appear in ``feature_index``.

        Args:
            feature_index: ``feature_index`` values of the scored rows, in any order (duplicates,
                as from a distributed sampler's padding, are fine).
            start_logits: ``(len(feature_index), seq_len)`` start logits.
            end_logits: ``(len(feature_index), seq_len)`` end logits.
            **kwargs: Passed to :func:`adalora_pl.tasks.squad.postprocess_qa_predictions` (``version_2``
                defaults to this module's version).

        Returns:
            ``{question_id: answer}``; examples with a missing window (e.g. a sanity-check run over
            a few batches) are left out.
        """
        cols = self._eval_columns()
        index = _to_numpy(feature_index).astype(np.int64).reshape(-1)
        starts = _to_numpy(start_logits).astype(np.float64)
        ends = _to_numpy(end_logits).astype(np.float64)
        if not (len(index) == len(starts) == len(ends)):
            raise ValueError("feature_index, start_logits and end_logits must have the same length")
        num_features = len(cols["example_id"])
        present = np.zeros(num_features, dtype=bool)
        present[index] = True
        complete: dict[str, bool] = {}
        for row, example_id in enumerate(cols["example_id"]):
            complete[example_id] = complete.get(example_id, True) and bool(present[row])
        rows = [r for r, eid in enumerate(cols["example_id"]) if complete[eid]]
        full_starts = np.zeros((num_features, starts.shape[1]))
        full_ends = np.zeros((num_features, ends.shape[1]))
        full_starts[index] = starts
        full_ends[index] = ends
        features = {
            "example_id": [cols["example_id"][r] for r in rows],
            "offset_mapping": [cols["offset_mapping"][r] for r in rows],
        }
        keep = [i for i, qid in enumerate(cols["id"]) if complete.get(qid, False)]
        examples = {"id": [cols["id"][i] for i in keep], "context": [cols["context"][i] for i in keep]}
        kwargs.setdefault("version_2", self.version_2)
        return postprocess_qa_predictions(examples, features, full_starts[rows], full_ends[rows], **kwargs)

    def compute_metrics(
        self, feature_index: Any, start_logits: Any, end_logits: Any, **kwargs: Any
    ) -> dict[str, float]:
        """SQuAD exact/F1 (percent) over the examples :meth:`postprocess` can answer.

        Returns an empty dict when no example had all of its windows scored.
        """
        predictions = self.postprocess(feature_index, start_logits, end_logits, **kwargs)
        if not predictions:
            return {}
        references = self.references
        return squad_metrics(
            predictions,
            {qid: references[qid] for qid in predictions},
            version_2=kwargs.get("version_2", self.version_2),
        )
