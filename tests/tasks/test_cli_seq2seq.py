"""Summarization through the command line (tiny BART on a few local examples) and the four new configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from adalora_pl.cli import main
from adalora_pl.tasks.rouge import rouge_scores
from tests.builders import REPO_ROOT, print_config, write_csv, write_jsonl

# Documents and summaries in the tiny tokenizer's words.
PAIRS = [
    ("the cat sat on the mat and the dog ran in the city", "the cat sat on the mat"),
    ("paris is the capital city of france and the river is in the city", "paris is the capital of france"),
    ("people said the film was great and they love the movie", "people love the film"),
    ("she read the book in the city and said it was good", "she read a good book"),
]
N_EXAMPLES = 12
XSUM_ROWS = [{"id": f"doc-{i}", "document": PAIRS[i % 4][0], "summary": PAIRS[i % 4][1]} for i in range(N_EXAMPLES)]
CNNDM_ROWS = [{"article": PAIRS[i % 4][0], "highlights": PAIRS[i % 4][1], "id": f"art-{i}"} for i in range(N_EXAMPLES)]
# (init_r, target_r, tinit, tfinal, delta_t, lora_alpha, learning rate, epochs, beams, source/target, warm-up, Lsum)
PAPER_SETTINGS = {
    "squad_v1": (2, 1, 5000, 50000, 100, 16, 1e-3, 12, None, (384, 128), 1000, None),
    "squad_v2": (2, 1, 5000, 50000, 100, 16, 1e-3, 12, None, (384, 128), 1000, None),
    "xsum": (12, 8, 6000, 25000, 100, 32, 5e-4, 25, 8, (768, 64), 3000, False),
    "cnndm": (4, 2, 5000, 85000, 100, 32, 5e-4, 15, 4, (1024, 160), 3000, True),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def summarize_args(tmp_path: Path, config: str, backbone: str, data: Path, *extra: str) -> list[str]:
    return [
        "--config", str(REPO_ROOT / "configs" / config),
        "--model.backbone", backbone, "--data.train_file", str(data), "--data.validation_file", str(data),
        "--data.max_source_length", "24", "--data.max_target_length", "10", "--data.batch_size", "4",
        "--model.tinit", "0.2", "--model.tfinal", "0.3", "--model.delta_t", "1", "--model.warmup_steps", "2",
        "--trainer.accumulate_grad_batches", "1", "--trainer.max_epochs", "3",
        "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.enable_progress_bar", "false",
        "--trainer.log_every_n_steps", "1",
        *extra,
    ]


def read_predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_rouge_of_predictions(metrics, rows: list[dict], stage: str = "val") -> dict[str, float]:
    """The logged ROUGE is the ROUGE of the written predictions against their references, in percent."""
    expected = rouge_scores([r["prediction"] for r in rows], [r["reference"] for r in rows])
    for key, value in expected.items():
        assert float(metrics[f"{stage}/{key}"]) == pytest.approx(100 * value, abs=1e-3), key
    return expected


def test_cli_fit_xsum_end_to_end(tmp_path, tiny_bart):
    data = write_jsonl(tmp_path / "xsum.jsonl", XSUM_ROWS)
    cli = main(["fit", *summarize_args(tmp_path, "xsum.yaml", tiny_bart, data)])
    trainer, module = cli.trainer, cli.model
    assert cli.datamodule.hparams.tokenizer == tiny_bart  # linked from --model.backbone
    assert trainer.global_step == 3 * 3  # 12 examples / batch 4 x 3 epochs
    # generation follows the data's label length and the config's 8 beams
    assert module.generation_kwargs() == {"num_beams": 8, "max_new_tokens": 10, "early_stopping": True}
    assert len(module.adapters) == 16  # encoder: q/k/v/out_proj, fc1, fc2; decoder: self + cross attention, fc1, fc2

    log_dir = Path(trainer.log_dir)
    files = sorted(p.name for p in log_dir.glob("predictions_*.jsonl"))
    assert files == [f"predictions_val_epoch{e}.jsonl" for e in range(3)]
    rows = read_predictions(log_dir / "predictions_val_epoch2.jsonl")
    assert [r["id"] for r in rows] == [f"doc-{i}" for i in range(N_EXAMPLES)]
    assert [r["reference"] for r in rows] == [PAIRS[i % 4][1] for i in range(N_EXAMPLES)]
    assert all(isinstance(r["prediction"], str) and "[SEP]" not in r["prediction"] for r in rows)

    metrics = trainer.callback_metrics
    assert_rouge_of_predictions(metrics, rows)
    assert "val/rougeLsum" not in metrics and "val/loss" in metrics

    assert (log_dir / "checkpoints" / "last.ckpt").is_file()
    pattern = json.loads((log_dir / "rank_pattern.json").read_text())
    assert pattern["total_rank"] == 16 * 8  # target_r 8 x 16 adapted matrices
    # only adapters train: the lm_head (tied to the embeddings) stays frozen
    assert all(".lora_" in n for n, p in module.named_parameters() if p.requires_grad)

    # `test` from the checkpoint scores the same data (no test file: the validation file) and writes its own file
    tested = main(["test", *summarize_args(tmp_path / "test", "xsum.yaml", tiny_bart, data),
                   "--ckpt_path", str(log_dir / "checkpoints" / "last.ckpt")])
    test_files = list(Path(tested.trainer.log_dir).glob("predictions_test_epoch*.jsonl"))
    assert len(test_files) == 1 and len(read_predictions(test_files[0])) == N_EXAMPLES
    assert {"test/rouge1", "test/rouge2", "test/rougeL"} <= set(tested.trainer.callback_metrics)


def test_full_fine_tuning_learns_the_summaries(tmp_path, tiny_bart):
    """Teacher forcing, generation and decoding agree: a model that fits its training file reproduces it."""
    data = write_jsonl(tmp_path / "xsum.jsonl", XSUM_ROWS)
    cli = main(["fit", *summarize_args(tmp_path, "xsum.yaml", tiny_bart, data),
                "--model.method", "full", "--model.learning_rate", "1e-2", "--model.warmup_steps", "0",
                "--model.num_beams", "2", "--trainer.max_epochs", "80", "--trainer.check_val_every_n_epoch", "80",
                "--trainer.num_sanity_val_steps", "0"])
    rows = read_predictions(Path(cli.trainer.log_dir) / "predictions_val_epoch79.jsonl")
    scores = assert_rouge_of_predictions(cli.trainer.callback_metrics, rows)
    assert scores["rouge1"] >= 0.8 and scores["rougeL"] >= 0.8, (scores, rows[:4])


def test_cli_fit_cnndm_lora_from_csv_reports_lsum(tmp_path, tiny_bart):
    data = write_csv(tmp_path / "cnndm.csv", CNNDM_ROWS)
    cli = main(["fit", *summarize_args(tmp_path, "cnndm.yaml", tiny_bart, data, "--model.method", "lora",
                                       "--trainer.max_epochs", "1", "--model.num_beams", "2")])
    metrics = cli.trainer.callback_metrics
    assert {"val/rouge1", "val/rouge2", "val/rougeL", "val/rougeLsum"} <= set(metrics)
    log_dir = Path(cli.trainer.log_dir)
    assert not (log_dir / "rank_pattern.json").exists()  # LoRA has no rank allocation
    rows = read_predictions(log_dir / "predictions_val_epoch0.jsonl")
    assert [r["id"] for r in rows] == [f"art-{i}" for i in range(N_EXAMPLES)]  # the CSV's id column
    # LoRA at r = init_r = 4 on the 16 adapted matrices: 4 x (in + out) each, nothing else trainable
    adapters = sum(p.numel() for n, p in cli.model.named_parameters() if ".lora_" in n)
    assert adapters == 4 * (12 * (32 + 32) + 2 * (32 + 64) + 2 * (64 + 32))
    assert cli.model.trainable_parameter_count() == adapters


def test_default_head_names_match_nothing_in_bart(tiny_bart):
    """The generic head names (classifier, pooler, qa_outputs, score) are absent from BART: no error, nothing
    trained besides the adapters, and the tied lm_head/embeddings stay frozen."""
    from adalora_pl import DEFAULT_TRAINABLE_MODULES
    from adalora_pl.tasks.summarization_module import Seq2SeqSummarizer

    for heads in (tuple(DEFAULT_TRAINABLE_MODULES), ()):
        module = Seq2SeqSummarizer(backbone=tiny_bart, trainable_modules=heads, init_r=4, target_r=2)
        trainable = [n for n, p in module.named_parameters() if p.requires_grad]
        assert trainable and all(".lora_" in n for n in trainable), heads
        assert module.model.lm_head.weight is module.model.model.shared.weight
        assert not module.model.lm_head.weight.requires_grad


@pytest.mark.parametrize("name", sorted(PAPER_SETTINGS))
def test_print_config_of_the_new_configs(name, capsys, tmp_path):
    printed = print_config(capsys, REPO_ROOT / "configs" / f"{name}.yaml")
    config = yaml.safe_load(printed)
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    init_r, target_r, tinit, tfinal, delta_t, alpha, lr, epochs, beams, lengths, warmup, lsum = PAPER_SETTINGS[name]
    assert (model["init_r"], model["target_r"], model["tinit"], model["tfinal"], model["delta_t"]) == (
        init_r, target_r, tinit, tfinal, delta_t)
    assert model["lora_alpha"] == alpha and float(model["learning_rate"]) == lr and model["warmup_steps"] == warmup
    assert model["orth_reg_weight"] == 0.1 and model["method"] == "adalora"
    assert config["trainer"]["max_epochs"] == epochs
    assert "tokenizer" not in data  # derived from --model.backbone (a link)
    if name.startswith("squad"):
        assert model["backbone"] == "microsoft/deberta-v3-base" and data["batch_size"] == 16
        assert (data["max_seq_length"], data["doc_stride"]) == lengths
        assert model["version_2"] == (name == "squad_v2") and data["version"] == name[-2:]
    else:
        assert model["backbone"] == "facebook/bart-large" and model["num_beams"] == beams
        assert (data["max_source_length"], data["max_target_length"]) == lengths
        assert model["rouge_lsum"] is lsum and model["trainable_modules"] == []
        assert model["target_modules"] == ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    # the printed config parses again, to the same config
    (tmp_path / "full.yaml").write_text(printed)
    assert print_config(capsys, tmp_path / "full.yaml") == printed


def test_summarization_loss_is_token_weighted_over_each_document_once(tmp_path, tiny_bart):
    """``val/loss`` is the NLL per summary token over the split, as for decoder LMs: every document's tokens count
    once (a mean of batch means would weigh the tokens of a short last batch more, and a distributed sampler's
    repeated rows twice)."""
    import lightning.pytorch as pl
    import torch

    from adalora_pl.tasks.summarization_module import Seq2SeqSummarizer
    from datamodules.summarization import SummarizationDataModule

    rows = XSUM_ROWS[:5]  # summaries of 4 to 6 words; batches of 2, 2 and 1
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    data = SummarizationDataModule(tokenizer=tiny_bart, validation_file=str(path), max_source_length=24,
                                   max_target_length=10, batch_size=2)
    module = Seq2SeqSummarizer(backbone=tiny_bart, method="lora", init_r=4, num_beams=1, max_new_tokens=3)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0, 0.5)
    run = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(tmp_path))
    metrics = run.validate(module, datamodule=data, verbose=False)[0]
    module.eval()
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for batch in data.val_dataloader():
            labels = batch["labels"]
            logits = module(**module.model_inputs(batch)).logits
            kept = labels != -100
            nll += torch.nn.functional.cross_entropy(logits[kept], labels[kept], reduction="sum").item()
            tokens += int(kept.sum())
    assert metrics["val/loss"] == pytest.approx(nll / tokens, rel=1e-5)
