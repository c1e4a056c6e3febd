"""`cli.py export` from a fit checkpoint: adapter / PEFT / merged artifacts give the trained logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

from adalora_pl import load_adapter
from cli import main
from tests.conftest import make_tiny_tokenizer
from tests.helpers import tiny_bert_config
from tests.test_cli_glue import fit_tiny, tiny_backbone, write_cola  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_backbone):  # noqa: F811
    tmp = tmp_path_factory.mktemp("export_run")
    cli = fit_tiny(tmp, "cola.yaml", tiny_backbone, write_cola(tmp / "CoLA", rows=32))
    module = cli.model.eval()
    log_dir = Path(cli.trainer.log_dir)
    return module, log_dir / "checkpoints" / "last.ckpt", log_dir


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_allocation_report_written_next_to_rank_pattern(trained):
    _, _, log_dir = trained
    assert (log_dir / "rank_heatmap.png").stat().st_size > 1000
    assert (log_dir / "budget_curve.png").stat().st_size > 1000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    acc.Reload()
    assert {"adalora/rank_heatmap", "adalora/budget_curve"} <= set(acc.Tags()["images"])


@pytest.mark.parametrize("fmt", ["adapter", "peft", "merged"])
def test_export_formats_reproduce_the_trained_logits(tmp_path, trained, tiny_backbone, fmt):  # noqa: F811
    module, ckpt, _ = trained
    out = tmp_path / fmt
    main(["export", "--ckpt_path", str(ckpt), "--format", fmt, "--output", str(out)])
    ids = torch.randint(5, 100, (3, 9), generator=torch.Generator().manual_seed(0))
    expected = logits(module.model, ids)
    if fmt == "adapter":
        base = AutoModelForSequenceClassification.from_pretrained(tiny_backbone, num_labels=2).eval()
        got = logits(load_adapter(base, out), ids)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    elif fmt == "peft":
        from peft import PeftModel

        base = AutoModelForSequenceClassification.from_pretrained(tiny_backbone, num_labels=2)
        got = logits(PeftModel.from_pretrained(base, str(out)).eval(), ids)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    else:
        merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
        assert not any("lora" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(logits(merged, ids), expected, rtol=1e-5, atol=1e-5)


def test_export_errors_are_clear(tmp_path, trained, capsys):
    _, ckpt, _ = trained
    bad = tmp_path / "garbage.ckpt"
    bad.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(SystemExit) as err:
        main(["export", "--ckpt_path", str(bad), "--format", "adapter", "--output", str(tmp_path / "o")])
    assert err.value.code == 2 and "is not a readable Lightning checkpoint" in capsys.readouterr().err

    # the same checkpoint against a backbone of another size
    other = tmp_path / "other_backbone"
    make_tiny_tokenizer(other)
    BertForSequenceClassification(tiny_bert_config(vocab_size=200, hidden_size=48)).save_pretrained(other)
    state = torch.load(ckpt, weights_only=True)
    state["hyper_parameters"]["backbone"] = str(other)
    torch.save(state, tmp_path / "mismatch.ckpt")
    with pytest.raises(SystemExit):
        main(["export", "--ckpt_path", str(tmp_path / "mismatch.ckpt"), "--format", "peft", "--output",
              str(tmp_path / "o2")])
    assert "does not match the backbone" in capsys.readouterr().err


def test_full_finetuning_checkpoint_has_no_adapters(tmp_path, tiny_backbone, capsys):  # noqa: F811
    cli = fit_tiny(tmp_path, "cola.yaml", tiny_backbone, write_cola(tmp_path / "CoLA", rows=8),
                   "--model.method", "full")
    ckpt = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    with pytest.raises(SystemExit):
        main(["export", "--ckpt_path", str(ckpt), "--format", "adapter", "--output", str(tmp_path / "a")])
    assert "has no adapters (method='full'); use --format merged" in capsys.readouterr().err
