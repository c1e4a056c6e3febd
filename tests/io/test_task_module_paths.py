"""Checkpoints name their task module's class path: the modules of adalora_pl.tasks resolve, any other path is a
ConfigError that lists them (the paths of the unreleased flat layout included: no alias table is kept for them)."""

from __future__ import annotations

import re

import pytest

from adalora_pl.errors import ConfigError
from adalora_pl.io.checkpoint import resolve_module_class
from adalora_pl.tasks.glue_module import GLUEClassifier
from adalora_pl.tasks.qa_module import QuestionAnswering
from adalora_pl.tasks.summarization_module import Seq2SeqSummarizer


@pytest.mark.parametrize("cls", [GLUEClassifier, QuestionAnswering, Seq2SeqSummarizer])
def test_task_module_class_paths_resolve(cls):
    assert resolve_module_class(f"{cls.__module__}.{cls.__qualname__}") is cls


@pytest.mark.parametrize("path", ["adalora_pl.nowhere.Module", "adalora_pl.modules.GLUEClassifier",
                                  "adalora_pl.qa_module.QuestionAnswering"])
def test_another_class_path_names_where_task_modules_live(path):
    with pytest.raises(ConfigError, match=re.escape(path) + r".*tasks\.glue_module\.GLUEClassifier"):
        resolve_module_class(path)
