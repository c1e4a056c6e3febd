"""Instruction-tuning data: prompt formats, response-only loss, truncation, packing, file reading, errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from adalora_pl.errors import ConfigError
from datamodules.instruction import InstructionDataModule, read_instruction_records
from tests.builders import make_tiny_tokenizer, write_csv, write_jsonl

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
ROWS = [
    {"instruction": "the cat", "input": "", "output": "a dog"},
    {"instruction": "what is the capital of france", "input": "paris is a city", "output": "paris"},
    {"instruction": "read the book", "output": "good book"},  # no input column at all
]
CHATS = [
    {"messages": [{"role": "system", "content": "yes"}, {"role": "user", "content": "the cat"},
                  {"role": "assistant", "content": "a dog"}]},
    {"messages": [{"role": "user", "content": "who ran"}, {"role": "assistant", "content": "the dog ran"}]},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def chat_tok(tok):
    tok.chat_template = CHAT_TEMPLATE
    yield tok
    tok.chat_template = None


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def module(tok, train: Path, **kwargs) -> InstructionDataModule:
    dm = InstructionDataModule(tokenizer=tok, train_file=str(train), **kwargs)
    dm.setup("fit")
    return dm


def write_json(path: Path, rows: list) -> Path:
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- loss masking and formats
def test_plain_format_masks_prompt_and_padding_exactly(tok, tmp_path):
    validation = str(write_jsonl(tmp_path / "v.jsonl", ROWS))
    dm = module(tok, write_jsonl(tmp_path / "t.jsonl", ROWS), validation_file=validation)
    assert not dm.chat_format
    prompt = ids(tok, "### Instruction:\nthe cat\n\n### Response:\n")
    response = ids(tok, "a dog") + [tok.sep_token_id]  # the tiny BERT tokenizer ends responses with [SEP]
    batch = next(iter(dm.val_dataloader()))
    n = len(prompt) + len(response)
    width = batch["input_ids"].shape[1]
    assert width > n  # the second example is longer: the first is padded
    assert batch["input_ids"][0].tolist() == prompt + response + [tok.pad_token_id] * (width - n)
    assert batch["labels"][0].tolist() == [-100] * len(prompt) + response + [-100] * (width - n)
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (width - n)
    assert batch["example_index"].tolist() == [0, 1, 2]
    assert dm.eval_prompts()[1] == (
        "### Instruction:\nwhat is the capital of france\n\n### Input:\nparis is a city\n\n### Response:\n"
    )
    assert dm.eval_prompt_ids()[0] == prompt
    assert dm.eval_references() == ["a dog", "paris", "good book"]
    train = next(iter(dm.train_dataloader()))
    assert "example_index" not in train and set(train) == {"input_ids", "attention_mask", "labels"}


def test_chat_template_formats_prompt_and_appends_eos(chat_tok, tmp_path):
    dm = module(chat_tok, write_jsonl(tmp_path / "t.jsonl", CHATS + ROWS[:1]))
    assert dm.chat_format
    prompts = dm.eval_prompts("train")
    assert prompts[0] == "system: yes\nuser: the cat\nassistant:"
    assert prompts[2] == "user: the cat\nassistant:"  # Alpaca records become one user message
    feature = dm.features("train")[1]
    prompt = ids(chat_tok, "user: who ran\nassistant:")
    response = ids(chat_tok, "the dog ran") + [chat_tok.sep_token_id]
    assert feature["input_ids"] == prompt + response
    assert feature["labels"] == [-100] * len(prompt) + response
    assert dm.eval_references("train") == ["a dog", "the dog ran", "a dog"]


def test_plain_format_of_chat_records_and_forced_plain(chat_tok, tmp_path):
    dm = module(chat_tok, write_jsonl(tmp_path / "t.jsonl", CHATS), use_chat_template=False)
    assert dm.eval_prompts("train")[0] == "### System:\nyes\n\n### User:\nthe cat\n\n### Response:\n"


def test_use_chat_template_true_needs_a_template(tok, tmp_path):
    with pytest.raises(ValueError, match="no chat_template"):
        module(tok, write_jsonl(tmp_path / "t.jsonl", ROWS), use_chat_template=True)


# --------------------------------------------------------------------------- truncation
def test_truncation_cuts_prompt_from_left_and_keeps_response(tok, tmp_path, caplog):
    long = {"instruction": "the cat sat on the mat and the dog ran in the city", "output": "a dog ran"}
    full = module(tok, write_jsonl(tmp_path / "a.jsonl", [long]), max_seq_length=None).features("train")[0]
    response = ids(tok, "a dog ran") + [tok.sep_token_id]
    prompt = full["input_ids"][: -len(response)]
    limit = len(full["input_ids"]) - 2  # the short second example fits
    with caplog.at_level(logging.WARNING, logger="datamodules.instruction"):
        dm = module(tok, write_jsonl(tmp_path / "b.jsonl", [long, ROWS[0]]), max_seq_length=limit)
    cut = dm.features("train")[0]
    assert cut["input_ids"] == prompt[2:] + response  # the prompt's end (the response marker) survives
    assert cut["labels"] == [-100] * (len(prompt) - 2) + response
    assert dm.features("train")[1]["input_ids"] == module(tok, write_jsonl(tmp_path / "c.jsonl", ROWS[:1]),
                                                          max_seq_length=None).features("train")[0]["input_ids"]
    assert "1 of 2 examples (50.0%)" in caplog.text


def test_truncation_cuts_response_from_right_when_it_alone_is_too_long(tok, tmp_path):
    row = {"instruction": "the cat", "output": "the dog ran in the city and the people said no"}
    response = ids(tok, row["output"]) + [tok.sep_token_id]
    dm = module(tok, write_jsonl(tmp_path / "t.jsonl", [row]), max_seq_length=5, min_prompt_tokens=2)
    feature = dm.features("train")[0]
    assert len(feature["input_ids"]) == 5
    assert feature["labels"] == [-100, -100] + response[:3]
    assert dm.eval_references("train") == [row["output"]]


def test_max_seq_length_that_cannot_hold_the_minimum_is_refused(tok, tmp_path):
    with pytest.raises(ValueError, match="max_seq_length=2 cannot hold"):
        InstructionDataModule(tokenizer=tok, train_file=str(write_jsonl(tmp_path / "t.jsonl", ROWS)),
                              max_seq_length=2, min_prompt_tokens=2, min_response_tokens=1)
    with pytest.raises(ValueError, match="packing needs max_seq_length"):
        InstructionDataModule(tokenizer=tok, train_file=str(tmp_path / "t.jsonl"), max_seq_length=None, packing=True)


# --------------------------------------------------------------------------- packing
def test_packing_concatenates_whole_examples_with_their_labels(tok, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", ROWS * 3)
    plain = module(tok, path, max_seq_length=64).features("train")
    dm = module(tok, path, max_seq_length=64, packing=True)
    packed = dm.features("train")
    assert len(packed) < len(plain)
    assert all(len(p["input_ids"]) <= 64 for p in packed)
    assert [t for p in packed for t in p["input_ids"]] == [t for f in plain for t in f["input_ids"]]
    assert [t for p in packed for t in p["labels"]] == [t for f in plain for t in f["labels"]]
    for p in packed:
        assert len(p["labels"]) == len(p["input_ids"])
    batch = next(iter(dm.train_dataloader()))
    kept = batch["labels"] != -100
    assert torch.equal(batch["labels"][kept], batch["input_ids"][kept])  # labels line up with their tokens


# --------------------------------------------------------------------------- reading
@pytest.mark.parametrize("kind", ["jsonl", "json", "csv"])
def test_reads_jsonl_json_and_csv(tok, tmp_path, kind):
    rows = [{"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]} for r in ROWS]
    writer = {"jsonl": write_jsonl, "json": write_json, "csv": write_csv}[kind]
    dm = module(tok, writer(tmp_path / f"t.{kind}", rows))
    assert dm.eval_references("train") == ["a dog", "paris", "good book"]
    assert len(dm.features("train")) == 3


def test_csv_messages_cell_holds_json(chat_tok, tmp_path):
    path = write_csv(tmp_path / "t.csv", [{"messages": json.dumps(c["messages"])} for c in CHATS])
    assert module(chat_tok, path).eval_references("train") == ["a dog", "the dog ran"]


def test_reader_names_lines_and_records(tmp_path):
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"a": 1}\n\n{"a": 2}\n', encoding="utf-8")
    assert [w for w, _ in read_instruction_records(jsonl)] == [f"{jsonl}, line 1", f"{jsonl}, line 3"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: not valid JSON"):
        read_instruction_records(bad)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("rows", "pattern"),
    [
        ([ROWS[0], {"instruction": "the cat"}], r"t.jsonl, line 2: column 'output' is missing"),
        ([ROWS[0], {"output": "x"}], r"t.jsonl, line 2: column 'instruction' is missing"),
        ([ROWS[0], {"instruction": "a", "output": 3}], r"t.jsonl, line 2, column 'output': expected a string"),
        ([{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}],
         r"t.jsonl, line 1, column 'messages': the last message must be the assistant's"),
        ([CHATS[1], {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}],
         r"t.jsonl, line 2, column 'messages', message 0: 'content' must be a string"),
        ([{"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}],
         r"t.jsonl, line 1, column 'messages', message 0: expected a role"),
    ],
)
def test_malformed_rows_name_file_line_and_column(tok, tmp_path, rows, pattern):
    with pytest.raises(ConfigError, match=pattern):
        module(tok, write_jsonl(tmp_path / "t.jsonl", rows))


def test_malformed_json_list_record_names_record(tok, tmp_path):
    with pytest.raises(ValueError, match=r"t.json, record 1: column 'output' is missing"):
        module(tok, write_json(tmp_path / "t.json", [ROWS[0], {"instruction": "x"}]))


def test_malformed_csv_row_names_line(tok, tmp_path):
    path = write_csv(tmp_path / "t.csv", [{"instruction": "a", "answer": "b"}])
    with pytest.raises(ValueError, match=r"t.csv, line 2: column 'output' is missing"):
        module(tok, path)
    assert module(tok, path, output_column="answer").eval_references("train") == ["b"]


def test_empty_train_file_and_missing_sources(tok, tmp_path):
    empty = tmp_path / "t.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"t.jsonl: the file has no examples"):
        module(tok, empty)
    with pytest.raises(ValueError, match="no instruction data"):
        InstructionDataModule(tokenizer=tok)
    with pytest.raises(FileNotFoundError, match=r"train_file: instruction data file not found: .*nope.jsonl") as err:
        InstructionDataModule(tokenizer=tok, train_file=str(tmp_path / "nope.jsonl"))
    assert isinstance(err.value, ConfigError)  # cli.py prints it as one line
    with pytest.raises(ValueError, match="unsupported file extension"):
        InstructionDataModule(tokenizer=tok, train_file=str(tmp_path / "t.txt"))


# --------------------------------------------------------------------------- special tokens, hub
def test_pad_falls_back_to_eos_and_plain_prompt_starts_with_bos(tmp_path):
    gpt_like = make_tiny_tokenizer(tmp_path / "tok")
    gpt_like.pad_token, gpt_like.eos_token, gpt_like.bos_token = None, "[SEP]", "[CLS]"
    dm = module(gpt_like, write_jsonl(tmp_path / "t.jsonl", ROWS), validation_file=str(tmp_path / "t.jsonl"))
    eos = gpt_like.eos_token_id
    assert dm.pad_token_id == eos
    prompt = [gpt_like.bos_token_id] + ids(gpt_like, "### Instruction:\nthe cat\n\n### Response:\n")
    assert dm.eval_prompt_ids()[0] == prompt
    batch = next(iter(dm.val_dataloader()))
    n = len(prompt) + len(ids(gpt_like, "a dog")) + 1
    assert batch["input_ids"][0, n - 1] == eos and (batch["input_ids"][0, n:] == eos).all()
    assert (batch["labels"][0, n:] == -100).all() and batch["labels"][0, n - 1] == eos


def test_hub_dataset_rows(tok, monkeypatch):
    from datasets import Dataset

    calls = []

    def fake_hub(self, what, hub_id, config=None, *, hint, **kwargs):
        calls.append((hub_id, config, kwargs["split"]))
        return Dataset.from_list([{"instruction": "the cat", "input": None, "output": f"{kwargs['split']} dog"}] * 3)

    monkeypatch.setattr(InstructionDataModule, "_hub_dataset", fake_hub)
    dm = InstructionDataModule(tokenizer=tok, dataset_name="org/alpaca", validation_split="test", max_eval_samples=2)
    dm.setup("fit")
    assert {c[2] for c in calls} == {"train", "test"} and calls[0][:2] == ("org/alpaca", None)
    assert dm.eval_references() == ["test dog", "test dog"]
    assert len(dm.features("train")) == 3


# --------------------------------------------------------------------------- a fixed instruction
def test_fixed_instruction_reads_documents_and_summaries(tok, tmp_path):
    rows = [{"id": "1", "document": "the cat sat on the mat", "summary": "a cat sat"},
            {"id": "2", "document": "the dog ran", "summary": "dog ran"}]
    dm = module(tok, write_jsonl(tmp_path / "x.jsonl", rows), instruction="summary of the news",
                input_column="document", output_column="summary")
    expected = "### Instruction:\nsummary of the news\n\n### Input:\nthe cat sat on the mat\n\n### Response:\n"
    assert dm.eval_prompts("train")[0] == expected
    feature = dm.features("train")[0]
    assert feature["input_ids"][-len(ids(tok, "a cat sat")) - 1:-1] == ids(tok, "a cat sat")
    assert feature["labels"].count(-100) == len(dm.eval_prompt_ids("train")[0])


def test_fixed_instruction_still_needs_the_output_column(tok, tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"document": "the cat", "summary": "a cat"}, {"document": "the dog"}])
    with pytest.raises(ValueError, match=r"x.jsonl, line 2: column 'summary' is missing .*instruction is fixed"):
        module(tok, path, instruction="summary", input_column="document", output_column="summary")


def test_empty_fixed_instruction_is_refused(tok, tmp_path):
    with pytest.raises(ValueError, match="instruction must be a non-empty text"):
        InstructionDataModule(tokenizer=tok, train_file=str(write_jsonl(tmp_path / "x.jsonl", ROWS)), instruction=" ")


# --------------------------------------------------------------------------- packed position ids
def test_packed_position_ids_restart_at_each_example(tok, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", ROWS * 3)
    lengths = [len(f["input_ids"]) for f in module(tok, path, max_seq_length=64).features("train")]
    dm = module(tok, path, max_seq_length=64, packing=True, packed_position_ids=True)
    packed = dm.features("train")
    starts, expected, k = [], [], 0  # the greedy packing of whole examples, in order, redone from the lengths
    for p in packed:
        positions, n = [], len(p["input_ids"])
        while len(positions) < n:
            positions += list(range(lengths[k]))
            k += 1
        expected.append(positions)
        starts.append([i for i, v in enumerate(positions) if v == 0])
    assert k == len(lengths) and any(len(s) > 1 for s in starts)  # every example used; some rows hold several
    assert [p["position_ids"] for p in packed] == expected
    batch = next(iter(dm.train_dataloader()))
    assert batch["position_ids"].shape == batch["input_ids"].shape
    for row in range(len(batch["input_ids"])):
        n = int(batch["attention_mask"][row].sum())
        feature = next(p for p in packed if p["input_ids"] == batch["input_ids"][row, :n].tolist())
        assert batch["position_ids"][row, :n].tolist() == feature["position_ids"]
    # off by default: the model numbers the positions of a packed row straight through
    assert "position_ids" not in next(iter(module(tok, path, max_seq_length=64, packing=True).train_dataloader()))


def test_packed_position_ids_need_packing(tok, tmp_path):
    with pytest.raises(ConfigError, match="packed_position_ids=True needs packing=True"):
        InstructionDataModule(tokenizer=tok, train_file=str(write_jsonl(tmp_path / "t.jsonl", ROWS)),
                              packed_position_ids=True)


# --------------------------------------------------------------------------- a chat template's own end of turn
GEMMA_LIKE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
PHI3_LIKE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.mark.parametrize(("template", "specials", "end"), [
    (GEMMA_LIKE, ["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>"),
    (PHI3_LIKE, ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"], "<|end|>"),
], ids=["gemma", "phi3"])
def test_chat_response_ends_with_the_templates_end_of_turn(tmp_path, template, specials, end):
    tokenizer = make_tiny_tokenizer(tmp_path / "tok")
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.chat_template = template
    end_id = tokenizer.convert_tokens_to_ids(end)
    assert end_id not in (tokenizer.sep_token_id, tokenizer.unk_token_id)
    dm = module(tokenizer, write_jsonl(tmp_path / "t.jsonl", CHATS))
    prompt = ids(tokenizer, dm.eval_prompts("train")[1])
    response = ids(tokenizer, "the dog ran") + [end_id]  # not the tokenizer's eos ([SEP])
    feature = dm.features("train")[1]
    assert feature["input_ids"] == prompt + response
    assert feature["labels"] == [-100] * len(prompt) + response
    assert dm.chat_format and dm.response_end_ids == [end_id]
    # the training text is what the template renders for the whole chat, up to the end of the turn
    whole = tokenizer.apply_chat_template(CHATS[1]["messages"], tokenize=False)
    assert ids(tokenizer, whole)[: len(feature["input_ids"])] == feature["input_ids"]
    # generation stops at the end of the turn as well as at eos
    assert dm.stop_token_ids == [tokenizer.sep_token_id, end_id]


def test_a_template_without_an_end_token_keeps_eos(chat_tok, tmp_path):
    dm = module(chat_tok, write_jsonl(tmp_path / "t.jsonl", CHATS))
    assert dm.response_end_ids == [chat_tok.sep_token_id] and dm.stop_token_ids == [chat_tok.sep_token_id]


# --------------------------------------------------------------------------- empty responses and inputs
def test_empty_responses_are_kept_and_logged_with_file_line_and_field(tok, tmp_path, caplog):
    rows = [ROWS[0], {"instruction": "the cat", "output": " "}, ROWS[1],
            {"messages": [{"role": "user", "content": "who"}, {"role": "assistant", "content": ""}]}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="datamodules.instruction"):
        dm = module(tok, path)
    assert (f"instruction train: 2 of 4 responses are empty ({path}, line 2, column 'output'; {path}, line 4, "
            "column 'messages'); kept: their target is the end-of-response token alone") in caplog.text
    assert dm.features("train")[1]["labels"][-1:] == [tok.sep_token_id]
    assert len(dm.features("train")) == 4


def test_empty_inputs_under_a_fixed_instruction_are_logged(tok, tmp_path, caplog):
    rows = [{"document": "the cat", "summary": "a cat"}, {"document": "", "summary": "a dog"}]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="datamodules.instruction"):
        module(tok, path, instruction="summary", input_column="document", output_column="summary")
    assert (f"instruction train: 1 of 2 inputs are empty ({path}, line 2, column 'document'); kept: their prompt is "
            "the instruction alone") in caplog.text


# --------------------------------------------------------------------------- ids, held-out and test splits
def test_example_ids_come_from_the_id_column(tok, tmp_path):
    rows = [{**r, "id": f"x{i}"} for i, r in enumerate(ROWS)]
    dm = module(tok, write_jsonl(tmp_path / "t.jsonl", rows), validation_file=str(write_jsonl(tmp_path / "v.jsonl",
                                                                                            ROWS)))
    assert dm.example_ids("train") == ["x0", "x1", "x2"]
    assert dm.example_ids("validation") == ["0", "1", "2"]  # no id column: the row number
    numeric = module(tok, write_jsonl(tmp_path / "n.jsonl", [{**ROWS[0], "id": 32556640}]), id_column="id")
    assert numeric.example_ids("train") == ["32556640"]


def test_validation_holdout_takes_the_last_records_of_the_training_file(tok, tmp_path, caplog):
    rows = [{"id": str(i), "instruction": f"the cat {i}", "output": f"a dog {i}"} for i in range(7)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    dm = module(tok, path, validation_holdout=3)
    assert dm.example_ids("train") == ["0", "1", "2", "3"]
    assert dm.example_ids("validation") == ["4", "5", "6"]
    assert dm.eval_references("validation") == ["a dog 4", "a dog 5", "a dog 6"]
    assert len(next(iter(dm.val_dataloader()))["example_index"]) == 3
    # sample limits apply to what each split holds after the hold-out
    limited = module(tok, path, validation_holdout=3, max_train_samples=2, max_eval_samples=1)
    assert limited.example_ids("train") == ["0", "1"] and limited.example_ids("validation") == ["4"]
    # the messages name the record's line in the file it came from
    bad = write_jsonl(tmp_path / "b.jsonl", rows[:5] + [{"instruction": "x"}])
    with pytest.raises(ConfigError, match=r"b.jsonl, line 6: column 'output' is missing"):
        module(tok, bad, validation_holdout=2)


def test_validation_holdout_errors(tok, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", ROWS)
    both = r"validation_holdout=2 and validation_file=.*t.jsonl both set the validation split; give one"
    with pytest.raises(ConfigError, match=both):
        InstructionDataModule(tokenizer=tok, train_file=str(path), validation_file=str(path), validation_holdout=2)
    with pytest.raises(ConfigError, match=r"validation_holdout must be a positive integer, got 0"):
        InstructionDataModule(tokenizer=tok, train_file=str(path), validation_holdout=0)
    with pytest.raises(ConfigError, match=rf"validation_holdout=3 leaves no training records: {path} has 3"):
        module(tok, path, validation_holdout=3)


def test_test_file_is_the_test_split_and_validation_stands_in_without_one(tok, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", ROWS)
    test = write_jsonl(tmp_path / "test.jsonl", [{"instruction": "who ran", "output": "the dog"}])
    dm = InstructionDataModule(tokenizer=tok, train_file=str(train), validation_file=str(train), test_file=str(test))
    dm.setup("test")
    assert dm.eval_references("test") == ["the dog"]
    assert dm.eval_prompts("test") == ["### Instruction:\nwho ran\n\n### Response:\n"]
    assert next(iter(dm.test_dataloader()))["example_index"].tolist() == [0]
    without = InstructionDataModule(tokenizer=tok, train_file=str(train), validation_file=str(train))
    without.setup("test")
    assert without.eval_references("test") == without.eval_references("validation") == ["a dog", "paris", "good book"]
