"""SQuAD through the command line: fit a tiny BERT span model on a hand-made SQuAD v2.0 file, end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from adalora_pl.cli import main
from tests.builders import REPO_ROOT

# Contexts and questions use the tiny tokenizer's words only, so every word is one token.
ARTICLES = [
    ("paris", "paris is the capital city of france . the river is in the city .", [
        ("what is the capital of france ?", "paris"),
        ("where is the river ?", "in the city"),
        ("who read the book ?", None),
    ]),
    ("cat", "the cat sat on the mat . the dog ran . he said that the film was great .", [
        ("who sat on the mat ?", "the cat"),
        ("what was great ?", "the film"),
        ("what was terrible ?", None),
    ]),
    # Long enough to be cut into several overlapping windows at max_seq_length 32 / doc_stride 8.
    ("news", "the news of the year was good . people said they love the book and the movie . "
             "she read the book in the city . they sat on the mat and read . we love paris . "
             "the dog was bad and the cat was good . the film was terrible .", [
        ("what was terrible ?", "the film"),
        ("who read the book in the city ?", "she"),
        ("what was bad ?", "the dog"),
        ("where is the capital of france ?", None),
    ]),
]
N_QUESTIONS = sum(len(qas) for _, _, qas in ARTICLES)
N_ANSWERABLE = sum(answer is not None for _, _, qas in ARTICLES for _, answer in qas)


def write_squad_v2(path: Path) -> Path:
    data = []
    for title, context, qas in ARTICLES:
        rows = []
        for i, (question, answer) in enumerate(qas):
            if answer is None:
                rows.append({"id": f"{title}-{i}", "question": question, "answers": [], "is_impossible": True})
            else:
                start = context.index(answer)
                rows.append({"id": f"{title}-{i}", "question": question, "is_impossible": False,
                             "answers": [{"text": answer, "answer_start": start}]})
        data.append({"title": title, "paragraphs": [{"context": context, "qas": rows}]})
    path.write_text(json.dumps({"version": "v2.0", "data": data}))
    return path


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fit_squad(tmp_path: Path, backbone: str, *extra: str, config: str = "squad_v2.yaml"):
    data = write_squad_v2(tmp_path / "squad.json")
    return main([
        "fit", "--config", str(REPO_ROOT / "configs" / config),
        "--model.backbone", backbone, "--data.train_file", str(data), "--data.validation_file", str(data),
        "--data.max_seq_length", "32", "--data.doc_stride", "8", "--data.batch_size", "4",
        "--data.eval_batch_size", "4",
        "--model.tinit", "0.2", "--model.tfinal", "0.3", "--model.delta_t", "1", "--model.warmup_steps", "2",
        "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
        *extra,
    ])


def test_cli_fit_squad_v2_end_to_end(tmp_path, tiny_qa_backbone):
    cli = fit_squad(tmp_path, tiny_qa_backbone)
    trainer, dm = cli.trainer, cli.datamodule
    assert dm.hparams.tokenizer == tiny_qa_backbone  # linked from --model.backbone
    assert len(dm.eval_features) > len(dm.eval_examples) == N_QUESTIONS  # the long article got several windows
    assert trainer.global_step == 2 * math.ceil(len(dm.train_features) / 4)

    metrics = trainer.callback_metrics
    for name in ("exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1"):
        assert 0.0 <= float(metrics[f"val/{name}"]) <= 100.0, name
    # Every window of every question was collected across the evaluation batches, so all questions are scored.
    assert float(metrics["val/total"]) == N_QUESTIONS
    assert float(metrics["val/HasAns_total"]) == N_ANSWERABLE
    assert float(metrics["val/NoAns_total"]) == N_QUESTIONS - N_ANSWERABLE
    overall = (N_ANSWERABLE * float(metrics["val/HasAns_f1"])
               + (N_QUESTIONS - N_ANSWERABLE) * float(metrics["val/NoAns_f1"])) / N_QUESTIONS
    assert float(metrics["val/f1"]) == pytest.approx(overall, abs=1e-3)

    log_dir = Path(trainer.log_dir)
    assert (log_dir / "checkpoints" / "last.ckpt").is_file()
    pattern = json.loads((log_dir / "rank_pattern.json").read_text())
    assert pattern["total_rank"] == 12  # target_r 1 x 12 adapted matrices of the tiny BERT
    ckpt = torch.load(log_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["hyper_parameters"]["version_2"] is True
    assert sum(k.endswith("rank_mask") for k in ckpt["state_dict"]) == 12
    # the span head is trained in full next to the adapters, the rest of the backbone is frozen
    trainable = {n for n, p in cli.model.named_parameters() if p.requires_grad}
    assert {"model.qa_outputs.weight", "model.qa_outputs.bias"} <= trainable
    assert all(".lora_" in n or ".qa_outputs." in n for n in trainable)


def test_full_fine_tuning_memorises_the_answers(tmp_path, tiny_qa_backbone):
    """Labels, windows and post-processing agree: a model that fits its training file answers it."""
    cli = fit_squad(tmp_path, tiny_qa_backbone, "--model.method", "full", "--model.learning_rate", "3e-3",
                    "--model.warmup_steps", "0", "--trainer.max_epochs", "60", "--trainer.check_val_every_n_epoch",
                    "60", "--trainer.num_sanity_val_steps", "0")
    metrics = cli.trainer.callback_metrics
    values = {k: float(v) for k, v in metrics.items()}
    # spans found for the answerable questions, "" chosen for (most of) the unanswerable ones
    assert values["val/exact"] >= 80.0 and values["val/HasAns_f1"] >= 80.0 and values["val/NoAns_exact"] >= 60.0, values


def fit_error(capsys, tmp_path: Path, backbone: str, *extra: str) -> str:
    """The one-line error (exit status 2, no traceback) of a SQuAD fit refused for its settings."""
    with pytest.raises(SystemExit) as info:
        fit_squad(tmp_path, backbone, *extra)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def test_version_mismatch_between_model_and_data_is_refused(capsys, tmp_path, tiny_qa_backbone):
    message = fit_error(capsys, tmp_path, tiny_qa_backbone, "--model.version_2", "false")
    assert message == ("cli.py fit: error: the model is set up for SQuAD v1.1 (version_2=False) but the data is SQuAD "
                       "v2.0; set --model.version_2 to match --data.version")


def test_window_too_small_for_the_questions_is_refused_before_training(capsys, tmp_path, tiny_qa_backbone):
    """A window that cannot hold the longest question plus doc_stride context tokens fails at setup, naming it
    (the tokenizer itself would panic in Rust, which `except Exception` does not catch)."""
    message = fit_error(capsys, tmp_path, tiny_qa_backbone, "--data.max_seq_length", "16")
    assert "SQuAD train: 6 of 10 questions do not fit max_seq_length=16 with doc_stride=8" in message
    # the longest question, "who read the book in the city ?", is 8 tokens: 3 special + 8 + 8 stride + 1
    assert "question 'news-1' has 8 tokens" in message and "--data.max_seq_length to at least 20" in message
    assert not list((tmp_path / "run").rglob("*.ckpt"))
