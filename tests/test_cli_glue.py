"""The GLUE command line end to end: configs parse, fit runs on a tiny backbone, real MiniLM learns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from cli import main
from tests.conftest import REPO_ROOT, make_tiny_tokenizer
from tests.helpers import tiny_bert_config

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))
GLUE_TASKS = ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"]


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory) -> str:
    from transformers import BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny_backbone")
    tokenizer = make_tiny_tokenizer(folder)
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_bert_config(vocab_size=len(tokenizer))).save_pretrained(folder)
    return str(folder)


def write_cola(folder: Path, rows: int = 48) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    sentences = ["the cat sat on the mat", "cat the on sat mat the", "a dog ran", "ran dog a the"]
    for split in ("train", "dev"):
        lines = [f"src\t{(i + 1) % 2}\t\t{sentences[i % 4]}" for i in range(rows)]
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return folder


def write_stsb(folder: Path, rows: int = 48) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    for split in ("train", "dev"):
        lines = [header] + [
            f"{i}\tg\tf\t2012\t{i}\ts\ts\tthe cat sat\ta dog ran on the mat\t{(i % 6) * 0.9:.1f}" for i in range(rows)
        ]
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return folder


def test_every_glue_task_has_a_config_with_the_papers_settings():
    names = {p.stem for p in CONFIGS}
    assert set(GLUE_TASKS) <= names
    cola = yaml.safe_load((REPO_ROOT / "configs" / "cola.yaml").read_text())["model"]["init_args"]
    assert (cola["init_r"], cola["target_r"], cola["tinit"], cola["tfinal"], cola["delta_t"]) == (3, 1, 800, 3500, 10)
    assert cola["backbone"] == "microsoft/deberta-v3-base" and float(cola["learning_rate"]) == 8e-4


@pytest.mark.parametrize("task", GLUE_TASKS)
def test_print_config_is_complete_and_rerunnable(task, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO_ROOT / "configs" / f"{task}.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert config["model"]["init_args"]["task_name"] == task
    assert "tokenizer" not in config["data"]["init_args"]  # derived from --model.backbone (a link)
    assert "orth_reg_weight" in config["model"]["init_args"] and "max_epochs" in config["trainer"]
    # the printed config parses again
    (tmp_path / "full.yaml").write_text(printed)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "full.yaml"), "--print_config"])


def fit_tiny(tmp_path, config: str, backbone: str, data_dir: Path, *extra: str):
    cli = main([
        "fit", "--config", str(REPO_ROOT / "configs" / config),
        "--model.backbone", backbone, "--data.data_dir", str(data_dir),
        "--model.tinit", "0.2", "--model.tfinal", "0.3", "--model.delta_t", "1", "--model.warmup_steps", "2",
        "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.enable_progress_bar", "false", "--data.batch_size", "8",
        *extra,
    ])
    return cli


def test_cli_fit_cola_end_to_end(tmp_path, tiny_backbone):
    cli = fit_tiny(tmp_path, "cola.yaml", tiny_backbone, write_cola(tmp_path / "CoLA"))
    trainer = cli.trainer
    assert cli.datamodule.hparams.tokenizer == tiny_backbone  # the link from the backbone
    assert trainer.global_step == 12  # 48 rows / 8 x 2 epochs
    assert "val/mcc" in trainer.callback_metrics
    log_dir = Path(trainer.log_dir)
    assert (log_dir / "checkpoints" / "last.ckpt").is_file()
    pattern = json.loads((log_dir / "rank_pattern.json").read_text())
    assert pattern["total_rank"] == 12  # target_r 1 x 12 adapted matrices of the tiny BERT
    ckpt = torch.load(log_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["hyper_parameters"]["task_name"] == "cola"
    assert sum(k.endswith("rank_mask") for k in ckpt["state_dict"]) == 12


def test_cli_fit_stsb_regression_end_to_end(tmp_path, tiny_backbone):
    cli = fit_tiny(tmp_path, "stsb.yaml", tiny_backbone, write_stsb(tmp_path / "STS-B"))
    metrics = cli.trainer.callback_metrics
    assert {"val/pearson", "val/spearman"} <= set(metrics)
    assert cli.model.model.config.num_labels == 1
    assert (Path(cli.trainer.log_dir) / "rank_pattern.json").is_file()


def test_cli_lora_and_full_methods_share_the_harness(tmp_path, tiny_backbone):
    data = write_cola(tmp_path / "CoLA", rows=16)
    lora = fit_tiny(tmp_path / "lora", "cola.yaml", tiny_backbone, data, "--model.method", "lora")
    assert not (Path(lora.trainer.log_dir) / "rank_pattern.json").exists()  # no allocation for LoRA
    # LoRA r=3 on 12 matrices of 32x32 / 32x64: 3 x (in + out) each, plus the trained heads
    adapters = sum(p.numel() for n, p in lora.model.named_parameters() if ".lora_" in n)
    assert adapters == 3 * (4 * 2 * (32 + 32) + 2 * (32 + 64) + 2 * (64 + 32))
    full = fit_tiny(tmp_path / "full", "cola.yaml", tiny_backbone, data, "--model.method", "full")
    assert full.model.trainable_parameter_count() == sum(p.numel() for p in full.model.parameters())


def test_task_mismatch_between_model_and_data_is_refused(tmp_path, tiny_backbone):
    with pytest.raises(ValueError, match="model is set up for GLUE task 'cola' but the data is 'stsb'"):
        fit_tiny(tmp_path, "cola.yaml", tiny_backbone, write_stsb(tmp_path / "STS-B"), "--data.task_name", "stsb")


@pytest.mark.slow
def test_real_minilm_learns_on_real_cola(tmp_path, minilm_dir, real_data):
    """The real MiniLM on 320 real CoLA rows: training loss goes down over 3 epochs."""
    cli = main([
        "fit", "--config", str(REPO_ROOT / "configs" / "cola.yaml"),
        "--model.backbone", minilm_dir, "--data.data_dir", str(real_data / "glue" / "CoLA"),
        "--data.max_train_samples", "320", "--data.max_eval_samples", "128",
        "--model.tinit", "0.2", "--model.tfinal", "0.3", "--model.delta_t", "1", "--model.warmup_steps", "3",
        "--model.learning_rate", "2e-3",
        "--trainer.max_epochs", "3", "--trainer.default_root_dir", str(tmp_path), "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
    ])
    module = cli.model
    assert len(module.adapters) == 36  # six matrices x six layers
    events = sorted((Path(cli.trainer.log_dir)).glob("events.out.tfevents.*"))
    assert events, "TensorBoard events written"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(cli.trainer.log_dir))
    acc.Reload()
    epoch_losses = [e.value for e in acc.Scalars("train/loss_epoch")]
    assert len(epoch_losses) == 3
    assert epoch_losses[-1] < epoch_losses[0], epoch_losses
    assert "val/mcc" in cli.trainer.callback_metrics
