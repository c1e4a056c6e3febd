"""Adapter-only checkpoints (``checkpoint_weights="adapters"``, the task modules' default): what they hold, their size
against the base, a bitwise resume, validation in a fresh process, the refusal of another base, and exports equal
to those of a full checkpoint."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from torch.utils.data import DataLoader, DistributedSampler
from transformers import BertForSequenceClassification

from adalora_pl.cli import main
from adalora_pl.errors import ConfigError
from adalora_pl.io.checkpoint import (
    BASE_KEY,
    FINGERPRINT_SAMPLES,
    WEIGHTS_KEY,
    base_fingerprint,
    fingerprint_differences,
    load_task_module,
)
from adalora_pl.tasks.glue_module import GLUEClassifier
from datamodules.glue import GLUEDataModule
from tests.builders import (
    REPO_ROOT,
    assert_same_optimizer_state,
    fit_tiny,
    make_tiny_tokenizer,
    tiny_bert_config,
    write_cola,
)

# A base whose weights outweigh a checkpoint's fixed overhead (pickle, zip entries, hyperparameters: ~130 KB), so
# that sizes compare weights: 4 layers of width 256, 3.2M parameters, 13 MB in float32.
WIDE = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4}
# What a checkpoint holds besides its tensors, at most (measured: 130 KB with the fingerprint).
OVERHEAD_BYTES = 256 * 1024
ADAPTER_BUFFERS = (".rank_mask", ".ranknum")
EXPORT_FORMATS = ("adapter", "peft", "lora", "merged")


def save_backbone(folder: Path, seed: int = 0, **config) -> str:
    """A tiny BERT classifier with the tiny tokenizer, its weights drawn with ``seed``."""
    tokenizer = make_tiny_tokenizer(folder)
    torch.manual_seed(seed)
    BertForSequenceClassification(tiny_bert_config(vocab_size=len(tokenizer), **config)).save_pretrained(folder)
    return str(folder)


def read(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def trained_keys(module: torch.nn.Module) -> set[str]:
    """What an adapter-only checkpoint must hold, counted independently of the code under test: every trainable
    parameter and the adapters' mask buffers."""
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    return trainable | {name for name, _ in module.named_buffers() if name.endswith(ADAPTER_BUFFERS)}


@pytest.fixture(scope="module")
def wide_backbone(tmp_path_factory) -> str:
    return save_backbone(tmp_path_factory.mktemp("wide_backbone"), **WIDE)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, wide_backbone) -> dict:
    """``{"adapters": (cli, last.ckpt), "full": (cli, last.ckpt)}``: one epoch of `cli.py fit` on 16 CoLA-like rows,
    once per ``--model.checkpoint_weights``, with the recipe's seed (the two runs train the same weights)."""
    tmp = tmp_path_factory.mktemp("checkpoint_runs")
    data = write_cola(tmp / "CoLA", rows=16)
    runs = {}
    for weights in ("adapters", "full"):
        cli = fit_tiny(tmp / weights, "cola.yaml", wide_backbone, data, "--trainer.max_epochs", "1",
                       "--model.checkpoint_weights", weights, "--trainer.enable_model_summary", "false")
        runs[weights] = (cli, Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt")
    runs["data"] = data
    return runs


# ---------------------------------------------------------------------------------------- content and size
def test_adapter_checkpoint_holds_what_trains_and_records_its_base(runs, wide_backbone):
    cli, path = runs["adapters"]
    module, ckpt = cli.model, read(path)
    assert ckpt[WEIGHTS_KEY] == "adapters"
    expected = trained_keys(module)
    # 4 layers x 6 adapted matrices x (lora_A, lora_E, lora_B, rank_mask, ranknum), the pooler and the classifier
    assert len(expected) == 24 * 5 + 2 + 2
    assert set(ckpt["state_dict"]) == expected
    live = module.state_dict()
    for key, value in ckpt["state_dict"].items():
        assert torch.equal(value, live[key]), key  # the trained values (masked singular values at zero, as live)
    # the rest of the checkpoint is Lightning's as ever: optimizer, schedule, loops, the callback's state
    assert len(ckpt["optimizer_states"][0]["state"]) == sum(p.requires_grad for p in module.parameters())
    assert ckpt["lr_schedulers"] and ckpt["loops"]
    assert set(ckpt["callbacks"]["AdaLoRACallback"]) == {"settings", "allocator", "last_global_step", "live_lora_E"}
    record = ckpt[BASE_KEY]
    assert (record["backbone"], record["revision"], record["quantization"]) == (
        wide_backbone, None, {"quantization": "none"})  # a local folder has no revision
    frozen = set(live) - expected
    fingerprint = record["fingerprint"]
    assert set(fingerprint["keys"]) == set(fingerprint["names"]) == frozen  # every frozen tensor of a float32 base
    assert fingerprint["samples"].shape == (len(frozen), FINGERPRINT_SAMPLES)
    # ... and a full-precision copy of a few of its values
    row = fingerprint["names"].index("model.bert.embeddings.word_embeddings.weight")
    table = live["model.bert.embeddings.word_embeddings.weight"].flatten().double()
    assert fingerprint["samples"][row][0] == table[0] and fingerprint["samples"][row][-1] == table[-1]


def test_adapter_checkpoint_is_a_small_fraction_of_the_base_and_full_holds_it(runs, wide_backbone):
    (cli, adapters_path), (_, full_path) = runs["adapters"], runs["full"]
    module = cli.model
    base_bytes = (Path(wide_backbone) / "model.safetensors").stat().st_size
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    adapter = sum(p.numel() for name, p in module.named_parameters() if ".lora_" in name)
    # float32: each trained weight with AdamW's two moments, and AdaLoRA's two importance averages per adapter weight
    expected_bytes = 4 * (3 * trainable + 2 * adapter)
    ratio_bound = (expected_bytes + OVERHEAD_BYTES) / base_bytes
    assert ratio_bound < 0.2  # 122K trainable (56K adapter) parameters against 3.3M in the base
    size = adapters_path.stat().st_size
    assert expected_bytes <= size and size / base_bytes <= ratio_bound, (size, base_bytes, ratio_bound)

    full = read(full_path)
    assert full[WEIGHTS_KEY] == "full" and BASE_KEY not in full
    assert set(full["state_dict"]) == set(module.state_dict())
    frozen = set(module.state_dict()) - trained_keys(module)
    frozen_bytes = sum(full["state_dict"][k].numel() * full["state_dict"][k].element_size() for k in frozen)
    assert frozen_bytes > 0.95 * base_bytes  # the base is all frozen but for the pooler and the classifier
    # the full checkpoint holds the frozen base on top of the adapter-only one (which holds a 9 KB fingerprint)
    extra = full_path.stat().st_size - size
    assert frozen_bytes - 64 * 1024 <= extra <= frozen_bytes + 64 * 1024, (extra, frozen_bytes)


def test_full_finetuning_checkpoints_hold_every_weight(tiny_backbone):
    module = GLUEClassifier(backbone=tiny_backbone, method="full")
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint[WEIGHTS_KEY] == "full" and BASE_KEY not in checkpoint
    assert set(checkpoint["state_dict"]) == set(module.state_dict())  # everything trains


# ---------------------------------------------------------------------------------------- loading
class EpochOrderedGLUE(GLUEDataModule):
    """GLUE rows whose training order depends on the epoch alone (a sampler with ``set_epoch``, which Lightning calls
    before each epoch): the same in an uninterrupted run and a resumed one. The default shuffle draws from torch's
    global RNG, whose state is no part of a checkpoint."""

    def train_dataloader(self) -> DataLoader:
        rows = self.datasets["train"]
        return DataLoader(rows, batch_size=self.batch_size, collate_fn=self.collator,
                          sampler=DistributedSampler(rows, num_replicas=1, rank=0, shuffle=True, seed=0))


# 16 rows in batches of 4: 4 steps an epoch; the budget falls from step 2 to step 12 (total 16 - tfinal 4).
SCHEDULE = dict(task_name="cola", init_r=3, target_r=1, tinit=2, tfinal=4, delta_t=1, total_step=16,
                warmup_steps=2, learning_rate=5e-3)


def fit_epochs(tmp_path: Path, name: str, backbone: str, data: Path, epochs: int, ckpt_path: Path | None = None):
    """A GLUEClassifier fit to ``epochs`` (resumed from ``ckpt_path``); (module, trainer, its last.ckpt)."""
    pl.seed_everything(0)
    module = GLUEClassifier(backbone=backbone, **SCHEDULE)
    datamodule = EpochOrderedGLUE(task_name="cola", tokenizer=backbone, data_dir=str(data), batch_size=4,
                                max_seq_length=32)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_progress_bar=False,
        enable_model_summary=False, deterministic=True, limit_val_batches=0, num_sanity_val_steps=0,
        default_root_dir=tmp_path / name,  # the rank pattern goes to the log dir, not the working directory
        callbacks=[ModelCheckpoint(dirpath=tmp_path / name, save_last=True, save_on_train_epoch_end=True)],
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return module, trainer, tmp_path / name / "last.ckpt"


@pytest.mark.slow
def test_resume_from_an_adapter_checkpoint_is_bitwise(tmp_path, tiny_backbone):
    """Stop at 8 steps (mid-schedule), resume from the adapter-only checkpoint to 16: the adapters, masks, heads,
    importance averages and optimizer state equal those of an uninterrupted run."""
    data = write_cola(tmp_path / "CoLA", rows=16)
    whole, whole_trainer, _ = fit_epochs(tmp_path, "whole", tiny_backbone, data, 4)
    _, first_trainer, ckpt = fit_epochs(tmp_path, "first", tiny_backbone, data, 2)
    assert first_trainer.global_step == 8 and read(ckpt)[WEIGHTS_KEY] == "adapters"
    resumed, resumed_trainer, _ = fit_epochs(tmp_path, "resumed", tiny_backbone, data, 4, ckpt_path=ckpt)
    assert whole_trainer.global_step == resumed_trainer.global_step == 16

    expected, got = whole.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    for key in sorted(trained_keys(whole)):
        assert torch.equal(expected[key], got[key]), key
    masks = [got[k] for k in trained_keys(resumed) if k.endswith(".rank_mask")]
    assert sum(int(m.sum()) for m in masks) == 12  # pruned from 3 to target_r 1 per matrix (still falling at 8)
    a, b = whole.schedule_callback.allocator, resumed.schedule_callback.allocator
    assert torch.equal(a.exp_avg_ipt, b.exp_avg_ipt) and torch.equal(a.exp_avg_unc, b.exp_avg_unc)
    assert_same_optimizer_state(whole_trainer, resumed_trainer)


METRICS_SCRIPT = (
    "import json, sys\n"
    "from adalora_pl.cli import main\n"
    "cli = main(sys.argv[1:])\n"
    "print('METRICS ' + json.dumps({k: float(v) for k, v in cli.trainer.callback_metrics.items()}))\n"
)


@pytest.mark.slow
def test_validate_in_a_fresh_process_gives_the_live_loss(tmp_path, runs, wide_backbone):
    cli, ckpt = runs["adapters"]
    live = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    args = ["validate", "--config", str(REPO_ROOT / "configs" / "cola.yaml"), "--model.backbone", wide_backbone,
            "--data.data_dir", str(runs["data"]), "--data.batch_size", "8", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path / "validate"), "--ckpt_path", str(ckpt)]
    # A fresh interpreter: nothing of the fit (modules, caches, the loaded base) is shared with it.
    done = subprocess.run([sys.executable, "-c", METRICS_SCRIPT, *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("METRICS "))
    fresh = json.loads(line.removeprefix("METRICS "))
    assert set(fresh) == set(live) == {"val/mcc", "val/loss_validation"}
    assert fresh["val/loss_validation"] == pytest.approx(live["val/loss_validation"], rel=1e-6, abs=1e-7)
    assert fresh["val/mcc"] == pytest.approx(live["val/mcc"], abs=1e-6)
    # and in this process, Lightning's own load_from_checkpoint gives the trained weights
    loaded = GLUEClassifier.load_from_checkpoint(ckpt, map_location="cpu")
    for key, value in cli.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded.strict_loading  # the next checkpoint loads strictly again


def test_another_base_is_refused(tmp_path, runs, capsys):
    """The same architecture with weights drawn from another seed: validate, test and export refuse it in one line
    naming the backbone and what differs."""
    _, ckpt = runs["adapters"]
    other = save_backbone(tmp_path / "other", seed=1, **WIDE)
    state = read(ckpt)
    state["hyper_parameters"]["backbone"] = other
    moved = tmp_path / "moved.ckpt"
    torch.save(state, moved)
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--config", str(REPO_ROOT / "configs" / "cola.yaml"), "--model.backbone", other,
              "--data.data_dir", str(runs["data"]),
              "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "v"),
              "--ckpt_path", str(moved)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    frozen = len(state[BASE_KEY]["fingerprint"]["keys"])
    # the norms (ones and zeros whatever the seed) are the same; the weight matrices differ
    where, backbone = re.escape(str(moved)), re.escape(other)
    assert re.match(rf"cli.py validate: error: {where} does not match the backbone '{backbone}': the values of \d+ "
                    rf"of {frozen} frozen tensors differ \(model.bert.embeddings.word_embeddings.weight, ", err), err
    assert err.endswith(f"for the base '{state[BASE_KEY]['backbone']}'; load it with that base"), err

    with pytest.raises(ConfigError, match=f"^{re.escape(str(moved))} does not match the backbone"):
        load_task_module(moved)
    with pytest.raises(SystemExit):
        main(["export", "--ckpt_path", str(moved), "--format", "adapter", "--output", str(tmp_path / "out")])
    assert "does not match the backbone" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match=f"^{re.escape(str(ckpt))} does not match the backbone '{re.escape(other)}'"):
        pl.Trainer(logger=False, enable_progress_bar=False, default_root_dir=tmp_path).test(
            GLUEClassifier(backbone=other, task_name="cola"), datamodule=runs["adapters"][0].datamodule,
            ckpt_path=ckpt)


def test_other_quantization_or_keys_are_refused(tmp_path, runs):
    _, ckpt = runs["adapters"]

    def edited(name: str, edit) -> Path:
        state = read(ckpt)
        edit(state)
        torch.save(state, tmp_path / name)
        return tmp_path / name

    nf4 = edited("nf4.ckpt", lambda s: s[BASE_KEY].update(
        quantization={"quantization": "nf4", "quantization_compute_dtype": "bfloat16", "double_quant": False}))
    with pytest.raises(ConfigError, match="the base is loaded with quantization=none here, with quantization=nf4, "
                                          "quantization_compute_dtype=bfloat16, double_quant=False when saved"):
        load_task_module(nf4)
    key = "model.bert.encoder.layer.0.attention.self.query.lora_A"
    lacking = edited("lacking.ckpt", lambda s: s["state_dict"].pop(key))
    with pytest.raises(ConfigError, match=rf"1 trained tensors missing \(e.g. \['{key}'\]\), 0 unexpected"):
        load_task_module(lacking)
    extra = edited("extra.ckpt", lambda s: s["state_dict"].update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(ConfigError, match=r"0 trained tensors missing \(e.g. \[\]\), 1 unexpected"):
        load_task_module(extra)
    no_record = edited("no_record.ckpt", lambda s: s.pop(BASE_KEY))
    with pytest.raises(ConfigError, match="holds only adapters .* but no record of its base"):
        load_task_module(no_record)

    # a full checkpoint still loads strictly: a frozen key missing from it fails
    state = read(runs["full"][1])
    del state["state_dict"]["model.bert.embeddings.word_embeddings.weight"]
    torch.save(state, tmp_path / "full_lacking.ckpt")
    with pytest.raises(RuntimeError, match='Missing key.*"model.bert.embeddings.word_embeddings.weight"'):
        GLUEClassifier.load_from_checkpoint(tmp_path / "full_lacking.ckpt", map_location="cpu")


def test_fingerprint_allows_another_dtype_of_the_same_base_only():
    def fingerprint(model: torch.nn.Module) -> dict:
        return base_fingerprint(model.requires_grad_(False))

    torch.manual_seed(0)
    base = BertForSequenceClassification(tiny_bert_config())
    saved = fingerprint(base)
    assert fingerprint_differences(saved, fingerprint(base)) == []
    # a bf16-true run saved the base rounded: the same weights, up to one rounding of bfloat16
    assert fingerprint_differences(fingerprint(copy.deepcopy(base).to(torch.bfloat16)), saved) == []
    with torch.no_grad():
        base.bert.encoder.layer[1].output.dense.weight.mul_(1.01)  # one tensor changed by 1 %
    assert fingerprint_differences(saved, fingerprint(base)) == [
        f"the values of 1 of {len(saved['names'])} frozen tensors differ (bert.encoder.layer.1.output.dense.weight)"]
    torch.manual_seed(0)
    wider = fingerprint(BertForSequenceClassification(tiny_bert_config(vocab_size=120)))
    assert fingerprint_differences(saved, wider)[0] == (
        "1 frozen tensors have another shape (bert.embeddings.word_embeddings.weight (120, 32) here, (100, 32) when "
        "saved)")


# ---------------------------------------------------------------------------------------- export
def _without(value, key: str):
    """``value`` (parsed JSON) without ``key`` at any depth."""
    if isinstance(value, dict):
        return {k: _without(v, key) for k, v in value.items() if k != key}
    if isinstance(value, list):
        return [_without(v, key) for v in value]
    return value


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
def test_export_from_an_adapter_checkpoint_equals_export_from_a_full_one(tmp_path, runs, fmt):
    adapters, full = read(runs["adapters"][1]), read(runs["full"][1])
    for key, value in adapters["state_dict"].items():  # the two runs trained the same weights
        assert torch.equal(value, full["state_dict"][key]), key
    outputs = {}
    for weights in ("adapters", "full"):
        outputs[weights] = tmp_path / weights
        main(["export", "--ckpt_path", str(runs[weights][1]), "--format", fmt, "--output", str(outputs[weights])])
    files = sorted(p.relative_to(outputs["adapters"]) for p in outputs["adapters"].rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(outputs["full"]) for p in outputs["full"].rglob("*") if p.is_file())
    assert any(f.suffix == ".safetensors" for f in files)
    for name in files:
        a, b = outputs["adapters"] / name, outputs["full"] / name
        if name.suffix == ".safetensors":
            tensors_a, tensors_b = load_file(a), load_file(b)
            assert tensors_a.keys() == tensors_b.keys() and tensors_a, name
            for key in tensors_a:
                assert torch.equal(tensors_a[key], tensors_b[key]), (name, key)
        elif name.suffix == ".json":
            # the run's settings travel into some configs: the two differ in checkpoint_weights only
            assert _without(json.loads(a.read_text()), "checkpoint_weights") == \
                _without(json.loads(b.read_text()), "checkpoint_weights"), name
        else:
            assert a.read_bytes() == b.read_bytes(), name
