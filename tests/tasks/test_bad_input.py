"""Wrong settings and wrong input, tried as a new user would: each ends in one line that says what is wrong.

A :class:`~adalora_pl.errors.ConfigError` reaches the command line user as ``cli.py <subcommand>: error: <message>``,
the last line on stderr, with exit status 2 and no traceback, wherever it is raised: in a module or DataModule
constructor, in a DataModule's ``setup``, in the module's ``setup`` or during training. Bugs keep their traceback.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

from adalora_pl.cli import main
from adalora_pl.errors import ConfigError
from adalora_pl.injection import DEFAULT_TRAINABLE_MODULES, inject_adapters, set_trainable_modules
from adalora_pl.module import max_input_positions
from adalora_pl.tasks.glue import GLUE_TASKS
from adalora_pl.tasks.glue_module import GLUEClassifier
from datamodules._base import pin_memory_for
from datamodules.glue import GLUEDataModule
from tests.builders import BERT_TARGETS, REPO_ROOT, fit_tiny, tiny_bert_classifier, write_cola

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class FailDuringTraining(pl.Callback):
    """Raises at the second training batch: a ConfigError (a setting found wrong mid-run) or a bug."""

    def __init__(self, config_error: bool = True) -> None:
        self.config_error = config_error

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 1:
            if self.config_error:
                raise ConfigError("setting_x = 3 found wrong at step 1; allowed: 1 or 2")
            raise RuntimeError("a bug at step 1")


def cli_error_lines(capsys, run) -> list[str]:
    """The stderr lines of a command that must exit with status 2; there is no traceback in them."""
    with pytest.raises(SystemExit) as exit_info:
        run()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.strip()]


@pytest.fixture
def cola(tmp_path) -> Path:
    return write_cola(tmp_path / "CoLA", rows=16)


# ---------------------------------------------------------------------------------------- one line, exit 2
def test_wrong_task_name_from_the_shell_is_one_line(tmp_path, tiny_backbone, cola):
    """The user's view: `python cli.py fit ...` with a typo prints the message last, without a traceback."""
    result = subprocess.run(
        [sys.executable, "cli.py", "fit", "--config", "configs/cola.yaml", "--model.backbone", tiny_backbone,
         "--data.data_dir", str(cola), "--model.task_name", "colla"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "Namespace(" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"cli.py fit: error: unknown GLUE task 'colla'; expected one of {sorted(GLUE_TASKS)}"
    )


@pytest.mark.parametrize(("where", "extra", "message"), [
    ("module constructor", ("--model.learning_rate", "-1"),
     "learning_rate must be > 0, got -1.0"),
    ("module constructor", ("--model.head_learning_rate", "0"),
     "head_learning_rate must be > 0 (or None: the learning_rate), got 0.0"),
    ("module constructor", ("--model.trainable_modules", "[classifer]"),
     "trainable_modules ['classifer'] match no module of BertForSequenceClassification"),
    ("DataModule constructor", ("--data.batch_size", "0"),
     "batch_size must be a positive integer, got 0"),
    ("module setup, in fit", ("--data.max_seq_length", "100000"),
     "--data.max_seq_length 100000 exceeds the 64 positions of the backbone '{backbone}' "
     "(BertForSequenceClassification has learned absolute positions); set it to at most 64"),
])
def test_config_errors_end_in_one_line(where, extra, message, capsys, tmp_path, tiny_backbone, cola):
    lines = cli_error_lines(capsys, lambda: fit_tiny(tmp_path, "cola.yaml", tiny_backbone, cola, *extra))
    assert lines[-1].startswith(f"cli.py fit: error: {message.format(backbone=tiny_backbone)}"), (where, lines[-1])
    assert not list(tmp_path.rglob("*.ckpt")), where  # nothing trained


def test_missing_data_file_found_in_datamodule_setup_is_one_line(capsys, tmp_path, tiny_backbone, cola):
    (cola / "train.tsv").unlink()
    lines = cli_error_lines(capsys, lambda: fit_tiny(tmp_path, "cola.yaml", tiny_backbone, cola))
    assert lines[-1] == (
        f"cli.py fit: error: GLUE cola split 'train' needs {cola / 'train.tsv'}, which does not exist "
        "(expected files: ['train.tsv', 'dev.tsv'])"
    )


def test_config_error_during_training_is_one_line_and_bugs_keep_their_traceback(capsys, tmp_path, tiny_backbone,
                                                                                  cola):
    callback = "--trainer.callbacks+=tests.tasks.test_bad_input.FailDuringTraining"
    lines = cli_error_lines(capsys, lambda: fit_tiny(tmp_path / "a", "cola.yaml", tiny_backbone, cola, callback))
    assert lines[-1] == "cli.py fit: error: setting_x = 3 found wrong at step 1; allowed: 1 or 2"
    with pytest.raises(RuntimeError, match="a bug at step 1"):
        fit_tiny(tmp_path / "b", "cola.yaml", tiny_backbone, cola, callback,
                 "--trainer.callbacks.init_args.config_error", "false")


# ---------------------------------------------------------------------------------------- optimizer blocks
def write_yaml(path: Path, content: dict) -> Path:
    path.write_text(yaml.safe_dump(content))
    return path


def torch_message(make) -> str:
    with pytest.raises(ValueError) as info:
        make()
    return str(info.value)


def test_invalid_optimizer_block_names_key_value_and_file(capsys, tmp_path, tiny_backbone, cola):
    bad = write_yaml(tmp_path / "adamw.yaml", {"optimizer": {"class_path": "torch.optim.AdamW",
                                                             "init_args": {"lr": -1e-3, "eps": -1.0}}})
    # torch checks lr first, so its message is about lr; eps is wrong too but not the reason given
    reason = torch_message(lambda: torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=-1e-3, eps=-1.0))
    lines = cli_error_lines(capsys, lambda: fit_tiny(tmp_path, "cola.yaml", tiny_backbone, cola, "--config", str(bad)))
    assert lines[-1] == (
        f"cli.py fit: error: optimizer.init_args.lr = -0.001 (in {bad}): torch.optim.AdamW refuses it: {reason}"
    )


def test_invalid_lr_scheduler_on_the_command_line_is_named(capsys, tmp_path, tiny_backbone, cola):
    param = torch.nn.Parameter(torch.zeros(1))
    reason = torch_message(lambda: torch.optim.lr_scheduler.OneCycleLR(torch.optim.SGD([param], lr=0.1), max_lr=0.1,
                                                                       total_steps=-5))
    lines = cli_error_lines(capsys, lambda: fit_tiny(
        tmp_path, "cola.yaml", tiny_backbone, cola, "--optimizer", "torch.optim.SGD", "--optimizer.lr", "0.1",
        "--lr_scheduler", "OneCycleLR", "--lr_scheduler.max_lr", "0.1", "--lr_scheduler.total_steps", "-5"))
    assert lines[-1] == (
        "cli.py fit: error: lr_scheduler.init_args.total_steps = -5 (on the command line): "
        f"torch.optim.lr_scheduler.OneCycleLR refuses it: {reason}"
    )


# ---------------------------------------------------------------------------------------- max_seq_length
def tiny_encoder(model_type: str, **config):
    """A tiny encoder of ``model_type`` from its config (no weights file), with 66 position slots."""
    from transformers import AutoConfig, AutoModel

    settings = dict(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                    max_position_embeddings=66, pad_token_id=1)
    if model_type == "bart":
        settings = dict(vocab_size=60, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                        max_position_embeddings=66, pad_token_id=1)
    if model_type == "llama":
        settings.update(num_key_value_heads=2)
    settings.update(config)
    torch.manual_seed(0)
    return AutoModel.from_config(AutoConfig.for_model(model_type, **settings)).eval()


def runs_with(model, length: int) -> bool:
    """Whether ``model`` takes ``length`` tokens (ids above the pad id)."""
    ids = torch.full((1, length), 5)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    except (IndexError, RuntimeError):
        return False
    return True


@pytest.mark.parametrize(("model_type", "config", "limit"), [
    ("bert", {}, 66),
    ("roberta", {}, 64),  # positions start after pad_token_id (1): 66 - 2
    ("mpnet", {}, 64),
    ("bart", {}, 66),  # a learned offset of 2 on top of max_position_embeddings
    ("deberta-v2", {"position_biased_input": True}, 66),
    ("deberta-v2", {"position_biased_input": False, "relative_attention": True}, None),  # DeBERTa-v3
    ("llama", {}, None),  # rotary positions
])
def test_max_input_positions_is_what_the_model_takes(model_type, config, limit):
    model = tiny_encoder(model_type, **config)
    assert max_input_positions(model) == limit
    if limit is None:
        assert runs_with(model, 200)
    else:
        assert runs_with(model, limit) and not runs_with(model, limit + 1)


# ---------------------------------------------------------------------------------------- checkpoint settings
def test_validate_names_the_checkpoint_settings_it_uses(capsys, tmp_path, tiny_backbone, cola):
    fitted = fit_tiny(tmp_path / "fit", "cola.yaml", tiny_backbone, cola, "--model.method", "lora",
                      "--trainer.max_epochs", "1")
    ckpt = Path(fitted.trainer.log_dir) / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    args = ["validate", "--config", str(REPO_ROOT / "configs" / "cola.yaml"), "--model.backbone", tiny_backbone,
            "--data.data_dir", str(cola), "--trainer.enable_progress_bar", "false", "--data.batch_size", "8",
            "--trainer.default_root_dir", str(tmp_path / "validate"), "--model.method", "adalora",
            "--model.warmup_steps", "2", "--ckpt_path", str(ckpt)]
    validated = main(args)
    note = (f"cli.py validate: note: {ckpt} was saved with other model settings than the command line and its "
            "config; using the checkpoint's: method='lora' (given: 'adalora'), target_r=3 (given: 1), tinit=0.2 "
            "(given: 800), tfinal=0.3 (given: 3500), delta_t=1 (given: 10)")  # LoRA keeps its rank: target_r = init_r
    err = capsys.readouterr().err
    assert note in err.splitlines(), err
    assert validated.model.method == "lora" and not validated.model.schedule_callback
    # said before evaluation starts: a validation that fails in its data still printed it
    (cola / "dev.tsv").unlink()
    lines = cli_error_lines(capsys, lambda: main(args))
    assert lines[-1] == (f"cli.py validate: error: GLUE cola split 'validation' needs {cola / 'dev.tsv'}, which "
                         "does not exist (expected files: ['train.tsv', 'dev.tsv'])")
    assert note in lines[:-1]


# ---------------------------------------------------------------------------------------- trainable modules
def test_trainable_module_typo_is_refused_before_the_model_changes():
    model = tiny_bert_classifier()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ConfigError) as info:
        inject_adapters(model, BERT_TARGETS, r=2, trainable_modules=["classifer", "pooler"])
    message = str(info.value)
    assert message.startswith("trainable_modules ['classifer'] match no module of BertForSequenceClassification")
    assert "'bert', 'bert.embeddings', 'bert.encoder', 'bert.pooler', 'dropout', 'classifier'" in message
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before  # no adapter went in


def test_known_head_names_may_be_absent_by_design():
    """`score` (decoder classifiers) and `qa_outputs` are heads of other model families: a BERT classifier without
    them is no error, with the default list or named explicitly."""
    model = tiny_bert_classifier()
    unfrozen = set_trainable_modules(model, DEFAULT_TRAINABLE_MODULES)
    assert unfrozen == ["bert.pooler", "classifier"]
    assert set_trainable_modules(model, ["classifier", "score"]) == ["classifier"]
    with pytest.raises(ConfigError, match=r"trainable_modules \['head'\] match no module"):
        set_trainable_modules(model, ["classifier", "head"])


# ---------------------------------------------------------------------------------------- pin_memory
def test_pin_memory_only_on_cuda(tmp_path, tiny_backbone, cola):
    assert pin_memory_for(None) is False
    assert pin_memory_for(SimpleNamespace(accelerator=CPUAccelerator())) is False
    assert pin_memory_for(SimpleNamespace(accelerator=CUDAAccelerator())) is True
    dm = GLUEDataModule(tokenizer=tiny_backbone, data_dir=str(cola), batch_size=8)
    dm.trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    dm.setup("fit")
    assert dm.train_dataloader().pin_memory is False
    dm.trainer = SimpleNamespace(accelerator=CUDAAccelerator())  # what a CUDA Trainer looks like to the loader
    assert dm.train_dataloader().pin_memory is True


# ---------------------------------------------------------------------------------------- module arguments
def test_param_budget_must_be_positive(tiny_backbone):
    with pytest.raises(ConfigError, match=r"^param_budget must be a positive integer \(a #Params\), got 0$"):
        GLUEClassifier(backbone=tiny_backbone, method="lora", param_budget=0)
