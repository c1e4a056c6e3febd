"""Checkpoints name their task module's class path; the paths from before the layout change still resolve."""

from __future__ import annotations

import pytest

from adalora_pl.io.checkpoint import MOVED_MODULE_CLASSES, resolve_module_class
from adalora_pl.tasks.glue_module import GLUEClassifier
from adalora_pl.tasks.qa_module import QuestionAnswering
from adalora_pl.tasks.summarization_module import Seq2SeqSummarizer


@pytest.mark.parametrize(
    "old,cls",
    [("adalora_pl.modules.GLUEClassifier", GLUEClassifier),
     ("adalora_pl.qa_module.QuestionAnswering", QuestionAnswering),
     ("adalora_pl.seq2seq_module.Seq2SeqSummarizer", Seq2SeqSummarizer)],
)
def test_old_class_paths_load_the_moved_classes(old, cls):
    assert resolve_module_class(old) is cls
    assert resolve_module_class(MOVED_MODULE_CLASSES[old]) is cls


def test_an_unknown_class_path_names_where_task_modules_live():
    with pytest.raises(ValueError, match=r"adalora_pl\.nowhere\.Module.*tasks\.glue_module\.GLUEClassifier"):
        resolve_module_class("adalora_pl.nowhere.Module")
