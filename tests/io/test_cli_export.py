"""`cli.py export` from a fit checkpoint: adapter / PEFT / merged artifacts give the trained logits."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

from adalora_pl import load_adapter
from adalora_pl.cli import main
from adalora_pl.io.checkpoint import export_checkpoint
from tests.builders import REPO_ROOT, TouchOnUnpickle, fit_tiny, make_tiny_tokenizer, tiny_bert_config, write_cola


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
def test_export_formats_reproduce_the_trained_logits(tmp_path, trained, tiny_backbone, fmt):
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


def test_peft_export_config_carries_the_run_settings(tmp_path, trained, tiny_backbone):
    module, ckpt, _ = trained
    main(["export", "--ckpt_path", str(ckpt), "--format", "peft", "--output", str(tmp_path)])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    h = module.hparams
    assert (h.beta1, h.beta2, h.orth_reg_weight, h.lora_alpha) == (0.8, 0.9, 0.25, 24)  # the run's own settings
    assert (config["beta1"], config["beta2"], config["orth_reg_weight"]) == (0.8, 0.9, 0.25)
    assert (config["init_r"], config["target_r"]) == (h.init_r, h.target_r) == (3, 1)
    assert (config["lora_alpha"], config["lora_dropout"]) == (24, h.lora_dropout)
    states = torch.load(ckpt, weights_only=True)["callbacks"].values()
    schedule = next(s["settings"] for s in states if "settings" in s)
    assert (config["tinit"], config["tfinal"], config["deltaT"], config["total_step"]) == (
        schedule["tinit"], schedule["tfinal"], schedule["delta_t"], schedule["total_step"])
    assert config["total_step"] == 8 and config["tinit"] > 0  # 32 rows / batch 8 x 2 epochs; fractions resolved
    assert config["target_modules"] == list(module.adapters)
    assert sorted(config["modules_to_save"]) == ["bert.pooler.dense", "classifier"]  # the trained heads
    assert (config["task_type"], config["base_model_name_or_path"]) == ("SEQ_CLS", tiny_backbone)
    from peft import AdaLoraConfig

    read = AdaLoraConfig.from_pretrained(str(tmp_path))  # what PEFT will train on with
    assert (read.beta1, read.beta2, read.orth_reg_weight, read.lora_alpha) == (0.8, 0.9, 0.25, 24)


def test_checkpoint_with_revived_pruned_triplets_is_refused_in_every_format(tmp_path, trained, capsys):
    # Triplets pruned at the last mask event that trained back (tfinal=0, delta_t > 1): no format may hide them.
    module, ckpt, _ = trained
    state = torch.load(ckpt, weights_only=True)
    masks = {k.removesuffix(".rank_mask"): m for k, m in state["state_dict"].items() if k.endswith(".rank_mask")}
    prefix, mask = next((p, m) for p, m in masks.items() if not m.all())
    assert not state["state_dict"][f"{prefix}.lora_E"][~mask].any(), "the run itself leaves pruned triplets at zero"
    state["state_dict"][f"{prefix}.lora_E"][~mask] = 0.25
    revived = tmp_path / "revived.ckpt"
    torch.save(state, revived)
    pruned, path = int((~mask).sum()), prefix.removeprefix("model.")
    for fmt in ("adapter", "peft", "merged"):
        with pytest.raises(SystemExit) as err:
            main(["export", "--ckpt_path", str(revived), "--format", fmt, "--output", str(tmp_path / fmt)])
        assert err.value.code == 2 and not (tmp_path / fmt).exists()
        # (transformers may print a progress bar before the error line)
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"cli.py export: error: {revived}: {pruned} triplets pruned by rank_mask still have a nonzero lora_E, "
            f"in {path} ({pruned}); leaving them out would change the model's outputs. Apply the rank pattern "
            "first (RankAllocator.apply_rank_pattern(), or re-run with the AdaLoRA callback, which leaves pruned "
            "triplets at zero), or pass zero_masked=True to zero them in the model"
        )
    # zero_masked=True gives back the model the run ended with.
    export_checkpoint(revived, "peft", tmp_path / "zeroed", zero_masked=True)
    from peft import PeftModel

    base = AutoModelForSequenceClassification.from_pretrained(module.hparams.backbone, num_labels=2)
    ids = torch.randint(5, 100, (3, 9), generator=torch.Generator().manual_seed(0))
    got = logits(PeftModel.from_pretrained(base, str(tmp_path / "zeroed")).eval(), ids)
    torch.testing.assert_close(got, logits(module.model, ids), rtol=1e-5, atol=1e-6)


def export_error(tmp_path, capsys, ckpt_path) -> str:
    """The stderr of a failing `cli.py export` (exit status 2)."""
    with pytest.raises(SystemExit) as err:
        main(["export", "--ckpt_path", str(ckpt_path), "--format", "peft", "--output", str(tmp_path / "out")])
    assert err.value.code == 2
    assert not (tmp_path / "out").exists()
    return capsys.readouterr().err


def test_files_that_are_not_checkpoints_are_refused_without_unpickling(tmp_path, capsys, monkeypatch):
    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called on a file that is not a checkpoint")

    monkeypatch.setattr(torch, "load", no_unpickling)
    readme = REPO_ROOT / "README.md"
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint" * 10)
    plain_pickle = tmp_path / "plain.pkl"
    plain_pickle.write_bytes(pickle.dumps({"state_dict": {}}))
    other_zip = tmp_path / "other.zip"
    with zipfile.ZipFile(other_zip, "w") as archive:
        archive.writestr("docs/README.md", "hello")
    cases = {
        readme: "not a zip archive, as torch.save writes",
        garbage: "not a zip archive, as torch.save writes",
        plain_pickle: "not a zip archive, as torch.save writes",
        other_zip: "a zip archive without the data.pkl entry torch.save writes",
    }
    for path, reason in cases.items():
        assert export_error(tmp_path, capsys, path) == (
            f"cli.py export: error: {path} is not a Lightning checkpoint: {reason}\n"
        )
    assert export_error(tmp_path, capsys, tmp_path) == (
        f"cli.py export: error: {tmp_path} is a directory, not a Lightning checkpoint file (pass the .ckpt file, or "
        "the folder of a distributed checkpoint written by ModelParallelStrategy)\n"
    )


def test_torch_archives_that_are_not_checkpoints_fail_in_one_line(tmp_path, capsys):
    # A torch.save archive holding objects weights-only loading refuses: one line, never the pickle executed.
    marker = tmp_path / "unpickled"
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"hyper_parameters": TouchOnUnpickle(marker)}, unsafe)
    message = export_error(tmp_path, capsys, unsafe)
    assert message.startswith(f"cli.py export: error: {unsafe} is not a Lightning checkpoint this tool can read "
                              "safely (weights-only loading failed: Weights only load failed")
    assert message.count("\n") == 1 and not marker.exists()

    tensor = tmp_path / "tensor.ckpt"
    torch.save(torch.ones(2), tensor)
    assert export_error(tmp_path, capsys, tensor) == (
        f"cli.py export: error: {tensor} is not a Lightning checkpoint: it holds a Tensor, not a dict\n"
    )


def test_export_errors_are_clear(tmp_path, trained, capsys):
    _, ckpt, _ = trained

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


def test_full_finetuning_checkpoint_has_no_adapters(tmp_path, tiny_backbone, capsys):
    cli = fit_tiny(tmp_path, "cola.yaml", tiny_backbone, write_cola(tmp_path / "CoLA", rows=8),
                   "--model.method", "full")
    ckpt = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    with pytest.raises(SystemExit):
        main(["export", "--ckpt_path", str(ckpt), "--format", "adapter", "--output", str(tmp_path / "a")])
    assert "has no adapters (method='full'); use --format merged" in capsys.readouterr().err


def test_export_into_a_folder_with_files_needs_overwrite(tmp_path, trained, capsys):
    _, ckpt, _ = trained
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["export", "--ckpt_path", str(ckpt), "--format", "adapter", "--output", str(out)]
    with pytest.raises(SystemExit) as err:
        main(args)
    assert err.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"cli.py export: error: --output {out} already holds files (notes.txt); choose another folder, or pass "
        "--overwrite to write into it (files of the same name are replaced, the others kept)"
    ]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # untouched
    main([*args, "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "adapter_config.json", "notes.txt"]
    # an empty folder (e.g. made by the user beforehand) is no conflict
    (tmp_path / "empty").mkdir()
    main(["export", "--ckpt_path", str(ckpt), "--format", "adapter", "--output", str(tmp_path / "empty")])
    assert (tmp_path / "empty" / "adapter_config.json").is_file()


def test_export_onto_a_file_is_refused(tmp_path, trained, capsys):
    _, ckpt, _ = trained
    target = tmp_path / "model.bin"
    target.write_text("x")
    with pytest.raises(SystemExit) as err:
        main(["export", "--ckpt_path", str(ckpt), "--format", "merged", "--output", str(target), "--overwrite"])
    assert err.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"cli.py export: error: --output {target} is a file; the export writes a folder"
    ]
