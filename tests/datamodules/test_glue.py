"""GLUEDataModule and the GLUE TSV reader: synthetic files for all 8 tasks, errors, and the real files."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch

from adalora_pl.errors import ConfigError, MissingFileError
from adalora_pl.io.pretrained import LoadError
from adalora_pl.tasks.glue import GLUE_TASKS, get_glue_task, normalize_task_name
from datamodules.glue import GLUEDataModule, read_glue_tsv

# ---- writing small files in the official GLUE layouts ------------------------------------------

MNLI_TRAIN_HEADER = (
    "index promptID pairID genre sentence1_binary_parse sentence2_binary_parse sentence1_parse "
    "sentence2_parse sentence1 sentence2 label1 gold_label"
).split()
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER[:-1] + ["label2", "label3", "label4", "label5", "gold_label"]

# task -> (header or None, raw label values cycled through the rows)
HEADERS = {
    "cola": None,
    "sst2": ["sentence", "label"],
    "mrpc": ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
    "qqp": ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
    "stsb": "index genre filename year old_index source1 source2 sentence1 sentence2 score".split(),
    "mnli": MNLI_TRAIN_HEADER,
    "qnli": ["index", "question", "sentence", "label"],
    "rte": ["index", "sentence1", "sentence2", "label"],
}
RAW_LABELS = {
    "cola": ["1", "0", "1"],
    "sst2": ["0", "1", "1"],
    "mrpc": ["1", "0", "0"],
    "qqp": ["0", "1", "0"],
    "stsb": ["5.000", "0.000", "3.800", "1.25"],
    "mnli": ["neutral", "entailment", "contradiction"],
    "qnli": ["not_entailment", "entailment", "entailment"],
    "rte": ["entailment", "not_entailment", "not_entailment"],
}
WORDS = "the cat sat on the mat and the dog ran to paris in france".split()
# Row i has texts of this many words: two short rows then two long rows, so with batches of 2 the
# first batch is much shorter than the second.
TEXT_LENGTHS = [2, 3, 12, 11, 5]


def _texts(i: int) -> tuple[str, str]:
    n = TEXT_LENGTHS[i % len(TEXT_LENGTHS)]
    first = " ".join(WORDS[:n])
    if i == 1:
        first = '"' + first  # a bare quote: read with QUOTE_NONE it is just text
    return first, " ".join(reversed(WORDS[:n]))


def _fields(task: str, header: list[str] | None, i: int, raw_label: str) -> list[str]:
    a, b = _texts(i)
    if task == "cola":
        return ["gj04", raw_label, "*" if raw_label == "0" else "", a]
    values = {
        "sentence": a + " " if task == "sst2" else b,  # SST-2 sentences end in a space
        "label": raw_label,
        "Quality": raw_label,
        "#1 String": a,
        "#2 String": b,
        "question1": a,
        "question2": b,
        "is_duplicate": raw_label,
        "sentence1": a,
        "sentence2": b,
        "score": raw_label,
        "question": a,
        "gold_label": raw_label,
        "label1": raw_label,
    }
    return [values.get(name, str(i)) for name in header]


def expected_label(task: str, raw: str) -> int | float:
    spec = GLUE_TASKS[task]
    return float(raw) if spec.is_regression else spec.tsv_labels.index(raw)


def write_split(path: Path, task: str, n_rows: int, header: list[str] | None = None, labels=None) -> list:
    """Write ``n_rows`` rows of ``task`` in the GLUE layout; return the raw labels written."""
    header = header if header is not None else HEADERS[task]
    labels = labels or RAW_LABELS[task]
    raws = [labels[i % len(labels)] for i in range(n_rows)]
    lines = [] if header is None else ["\t".join(header)]
    lines += ["\t".join(_fields(task, header, i, raw)) for i, raw in enumerate(raws)]
    bom = "\ufeff" if task == "mrpc" else ""  # the MRPC header starts with a BOM
    # CoLA files are header-less and the real dev.tsv has no final newline
    end = "" if task == "cola" and path.name == "dev.tsv" else "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(bom + "\n".join(lines) + end, encoding="utf-8")
    return raws


def write_task(root: Path, task: str, n_train: int = 7, n_dev: int = 5) -> dict[str, list]:
    """GLUE files for ``task`` under ``root/<folder>``; return the raw labels per split."""
    folder = root / GLUE_TASKS[task].folder
    written = {"train": write_split(folder / "train.tsv", task, n_train)}
    if task == "mnli":
        written["validation_matched"] = write_split(folder / "dev_matched.tsv", task, n_dev, MNLI_DEV_HEADER)
        written["validation_mismatched"] = write_split(
            folder / "dev_mismatched.tsv", task, n_dev + 1, MNLI_DEV_HEADER, labels=["contradiction"]
        )
    else:
        written["validation"] = write_split(folder / "dev.tsv", task, n_dev)
    return written


# ---- every task on synthetic files ------------------------------------------------------------


@pytest.mark.parametrize("task", sorted(GLUE_TASKS))
def test_reader_reads_official_layout(tmp_path, task):
    written = write_task(tmp_path, task)
    spec = GLUE_TASKS[task]
    file_name = dict(spec.split_files)[spec.val_split_names[0]]
    columns = read_glue_tsv(tmp_path / spec.folder / file_name, task)
    assert list(columns) == [*spec.text_columns, "label"]
    assert columns["label"] == [expected_label(task, raw) for raw in written[spec.val_split_names[0]]]
    first_text = columns[spec.text_columns[0]]
    assert len(first_text) == 5
    if task == "sst2":
        assert first_text[0] == "the cat "  # trailing space kept, as in the hub data
    else:
        assert first_text[0] == "the cat"
        assert first_text[1] == '"the cat sat'  # bare quote kept (QUOTE_NONE)
    if len(spec.text_columns) == 2:
        assert columns[spec.text_columns[1]][0] == "cat the"


@pytest.mark.parametrize("task", sorted(GLUE_TASKS))
def test_datamodule_every_task(tmp_path, tok_dir, task):
    written = write_task(tmp_path / "glue", task)
    dm = GLUEDataModule(
        task, tokenizer=tok_dir, data_dir=str(tmp_path / "glue"), batch_size=3, eval_batch_size=2
    )
    spec = GLUE_TASKS[task]
    assert dm.num_labels == (1 if task == "stsb" else 3 if task == "mnli" else 2)
    assert dm.is_regression == (task == "stsb")
    assert dm.val_split_names == (
        ("validation_matched", "validation_mismatched") if task == "mnli" else ("validation",)
    )
    dm.setup("fit")

    for split, raws in written.items():
        data = dm.datasets[split]
        assert len(data) == len(raws)
        model_columns = {"input_ids", "token_type_ids", "attention_mask", "labels"}
        # Evaluation rows carry their row number (DDP metrics drop the sampler's repeats by it).
        assert set(data.column_names) == model_columns | ({"example_index"} if split != "train" else set())
        if split != "train":
            assert data["example_index"] == list(range(len(raws)))
        assert data["labels"] == pytest.approx([expected_label(task, raw) for raw in raws])

    train_loader = dm.train_dataloader()
    assert isinstance(train_loader.sampler, torch.utils.data.RandomSampler)  # shuffled
    train_batches = list(train_loader)
    assert sum(len(batch["labels"]) for batch in train_batches) == len(written["train"])

    val = dm.val_dataloader()
    if task == "mnli":
        assert isinstance(val, list) and len(val) == 2
        matched, mismatched = val
        assert len(matched.dataset) == 5 and len(mismatched.dataset) == 6
        assert all(label == 2 for batch in mismatched for label in batch["labels"].tolist())
        loader = matched
    else:
        assert isinstance(val, torch.utils.data.DataLoader)
        loader = val
    assert isinstance(loader.sampler, torch.utils.data.SequentialSampler)  # file order
    batches = list(loader)
    label_dtype = torch.float32 if task == "stsb" else torch.long
    pad_id = dm.tokenizer.pad_token_id
    for batch in batches:
        assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels", "example_index"}
        assert batch["labels"].dtype == label_dtype and batch["example_index"].dtype == torch.long
        assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["token_type_ids"].shape
        # padded to the longest row of this batch only: some row fills it, padding is masked
        assert batch["attention_mask"].sum(dim=1).max() == batch["input_ids"].shape[1]
        assert torch.all(batch["input_ids"][batch["attention_mask"] == 0] == pad_id)
    lengths = [batch["input_ids"].shape[1] for batch in batches]
    assert lengths[0] < lengths[1]  # rows 0-1 are short, rows 2-3 long: per-batch padding
    if len(spec.text_columns) == 2:  # pairs: the second segment has token type 1
        assert batches[0]["token_type_ids"].max() == 1
    # test/predict serve the validation rows (GLUE test labels are hidden)
    for other in (dm.test_dataloader(), dm.predict_dataloader()):
        first = other[0] if task == "mnli" else other
        assert first.dataset is loader.dataset


def test_mnli_reads_train_and_dev_headers(tmp_path):
    """MNLI train has one annotator label column, dev has five: both are read by column name."""
    write_task(tmp_path, "mnli")
    train = read_glue_tsv(tmp_path / "MNLI" / "train.tsv", "mnli")
    dev = read_glue_tsv(tmp_path / "MNLI" / "dev_matched.tsv", "mnli")
    assert list(train) == ["premise", "hypothesis", "label"]
    assert train["label"][:3] == [1, 0, 2]
    assert dev["label"][:3] == [1, 0, 2]


def test_sample_limits_take_first_rows_and_truncation(tmp_path, tok_dir, tiny_tokenizer, caplog):
    written = write_task(tmp_path, "rte", n_train=9, n_dev=6)
    dm = GLUEDataModule(
        "RTE", tokenizer=tok_dir, data_dir=str(tmp_path / "RTE"), max_seq_length=8,
        max_train_samples=4, max_eval_samples=3,
    )
    with caplog.at_level(logging.WARNING, logger="datamodules.glue"):
        dm.setup("fit")
    for split, limit in (("train", 4), ("validation", 3)):
        assert dm.datasets[split]["labels"] == [expected_label("rte", raw) for raw in written[split][:limit]]
    lengths = [len(ids) for ids in dm.datasets["train"]["input_ids"]]
    assert max(lengths) == 8  # the long rows were cut to max_seq_length
    assert min(lengths) < 8
    # ... and the cut is reported, per split, with its share (counted here without truncation)
    messages = [r.getMessage() for r in caplog.records]
    for split, rows in (("train", 4), ("validation", 3)):
        full = [len(tiny_tokenizer(*_texts(i))["input_ids"]) for i in range(rows)]
        cut = sum(n > 8 for n in full)
        assert 0 < cut < rows
        expected = f"GLUE rte {split}: {cut} of {rows} examples ({100 * cut / rows:.1f}%) are longer than max_seq_"
        assert any(m.startswith(expected) for m in messages), messages
    assert len([m for m in messages if "truncated" in m]) == 2


def test_no_truncation_warning_when_everything_fits(tmp_path, tok_dir, caplog):
    write_task(tmp_path, "rte")
    with caplog.at_level(logging.WARNING, logger="datamodules.glue"):
        GLUEDataModule("rte", tokenizer=tok_dir, data_dir=str(tmp_path), max_seq_length=64).setup("fit")
    assert not [r for r in caplog.records if r.name == "datamodules.glue"]


def test_validate_stage_loads_only_validation(tmp_path, tok_dir):
    write_task(tmp_path, "sst2")
    dm = GLUEDataModule("sst-2", tokenizer=tok_dir, data_dir=str(tmp_path))
    dm.setup("validate")
    assert set(dm.datasets) == {"validation"}
    with pytest.raises(RuntimeError, match="train"):
        dm.train_dataloader()
    dm.setup("fit")  # adds train, keeps validation
    assert set(dm.datasets) == {"train", "validation"}


def test_hub_source_is_used_without_data_dir(monkeypatch, tok_dir):
    calls = []
    split = datasets.Dataset.from_dict(
        {"sentence1": ["the cat", "a dog"], "sentence2": ["the mat", "no"], "label": [0, 1], "idx": [0, 1]}
    )

    def fake_load_dataset(path, name, **kwargs):
        calls.append((path, name, kwargs.get("cache_dir")))
        return datasets.DatasetDict({"train": split, "validation": split.select([1]), "test": split})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dm = GLUEDataModule("rte", tokenizer=tok_dir, cache_dir="/tmp/hub-cache")
    dm.prepare_data()
    dm.setup("fit")
    assert calls[0] == ("nyu-mll/glue", "rte", "/tmp/hub-cache")
    assert dm.datasets["train"]["labels"] == [0, 1]
    assert dm.datasets["validation"]["labels"] == [1]
    assert "idx" not in dm.datasets["train"].column_names


# ---- errors -----------------------------------------------------------------------------------


def test_missing_split_file(tmp_path, tok_dir):
    write_split(tmp_path / "QNLI" / "dev.tsv", "qnli", 4)
    dm = GLUEDataModule("qnli", tokenizer=tok_dir, data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "QNLI" / "train.tsv")):
        dm.setup("fit")
    dm.setup("validate")
    assert len(dm.datasets["validation"]) == 4


def test_missing_mnli_mismatched_file(tmp_path, tok_dir):
    write_task(tmp_path, "mnli")
    (tmp_path / "MNLI" / "dev_mismatched.tsv").unlink()
    dm = GLUEDataModule("mnli", tokenizer=tok_dir, data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="dev_mismatched.tsv"):
        dm.setup("validate")


def test_missing_column(tmp_path):
    path = tmp_path / "dev.tsv"
    write_split(path, "rte", 3, header=["index", "sentence1", "sentence2", "gold"])
    with pytest.raises(ValueError) as info:
        read_glue_tsv(path, "rte")
    message = str(info.value)
    assert str(path) in message and "line 1" in message and "'label'" in message


@pytest.mark.parametrize(
    ("task", "bad", "allowed"),
    [
        ("rte", "maybe", "not_entailment"),
        ("cola", "2", "'0', '1'"),
        ("mnli", "-", "neutral"),
        ("qqp", "yes", "'1'"),
    ],
)
def test_bad_label_names_file_line_and_value(tmp_path, task, bad, allowed):
    path = tmp_path / "train.tsv"
    write_split(path, task, 4, labels=RAW_LABELS[task][:2] + [bad])
    with pytest.raises(ValueError) as info:
        read_glue_tsv(path, task)
    message = str(info.value)
    # the third data row is bad: line 4 with a header line, line 3 for header-less CoLA
    line = 3 if task == "cola" else 4
    assert str(path) in message and f"line {line}:" in message and repr(bad) in message and allowed in message


@pytest.mark.parametrize("bad", ["abc", "5.5", "-0.1", "nan", ""])
def test_bad_stsb_score(tmp_path, bad):
    path = tmp_path / "dev.tsv"
    write_split(path, "stsb", 2, labels=["2.5", bad])
    with pytest.raises(ValueError) as info:
        read_glue_tsv(path, "stsb")
    assert "line 3:" in str(info.value) and repr(bad) in str(info.value) and "[0.0, 5.0]" in str(info.value)


def test_wrong_number_of_fields(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("sentence\tlabel\nfine \t1\nhas\ta tab \t0\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 3: expected 2 tab-separated fields .* got 3"):
        read_glue_tsv(path, "sst2")
    path.write_text("sentence\tlabel\nfine \t1\n\n", encoding="utf-8")  # a blank line is not skipped
    with pytest.raises(ValueError, match=r"line 3: expected 2 .* got 0"):
        read_glue_tsv(path, "sst2")


def test_bad_task_name_and_aliases():
    with pytest.raises(ValueError, match=r"'colaa'.*'cola'.*'sst2'"):
        GLUEDataModule("colaa")
    assert [normalize_task_name(n) for n in ("CoLA", "SST-2", "sts-b", "STS_B", "MNLI", "qqp")] == [
        "cola", "sst2", "stsb", "stsb", "mnli", "qqp",
    ]
    assert get_glue_task("QNLI").label_names == ("entailment", "not_entailment")
    assert GLUEDataModule("sts-b").task_name == "stsb"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_size": 0}, {"max_seq_length": -1}, {"eval_batch_size": 0},
        {"max_train_samples": 0}, {"max_eval_samples": -5}, {"num_workers": -1},
    ],
)
def test_non_positive_sizes(kwargs):
    (name, value), = kwargs.items()
    with pytest.raises(ValueError, match=rf"{name}.*{value}"):
        GLUEDataModule("cola", **kwargs)


def test_setup_needs_tokenizer(tmp_path):
    write_task(tmp_path, "cola")
    with pytest.raises(ValueError, match="tokenizer"):
        GLUEDataModule("cola", data_dir=str(tmp_path)).setup("fit")


@pytest.mark.parametrize(("task", "length", "needed"), [("rte", 3, 5), ("rte", 4, 5), ("cola", 2, 3)])
def test_max_seq_length_that_cannot_hold_the_texts_is_refused(tmp_path, tok_dir, task, length, needed):
    """At 3 tokens every RTE pair would be `[CLS] [SEP] [SEP]`: refused at setup, before any training."""
    write_task(tmp_path, task)
    dm = GLUEDataModule(task, tokenizer=tok_dir, data_dir=str(tmp_path), max_seq_length=length)
    with pytest.raises(ValueError, match=rf"max_seq_length={length} cannot hold a GLUE {task} input") as info:
        dm.setup("fit")
    assert f"--data.max_seq_length to at least {needed}" in str(info.value)
    dm = GLUEDataModule(task, tokenizer=tok_dir, data_dir=str(tmp_path), max_seq_length=needed)
    dm.setup("fit")  # the smallest length that leaves a token per text is accepted (with a warning)


def test_invalid_utf8_names_file_and_line(tmp_path, tok_dir):
    write_task(tmp_path, "sst2", n_train=5)
    path = tmp_path / "SST-2" / "train.tsv"
    lines = path.read_bytes().split(b"\n")
    lines[3] = lines[3].replace(b"cat", b"caf\xe9")  # latin-1 e-acute
    path.write_bytes(b"\n".join(lines))
    dm = GLUEDataModule("sst2", tokenizer=tok_dir, data_dir=str(tmp_path))
    with pytest.raises(ValueError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert message.startswith(f"{path}, line 4: bytes b'\\xe9' are not valid UTF-8"), message
    assert "UTF-8" in message and not isinstance(info.value, UnicodeDecodeError)


@pytest.mark.parametrize(("task", "content", "what"), [
    ("sst2", "sentence\tlabel\n", "it holds no line after the header"),
    ("sst2", "", "the file is empty"),
    ("cola", "", "the file is empty"),
])
def test_empty_train_file_is_refused_at_setup(tmp_path, tok_dir, task, content, what):
    write_task(tmp_path, task)
    path = tmp_path / GLUE_TASKS[task].folder / "train.tsv"
    path.write_text(content)
    dm = GLUEDataModule(task, tokenizer=tok_dir, data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="train.tsv has no examples") as info:
        dm.setup("fit")
    assert str(info.value).startswith(f"{path} has no examples ({what})")


@pytest.mark.parametrize("name", ["/nonexistent/tokenizer", "./typo"])
def test_missing_tokenizer_folder_is_named(tmp_path, name):
    write_task(tmp_path, "cola")
    dm = GLUEDataModule("cola", tokenizer=name, data_dir=str(tmp_path))
    with pytest.raises(LoadError, match=rf"tokenizer '{name}': folder not found; .*microsoft/deberta-v3-base"):
        dm.setup("fit")


def test_hub_unreachable_points_to_data_dir(monkeypatch, tok_dir):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(LoadError, match=r"could not load GLUE cola from the Hugging Face hub .*--data.data_dir "
                                        r"/path/to/glue/CoLA"):
        GLUEDataModule("cola", tokenizer=tok_dir).setup("fit")


# ---- the real GLUE files (../shared/data) ------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "file", "rows", "label_counts"),
    [
        ("cola", "CoLA/train.tsv", 8551, {1: 6023, 0: 2528}),
        ("cola", "CoLA/dev.tsv", 1043, {1: 721, 0: 322}),
        ("sst2", "SST-2/train.tsv", 67349, {1: 37569, 0: 29780}),
        ("sst2", "SST-2/dev.tsv", 872, {1: 444, 0: 428}),
        ("mrpc", "MRPC/train.tsv", 3668, {1: 2474, 0: 1194}),
        ("mrpc", "MRPC/dev.tsv", 408, {1: 279, 0: 129}),
        ("rte", "RTE/train.tsv", 2490, {0: 1249, 1: 1241}),
        ("rte", "RTE/dev.tsv", 277, {0: 146, 1: 131}),
        ("qnli", "QNLI/dev.tsv", 5463, {0: 2702, 1: 2761}),
    ],
)
def test_real_files_rows_and_labels(real_data, task, file, rows, label_counts):
    columns = read_glue_tsv(real_data / "glue" / file, task)
    assert len(columns["label"]) == rows
    assert all(len(values) == rows for values in columns.values())
    assert Counter(columns["label"]) == label_counts


def test_real_file_quirks(real_data):
    glue = real_data / "glue"
    mrpc = read_glue_tsv(glue / "MRPC" / "dev.tsv", "mrpc")  # BOM header; bare quotes in text
    assert mrpc["sentence2"][0].startswith('"The foodservice pie business')
    cola = read_glue_tsv(glue / "CoLA" / "dev.tsv", "cola")  # no header, no final newline
    assert cola["sentence"][0] == "The sailors rode the breeze clear of the rocks."
    assert cola["sentence"][-1] == "John talked to Bill about himself."
    sst2 = read_glue_tsv(glue / "SST-2" / "dev.tsv", "sst2")
    assert all(sentence.endswith(" ") for sentence in sst2["sentence"])


def test_real_stsb_scores(real_data):
    for file, rows in (("dev.tsv", 1500), ("train.tsv", 5749)):
        scores = read_glue_tsv(real_data / "glue" / "STS-B" / file, "stsb")["label"]
        assert len(scores) == rows
        assert min(scores) == 0.0 and max(scores) == 5.0
        assert all(0.0 <= s <= 5.0 for s in scores)


def test_real_qnli_validate_only(real_data, tok_dir):
    dm = GLUEDataModule("qnli", tokenizer=tok_dir, data_dir=str(real_data / "glue"), max_eval_samples=40)
    with pytest.raises(FileNotFoundError, match=r"QNLI.train\.tsv"):
        dm.setup("fit")
    dm.setup("validate")
    assert len(dm.datasets["validation"]) == 40
    batch = next(iter(dm.val_dataloader()))
    assert batch["labels"].dtype == torch.long and set(batch["labels"].tolist()) <= {0, 1}


@pytest.mark.parametrize("task", ["cola", "stsb", "mrpc"])
def test_real_datamodule_batches(real_data, tok_dir, task):
    dm = GLUEDataModule(
        task, tokenizer=tok_dir, data_dir=str(real_data / "glue"), batch_size=16,
        max_train_samples=64, max_eval_samples=48, max_seq_length=64,
    )
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 64 and len(dm.datasets["validation"]) == 48
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 16 and batch["input_ids"].shape[1] <= 64
    if task == "stsb":
        assert batch["labels"].dtype == torch.float32
        assert torch.all((batch["labels"] >= 0) & (batch["labels"] <= 5))


def test_wrong_files_and_settings_are_config_errors(tmp_path):
    """What cli.py prints as one line: a missing file (still a FileNotFoundError), a bad line, an unknown task."""
    missing = tmp_path / "nope.tsv"
    with pytest.raises(MissingFileError) as info:
        read_glue_tsv(missing, "cola")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ConfigError)
    assert str(info.value) == f"GLUE cola file not found: {missing}"
    bad = tmp_path / "bad.tsv"
    bad.write_text("src\t2\t\tthe cat sat\n")
    with pytest.raises(ConfigError, match=r"bad\.tsv, line 1: label '2' in column 'label' is not one of \['0', '1'\]"):
        read_glue_tsv(bad, "cola")
    with pytest.raises(ConfigError, match="unknown GLUE task 'colla'"):
        GLUEDataModule(task_name="colla")
