"""GLUE metrics against values computed here from their textbook formulas."""

from __future__ import annotations

import math

import pytest
import torch

from adalora_pl.tasks.glue import glue_metrics, main_metric_name, preds_from_logits

PREDS = [1, 1, 0, 1, 0, 0, 1, 1, 0, 1, 1, 0]
LABELS = [1, 0, 0, 1, 1, 0, 1, 1, 0, 0, 1, 1]


def confusion(preds, labels):
    tp = sum(p == 1 and y == 1 for p, y in zip(preds, labels, strict=True))
    tn = sum(p == 0 and y == 0 for p, y in zip(preds, labels, strict=True))
    fp = sum(p == 1 and y == 0 for p, y in zip(preds, labels, strict=True))
    fn = sum(p == 0 and y == 1 for p, y in zip(preds, labels, strict=True))
    return tp, tn, fp, fn


def pearson(x, y):
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def ranks(values):
    """1-based ranks, ties get the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            result[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return result


def compute(task, preds, labels, dtype=torch.long):
    metrics = glue_metrics(task)
    # two updates, to check that the state accumulates over batches
    half = len(preds) // 2
    metrics.update(torch.tensor(preds[:half], dtype=dtype), torch.tensor(labels[:half], dtype=dtype))
    metrics.update(torch.tensor(preds[half:], dtype=dtype), torch.tensor(labels[half:], dtype=dtype))
    return {key: value.item() for key, value in metrics.compute().items()}


def test_cola_mcc_matches_confusion_matrix_formula():
    tp, tn, fp, fn = confusion(PREDS, LABELS)
    assert (tp, tn, fp, fn) == (5, 3, 2, 2)
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    result = compute("cola", PREDS, LABELS)
    assert set(result) == {"mcc"}
    assert result["mcc"] == pytest.approx(expected, abs=1e-6)
    assert compute("CoLA", LABELS, LABELS)["mcc"] == pytest.approx(1.0)
    assert compute("cola", [1 - y for y in LABELS], LABELS)["mcc"] == pytest.approx(-1.0)


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_f1_and_accuracy(task):
    tp, tn, fp, fn = confusion(PREDS, LABELS)
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    result = compute(task, PREDS, LABELS)
    assert set(result) == {"f1", "accuracy"}
    assert result["f1"] == pytest.approx(2 * precision * recall / (precision + recall), abs=1e-6)
    assert result["accuracy"] == pytest.approx((tp + tn) / len(LABELS), abs=1e-6)


@pytest.mark.parametrize("task", ["sst2", "SST-2", "qnli", "rte"])
def test_binary_accuracy(task):
    result = compute(task, PREDS, LABELS)
    assert set(result) == {"accuracy"}
    assert result["accuracy"] == pytest.approx(8 / 12)


def test_mnli_three_class_accuracy():
    preds = [0, 1, 2, 2, 1, 0, 2, 1]
    labels = [0, 1, 1, 2, 0, 0, 2, 2]
    result = compute("mnli", preds, labels)
    assert set(result) == {"accuracy"}
    assert result["accuracy"] == pytest.approx(5 / 8)  # micro accuracy, not a class average


def test_stsb_pearson_and_spearman():
    preds = [4.8, 0.3, 2.9, 3.5, 1.0, 4.1, 2.2, 0.9]
    labels = [5.0, 0.0, 3.8, 2.5, 1.25, 4.0, 2.0, 1.25]  # a tie in the labels
    result = compute("sts-b", preds, labels, dtype=torch.float32)
    assert set(result) == {"pearson", "spearman"}
    assert result["pearson"] == pytest.approx(pearson(preds, labels), abs=1e-5)
    assert result["spearman"] == pytest.approx(pearson(ranks(preds), ranks(labels)), abs=1e-5)
    assert result["spearman"] != pytest.approx(result["pearson"], abs=1e-3)


def test_prefix_and_fresh_collections():
    first = glue_metrics("rte", prefix="val/")
    first.update(torch.tensor([1, 1]), torch.tensor([1, 1]))
    assert set(first.compute()) == {"val/accuracy"}
    second = glue_metrics("rte")
    second.update(torch.tensor([0, 1]), torch.tensor([1, 1]))
    assert second.compute()["accuracy"].item() == pytest.approx(0.5)  # no state shared with `first`


def test_main_metric_names():
    tasks = ("cola", "stsb", "mrpc", "qqp", "sst2", "mnli", "qnli", "rte")
    names = {task: main_metric_name(task) for task in tasks}
    assert names == {
        "cola": "mcc", "stsb": "pearson", "mrpc": "f1", "qqp": "f1",
        "sst2": "accuracy", "mnli": "accuracy", "qnli": "accuracy", "rte": "accuracy",
    }
    assert main_metric_name("STS-B") == "pearson"
    for task, name in names.items():  # the main metric is one of the task's metric keys
        assert name in glue_metrics(task)
    with pytest.raises(ValueError, match="glue9"):
        main_metric_name("glue9")
    with pytest.raises(ValueError, match="glue9"):
        glue_metrics("glue9")


def test_preds_from_logits():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.5]])
    assert preds_from_logits("mnli", logits).tolist() == [1, 0]
    assert preds_from_logits("rte", logits[:, :2]).tolist() == [1, 0]
    scores = preds_from_logits("stsb", torch.tensor([[1.5], [4.25]], dtype=torch.bfloat16))
    assert scores.dtype == torch.float32 and scores.tolist() == [1.5, 4.25]
    assert preds_from_logits("stsb", torch.tensor([2.0, 3.0])).tolist() == [2.0, 3.0]
    with pytest.raises(ValueError, match="rte"):
        preds_from_logits("rte", logits)  # 3 logits for a 2-class task
    with pytest.raises(ValueError, match="stsb"):
        preds_from_logits("stsb", logits)
