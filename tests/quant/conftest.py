"""Fixtures shared by the quantized-base tests (CPU and GPU)."""

from __future__ import annotations

import pytest
from transformers import BertTokenizerFast

from datamodules.instruction import InstructionDataModule
from tests.builders import INSTRUCTION_ROWS, save_tiny_llama, write_jsonl


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    """The unquantized tiny Llama (every linear a multiple of 64 wide, see tests/builders.py) with a tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), tokenizer=True)


@pytest.fixture
def data(tmp_path, llama) -> InstructionDataModule:
    path = write_jsonl(tmp_path / "rows.jsonl", INSTRUCTION_ROWS * 2)
    return InstructionDataModule(tokenizer=BertTokenizerFast.from_pretrained(llama), train_file=str(path),
                                 validation_file=str(path), max_seq_length=40, batch_size=2, eval_batch_size=4)
