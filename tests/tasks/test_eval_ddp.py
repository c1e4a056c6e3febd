"""Evaluation under DDP counts every dataset row once.

Lightning gives each of N processes a ``DistributedSampler`` shard, and the sampler pads the evaluation set to a
multiple of N by repeating its first rows. A metric that sums what every process saw then counts those rows twice.
Two CPU processes (gloo, ``ddp_spawn``) on a set of an odd size, so one row is repeated: the metrics equal those of
one process exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from adalora_pl.tasks.causal_lm_module import CausalLMModule
from adalora_pl.tasks.glue import glue_metrics
from adalora_pl.tasks.metrics import DistinctRows
from datamodules.instruction import InstructionDataModule
from tests.builders import INSTRUCTION_ROWS, save_tiny_causal_lm, write_jsonl
from tests.lightning_modules import OrderlyDistributedTeardown

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


class OneThread(pl.Callback):
    """One torch thread in every spawned process too: the same arithmetic as the single-process run, bit for bit."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        torch.set_num_threads(1)


class RowsSeen(pl.Callback):
    """Writes how many evaluation rows each process was given (the sampler's padding included)."""

    def __init__(self, directory: str, key: str) -> None:
        self.directory, self.key, self.rows = directory, key, 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self.rows += len(batch[self.key])

    def on_validation_end(self, trainer, pl_module) -> None:
        Path(self.directory, f"rows_rank{trainer.global_rank}.json").write_text(json.dumps(self.rows))


def validate(tmp_path: Path, module: pl.LightningModule, datamodule=None, *, devices: int, key: str) -> dict:
    folder = tmp_path / f"devices{devices}"
    folder.mkdir()
    callbacks = [OneThread(), RowsSeen(str(folder), key)]
    if devices > 1:
        callbacks.append(OrderlyDistributedTeardown())
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(folder), callbacks=callbacks)
    metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    seen = [json.loads(p.read_text()) for p in sorted(folder.glob("rows_rank*.json"))]
    return {**{k: float(v) for k, v in metrics.items()}, "rows_seen": sum(seen)}


def validate_alone_and_on_two(tmp_path: Path, module: pl.LightningModule, datamodule) -> tuple[dict, dict]:
    """The metrics of one process and of two, after giving the LoRA update a nonzero B (so the adapters matter)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0, 0.5)
    return (validate(tmp_path, module, datamodule, devices=1, key="example_index"),
            validate(tmp_path, module, datamodule, devices=2, key="example_index"))


ROWS = INSTRUCTION_ROWS


def test_causal_lm_loss_accuracy_and_rouge_count_each_example_once(tmp_path):
    backbone = save_tiny_causal_lm(tmp_path / "llama", "llama")
    path = write_jsonl(tmp_path / "v.jsonl", ROWS)  # 5 rows: the sampler repeats one for the second process
    # Batches of one: every example is computed alone in both runs, so its numbers are the same bits.
    data = InstructionDataModule(tokenizer=backbone, train_file=str(path), validation_file=str(path),
                                 max_seq_length=48, eval_batch_size=1)
    torch.manual_seed(0)
    module = CausalLMModule(backbone=backbone, method="lora", init_r=4, lora_alpha=8, max_new_tokens=3)
    single, ddp = validate_alone_and_on_two(tmp_path, module, data)
    assert single["rows_seen"] == 5 and ddp["rows_seen"] == 6  # one row was evaluated twice under DDP ...
    for name in ("val/loss", "val/perplexity", "val/token_accuracy", "val/rouge1", "val/rouge2", "val/rougeL"):
        assert ddp[name] == single[name], name  # ... and counted once


LABELS = [1, 0, 1, 1, 0, 0, 1]
PREDS = [1, 1, 1, 0, 0, 0, 1]


class FixedPredictions(pl.LightningModule):
    """Scores fixed predictions of 7 rows with the GLUE CoLA metric, once counting each row once (DistinctRows) and
    once as the plain metric does."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Linear(1, 1)
        self.distinct = DistinctRows(glue_metrics("cola"))
        self.plain = glue_metrics("cola")

    def val_dataloader(self) -> DataLoader:
        rows = [{"index": i, "preds": p, "labels": y} for i, (p, y) in enumerate(zip(PREDS, LABELS, strict=True))]
        return DataLoader(rows, batch_size=2)

    def validation_step(self, batch, batch_idx) -> None:
        self.distinct.update(batch["index"], batch["preds"], batch["labels"])
        self.plain.update(batch["preds"], batch["labels"])

    def on_validation_epoch_end(self) -> None:
        self.log("val/mcc", self.distinct.compute()["mcc"])
        self.log("val/plain_mcc", self.plain.compute()["mcc"])
        self.distinct.reset()
        self.plain.reset()


def matthews(preds: list[int], labels: list[int]) -> float:
    tp = sum(p == y == 1 for p, y in zip(preds, labels, strict=True))
    tn = sum(p == y == 0 for p, y in zip(preds, labels, strict=True))
    fp = sum(p == 1 and y == 0 for p, y in zip(preds, labels, strict=True))
    fn = sum(p == 0 and y == 1 for p, y in zip(preds, labels, strict=True))
    return (tp * tn - fp * fn) / ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5


def test_distinct_rows_gives_the_single_process_glue_metric(tmp_path):
    single = validate(tmp_path, FixedPredictions(), devices=1, key="index")
    ddp = validate(tmp_path, FixedPredictions(), devices=2, key="index")
    assert single["rows_seen"] == 7 and ddp["rows_seen"] == 8
    expected = matthews(PREDS, LABELS)
    assert single["val/mcc"] == single["val/plain_mcc"] == pytest.approx(expected, abs=1e-6)
    assert ddp["val/mcc"] == single["val/mcc"]
    # what the plain metric makes of the repeated row 0 (a true positive counted twice)
    assert ddp["val/plain_mcc"] == pytest.approx(matthews(PREDS + PREDS[:1], LABELS + LABELS[:1]), abs=1e-6)
    assert ddp["val/plain_mcc"] != pytest.approx(expected, abs=1e-3)


def test_glue_classifier_loss_and_mcc_count_each_dev_row_once(tmp_path, spread_backbone):
    """The GLUE module end to end: its data module numbers the dev rows, and loss and MCC over 7 rows on two
    processes (8 evaluated) equal those of one process."""
    from adalora_pl.tasks.glue_module import GLUEClassifier
    from datamodules.glue import GLUEDataModule
    from tests.builders import write_cola

    data_dir = write_cola(tmp_path / "CoLA", rows=7)
    data = GLUEDataModule(task_name="cola", tokenizer=spread_backbone, data_dir=str(data_dir), max_seq_length=16,
                          eval_batch_size=1)
    torch.manual_seed(0)
    module = GLUEClassifier(task_name="cola", backbone=spread_backbone, method="lora", init_r=2, lora_alpha=4)
    single, ddp = validate_alone_and_on_two(tmp_path, module, data)
    assert single["rows_seen"] == 7 and ddp["rows_seen"] == 8
    assert ddp["val/mcc"] == single["val/mcc"]
    # The spawned processes' BERT logits differ from the parent's in the last float32 bit (the CPU matmul kernels
    # are not bitwise reproducible across processes), so the loss is compared at 1e-6; row 0 counted twice would
    # move it by about 1e-1 here.
    assert ddp["val/loss_validation"] == pytest.approx(single["val/loss_validation"], rel=1e-6, abs=0)
