"""Summarization data (XSum / CNN-DailyMail / local files)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import torch

from adalora_pl.errors import ConfigError, MissingFileError
from adalora_pl.io.pretrained import LoadError
from datamodules.summarization import SummarizationDataModule, read_records
from tests.builders import write_csv, write_jsonl

XSUM = Path("summarization/xsum/validation.sample1000.jsonl")


CNNDM = Path("summarization/cnn_dailymail/validation.first1000.csv")


XSUM_EMPTY_ID = "32556640"


SMALL_ROWS = [
    {"id": "a1", "document": "the cat sat on the mat .", "summary": "cat sat"},
    {"id": "a2", "document": "the dog ran in the city river and the people said no", "summary": "dog ran"},
    {"id": "a3", "document": "paris is the capital of france", "summary": "paris capital of france"},
]


# --------------------------------------------------------------------------- real files
def test_real_xsum_reader_matches_json(real_data):
    path = real_data / XSUM
    rows = read_records(path)
    with path.open(encoding="utf-8") as f:
        direct = [json.loads(line) for line in f]
    assert len(rows) == len(direct) == 1000
    assert [r["id"] for r in rows] == [r["id"] for r in direct]
    assert rows[0] == direct[0] and set(rows[0]) == {"id", "document", "summary"}
    empty = [r["id"] for r in rows if not r["document"]]
    assert empty == [XSUM_EMPTY_ID]


def test_real_cnndm_reader_matches_csv(real_data):
    path = real_data / CNNDM
    rows = read_records(path)
    with path.open(encoding="utf-8", newline="") as f:
        direct = list(csv.DictReader(f))
    assert len(rows) == len(direct) == 1000
    assert list(rows[0]) == ["article", "highlights", "id"]
    assert [r["id"] for r in rows] == [r["id"] for r in direct]
    assert rows[0]["article"] == direct[0]["article"]
    # the multi-line quoted highlights survive as one field each
    assert all("\n" in r["highlights"] for r in rows[:20])
    assert all(len(r["id"]) == 40 for r in rows)  # sha1 hex of the story URL: no row was split


def test_real_xsum_empty_document_tokenizes_and_collates(real_data, tok_dir, caplog):
    path = real_data / XSUM
    with path.open(encoding="utf-8") as f:
        direct = [json.loads(line) for line in f]
    empty_at = next(i for i, r in enumerate(direct) if r["id"] == XSUM_EMPTY_ID)
    n = empty_at + 1
    dm = SummarizationDataModule(
        dataset="xsum",
        tokenizer=tok_dir,
        validation_file=str(path),
        max_source_length=32,
        max_target_length=16,
        eval_batch_size=4,
        max_eval_samples=n,
    )
    with caplog.at_level(logging.WARNING, logger="datamodules.summarization"):
        dm.setup("validate")
    assert any(
        "1 of" in rec.getMessage() and XSUM_EMPTY_ID in rec.getMessage() and "documents" in rec.getMessage()
        for rec in caplog.records
    )
    assert dm.example_ids("validation") == [r["id"] for r in direct[:n]]
    assert dm.eval_references("validation") == [r["summary"] for r in direct[:n]]
    assert dm.eval_documents("validation")[0] == direct[0]["document"]
    ds = dm.tokenized("validation")
    assert len(ds) == n
    tok = dm.tokenizer
    assert ds[empty_at]["input_ids"] == [tok.cls_token_id, tok.sep_token_id]  # special tokens only

    batches = list(dm.val_dataloader())
    indices = torch.cat([b["example_index"] for b in batches])
    assert indices.tolist() == list(range(n))  # in order, each example once
    last = batches[-1]
    row = (last["example_index"] == empty_at).nonzero().item()
    assert last["attention_mask"][row].sum().item() == 2


def test_real_cnndm_datamodule(real_data, tok_dir):
    path = real_data / CNNDM
    with path.open(encoding="utf-8", newline="") as f:
        direct = list(csv.DictReader(f))
    dm = SummarizationDataModule(
        dataset="cnn_dailymail",
        tokenizer=tok_dir,
        validation_file=str(path),
        max_source_length=64,
        max_target_length=24,
        eval_batch_size=3,
        max_eval_samples=6,
    )
    dm.setup("validate")
    assert dm.example_ids("validation") == [r["id"] for r in direct[:6]]
    assert dm.eval_documents("validation")[0] == direct[0]["article"]
    refs = dm.eval_references("validation")
    assert refs == [r["highlights"] for r in direct[:6]] and "\n" in refs[0]
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape == (3, 64)  # long articles: truncated to max_source_length
    assert batch["labels"].shape[0] == 3 and batch["labels"].shape[1] <= 24
    assert batch["example_index"].tolist() == [0, 1, 2]
    # test falls back to validation when no test_file is given
    assert dm.example_ids("test") == dm.example_ids("validation")


# --------------------------------------------------------------------------- local files
def test_jsonl_tokenization_prefix_truncation_and_collation(tmp_path, tok_dir):
    train = write_jsonl(tmp_path / "train.jsonl", SMALL_ROWS)
    val = write_jsonl(tmp_path / "val.jsonl", SMALL_ROWS)
    dm = SummarizationDataModule(
        dataset="xsum",
        tokenizer=tok_dir,
        train_file=str(train),
        validation_file=str(val),
        source_prefix="summary: ",
        max_source_length=6,
        max_target_length=4,
        batch_size=3,
    )
    dm.setup("fit")
    tok = dm.tokenizer
    summary_id = tok.convert_tokens_to_ids("summary")
    ds = dm.tokenized("validation")
    assert set(ds.column_names) == {"example_index", "input_ids", "attention_mask", "labels"}
    for row, src in zip(ds, SMALL_ROWS, strict=True):
        assert row["input_ids"][:2] == [tok.cls_token_id, summary_id]  # prefix comes first
        assert len(row["input_ids"]) == min(6, len(tok("summary: " + src["document"])["input_ids"]))
        assert row["labels"] == tok(text_target=src["summary"], max_length=4, truncation=True)["input_ids"]

    batch = next(iter(dm.val_dataloader()))
    label_lens = [len(r["labels"]) for r in ds]
    assert batch["labels"].shape == (3, max(label_lens))
    for i, n in enumerate(label_lens):
        assert (batch["labels"][i, n:] == -100).all() and (batch["labels"][i, :n] != -100).all()
        n_in = len(ds[i]["input_ids"])
        assert batch["attention_mask"][i].sum().item() == n_in
        assert (batch["input_ids"][i, n_in:] == tok.pad_token_id).all()
    assert batch["example_index"].dtype == torch.long
    assert "token_type_ids" not in batch and "decoder_input_ids" not in batch

    train_loader = dm.train_dataloader()
    assert isinstance(train_loader.sampler, torch.utils.data.RandomSampler)
    assert "example_index" not in next(iter(train_loader))


def test_collator_model_adds_decoder_input_ids(tmp_path, tok_dir):
    class ShiftModel:
        def prepare_decoder_input_ids_from_labels(self, labels):
            return torch.cat([torch.zeros_like(labels[:, :1]), labels[:, :-1].clamp(min=0)], dim=1)

    val = write_jsonl(tmp_path / "val.jsonl", SMALL_ROWS)
    dm = SummarizationDataModule(tokenizer=tok_dir, validation_file=str(val), eval_batch_size=3)
    dm.set_collator_model(ShiftModel())
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert torch.equal(batch["decoder_input_ids"][:, 1:], batch["labels"][:, :-1].clamp(min=0))


def test_csv_columns_override_and_quoted_newlines(tmp_path, tok_dir):
    rows = [
        {"key": "k0", "body": 'line one, "quoted"\nline two\n\nline four', "tldr": "first\nsecond"},
        {"key": "k1", "body": "the cat sat", "tldr": "cat"},
    ]
    val = write_csv(tmp_path / "val.csv", rows)
    test = write_csv(tmp_path / "test.csv", rows[::-1])
    dm = SummarizationDataModule(
        dataset=None,
        tokenizer=tok_dir,
        validation_file=str(val),
        test_file=str(test),
        text_column="body",
        summary_column="tldr",
    )
    assert dm.eval_documents("validation") == [r["body"] for r in rows]
    assert dm.eval_references("validation") == [r["tldr"] for r in rows]
    assert dm.example_ids("validation") == ["0", "1"]  # no "id" column: row numbers
    assert dm.eval_references("test") == ["cat", "first\nsecond"]  # test_file is used when given
    dm.setup("test")
    assert [b["example_index"].tolist() for b in dm.test_dataloader()] == [[0, 1]]
    with pytest.raises(ValueError, match="no train data"):
        dm.train_dataloader()


def test_dataset_column_defaults_with_override(tmp_path, tok_dir):
    rows = [{"id": "x", "article": "a text", "highlights": "h", "other": "o"}]
    val = write_jsonl(tmp_path / "val.jsonl", rows)
    dm = SummarizationDataModule(dataset="cnn_dailymail", tokenizer=tok_dir, validation_file=str(val))
    assert (dm.text_column, dm.summary_column) == ("article", "highlights")
    assert dm.eval_references("val") == ["h"]
    dm = SummarizationDataModule(
        dataset="cnn_dailymail", tokenizer=tok_dir, validation_file=str(val), summary_column="other"
    )
    assert dm.text_column == "article" and dm.eval_references("validation") == ["o"]


def test_max_samples_keep_the_first_rows(tmp_path, tok_dir):
    rows = [{"id": str(i), "document": f"doc {i}", "summary": f"sum {i}"} for i in range(10)]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    dm = SummarizationDataModule(
        tokenizer=tok_dir, train_file=str(f), validation_file=str(f), max_train_samples=7, max_eval_samples=3
    )
    dm.setup("fit")
    assert len(dm.tokenized("train")) == 7 and len(dm.tokenized("validation")) == 3
    assert dm.example_ids("validation") == ["0", "1", "2"]
    assert sum(len(b["input_ids"]) for b in dm.train_dataloader()) == 7


def test_error_messages(tmp_path, tok_dir):
    good = write_jsonl(tmp_path / "good.jsonl", SMALL_ROWS)
    with pytest.raises(ConfigError, match=r"'gigaword'.*\['cnn_dailymail', 'xsum'\]"):
        SummarizationDataModule(dataset="gigaword")
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(MissingFileError, match="validation_file: summarization data file not found: .*nope.jsonl"):
        SummarizationDataModule(validation_file=str(missing))
    bad_ext = tmp_path / "data.txt"
    bad_ext.write_text("x")
    with pytest.raises(ConfigError, match=r"'\.txt'.*\.jsonl, \.json, \.csv"):
        SummarizationDataModule(validation_file=str(bad_ext))
    with pytest.raises(ConfigError, match="text_column and summary_column"):
        SummarizationDataModule(dataset=None, validation_file=str(good))
    with pytest.raises(ConfigError, match="no summarization data"):
        SummarizationDataModule(dataset=None)

    dm = SummarizationDataModule(dataset="cnn_dailymail", tokenizer=tok_dir, validation_file=str(good))
    with pytest.raises(ConfigError, match=r"good\.jsonl.*'article'.*\['id', 'document', 'summary'\]"):
        dm.setup("validate")
    csv_file = write_csv(tmp_path / "cols.csv", [{"text": "t", "summary": "s"}])
    dm = SummarizationDataModule(tokenizer=tok_dir, validation_file=str(csv_file))
    with pytest.raises(ConfigError, match=r"cols\.csv.*'document'.*\['text', 'summary'\]"):
        dm.eval_references("validation")
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        SummarizationDataModule(validation_file=str(good)).setup("validate")


def test_truncation_is_logged_with_its_share(tmp_path, tok_dir, tiny_tokenizer, caplog):
    f = write_jsonl(tmp_path / "v.jsonl", SMALL_ROWS)
    dm = SummarizationDataModule(tokenizer=tok_dir, validation_file=str(f), max_source_length=8, max_target_length=4)
    with caplog.at_level(logging.WARNING, logger="datamodules.summarization"):
        dm.setup("validate")
    messages = [r.getMessage() for r in caplog.records]
    documents = sum(len(tiny_tokenizer(r["document"])["input_ids"]) > 8 for r in SMALL_ROWS)
    summaries = sum(len(tiny_tokenizer(text_target=r["summary"])["input_ids"]) > 4 for r in SMALL_ROWS)
    assert (documents, summaries) == (2, 1)
    assert any(m.startswith("summarization validation: 2 of 3 documents (66.7%) are longer than 8 tokens and "
                            "were truncated; raise --data.max_source_length") for m in messages), messages
    assert any(m.startswith("summarization validation: 1 of 3 summaries (33.3%) are longer than 4 tokens")
               for m in messages), messages
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="datamodules.summarization"):
        SummarizationDataModule(tokenizer=tok_dir, validation_file=str(f), max_source_length=64).setup("validate")
    assert not [r for r in caplog.records if "truncated" in r.getMessage()]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_source_length": 2}, "max_source_length=2 leaves no room for text: the special tokens and source_prefix "
                               "already take 2 tokens; set --data.max_source_length to at least 3"),
    ({"max_source_length": 4, "source_prefix": "summary: "}, "take 4 tokens; set --data.max_source_length to at "
                                                             "least 5"),
    ({"max_target_length": 1}, "max_target_length=1 leaves no room for text: the special tokens already take 2"),
])
def test_lengths_that_hold_only_special_tokens_are_refused(tmp_path, tok_dir, kwargs, message):
    f = write_jsonl(tmp_path / "v.jsonl", SMALL_ROWS)
    dm = SummarizationDataModule(tokenizer=tok_dir, validation_file=str(f), **kwargs)
    with pytest.raises(ValueError, match="leaves no room") as info:
        dm.setup("validate")
    assert message in str(info.value)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_invalid_utf8_names_file_and_line(tmp_path, tok_dir, suffix):
    path = tmp_path / f"latin{suffix}"
    if suffix == ".csv":
        write_csv(path, [{**r, "document": r["document"].replace("cat", "caf\u00e9")} for r in SMALL_ROWS])
    else:
        write_jsonl(path, [{**r, "document": r["document"].replace("cat", "caf\u00e9")} for r in SMALL_ROWS])
    path.write_bytes(path.read_text(encoding="utf-8").replace("\\u00e9", "\u00e9").encode("latin-1"))
    line = 2 if suffix == ".csv" else 1  # the first row, after the CSV header
    with pytest.raises(ValueError, match=rf"latin\{suffix}, line {line}: bytes b'\\xe9' are not valid UTF-8"):
        read_records(path)


def test_truncated_json_array_names_file_line_and_column(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text(json.dumps(SMALL_ROWS, indent=1)[:-40], encoding="utf-8")
    with pytest.raises(ValueError, match=r"cut\.json, line \d+, column \d+: not valid JSON"):
        read_records(path)


def test_missing_tokenizer_folder_is_named(tmp_path):
    f = write_jsonl(tmp_path / "v.jsonl", SMALL_ROWS)
    dm = SummarizationDataModule(tokenizer="./no/such/tokenizer", validation_file=str(f))
    with pytest.raises(LoadError, match=r"tokenizer './no/such/tokenizer': folder not found"):
        dm.setup("validate")


def test_empty_rows_are_kept_and_logged(tmp_path, tok_dir, caplog):
    rows = [
        *SMALL_ROWS,
        {"id": "e1", "document": "", "summary": "x"},
        {"id": "e2", "document": None, "summary": ""},
    ]
    f = write_jsonl(tmp_path / "v.jsonl", rows)
    dm = SummarizationDataModule(tokenizer=tok_dir, validation_file=str(f), eval_batch_size=5)
    with caplog.at_level(logging.WARNING, logger="datamodules.summarization"):
        dm.setup("validate")
    messages = [r.getMessage() for r in caplog.records]
    assert f"summarization validation: 2 of 5 documents are empty ({f}, column 'document'; ids: e1, e2)" in messages[0]
    assert f"summarization validation: 1 of 5 summaries are empty ({f}, column 'summary'; ids: e2)" in messages[1]
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape[0] == 5
    assert batch["attention_mask"][3:].sum(dim=1).tolist() == [2, 2]
    assert dm.eval_documents("validation")[4] == ""
