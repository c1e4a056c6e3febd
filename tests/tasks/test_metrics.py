"""The epoch metrics of adalora_pl/tasks/metrics.py compute from their own state: the scorer or decoder is given at
construction, never assigned just before ``compute``, and a metric built without one says what is missing."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from adalora_pl.tasks.metrics import GeneratedTexts, SquadMetric


def test_squad_metric_scores_every_window_with_the_scorer_it_was_built_with():
    calls = []

    def scorer(feature_index, start_logits, end_logits, **settings):
        calls.append((feature_index, start_logits, end_logits, settings))
        return {"exact": 50, "f1": torch.tensor(75.0)}

    metric = SquadMetric(scorer, n_best_size=5, max_answer_length=7, version_2=True)
    metric.update(torch.tensor([2, 0]), torch.ones(2, 4, dtype=torch.bfloat16), torch.zeros(2, 4))
    metric.update(torch.tensor([1]), torch.full((1, 4), 2.0), torch.ones(1, 4))

    assert metric.compute() == {"exact": 50.0, "f1": 75.0}
    (index, start, end, settings), = calls
    assert index.tolist() == [2, 0, 1] and start.dtype == torch.float32 and start.shape == end.shape == (3, 4)
    assert settings == {"n_best_size": 5, "max_answer_length": 7, "version_2": True, "null_score_diff_threshold": 0.0}


def test_generated_texts_decode_with_the_decoder_they_were_built_with():
    decoded = []

    def decode(rows):
        decoded.append(rows)
        return [" ".join(map(str, row)) for row in rows]

    metric = GeneratedTexts(decode)
    metric.update(torch.tensor([3, 1]), torch.tensor([[7, 8], [5, 6]]))
    metric.update(torch.tensor([1, 0]), torch.tensor([[5, 6, 0]]).expand(2, 3))  # index 1 repeated (padded sampler)

    assert metric.compute() == {0: "5 6 0", 1: "5 6", 3: "7 8"}
    assert decoded == [[[5, 6, 0], [5, 6], [7, 8]]]  # each distinct row decoded once


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: SquadMetric(None), r"SquadMetric needs scorer: .*compute_metrics; got None"),
        (lambda: SquadMetric("compute_metrics"), r"SquadMetric needs scorer"),
        (lambda: GeneratedTexts(None), r"GeneratedTexts needs decode: the function that turns rows of token ids"),
    ],
)
def test_a_metric_without_its_scorer_or_decoder_is_refused_when_built(build, message):
    with pytest.raises(TypeError, match=message):
        build()


class _Holder(nn.Module):
    """A task module in miniature: its metrics call its own methods, which find the data at compute time."""

    def __init__(self) -> None:
        super().__init__()
        self.prefix = "text"
        self.generated = GeneratedTexts(self.decode)
        self.squad = SquadMetric(self.score)

    def decode(self, rows):
        return [f"{self.prefix}{len(row)}" for row in rows]

    def score(self, feature_index, start_logits, end_logits, **settings):
        return {"windows": feature_index.numel()}


def test_metrics_holding_their_modules_methods_survive_pickling_and_copying():
    """``ddp_spawn`` pickles the task module into every process and some callbacks deep-copy it: the metric's
    scorer/decoder then belongs to the copy, not to the original."""
    for copied in (pickle.loads(pickle.dumps(_Holder())), copy.deepcopy(_Holder())):
        assert copied.generated.decode.__self__ is copied and copied.squad.scorer.__self__ is copied
        copied.prefix = "copy"
        copied.generated.update(torch.tensor([0]), torch.tensor([[1, 2]]))
        copied.squad.update(torch.tensor([0, 1]), torch.zeros(2, 3), torch.zeros(2, 3))
        assert copied.generated.compute() == {0: "copy2"}
        assert copied.squad.compute() == {"windows": 2.0}
