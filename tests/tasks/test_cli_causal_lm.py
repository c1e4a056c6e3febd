"""Decoder-LLM instruction tuning through the command line: the two configs, a fit on XSum-shaped rows with a tiny
llama, evaluation from the checkpoint, and the PEFT export of the result."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from adalora_pl.cli import main
from tests.builders import REPO_ROOT, print_config, save_tiny_causal_lm, write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAIRS = [
    ("the cat sat on the mat and the dog ran in the city", "the cat sat on the mat"),
    ("paris is the capital city of france and the river is in the city", "paris is the capital of france"),
    ("people said the film was great and they love the movie", "people love the film"),
]
XSUM_ROWS = [{"id": f"doc-{i}", "document": PAIRS[i % 3][0], "summary": PAIRS[i % 3][1]} for i in range(6)]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("llama"), "llama")


def xsum_args(tmp_path: Path, backbone: str, data: Path, *extra: str) -> list[str]:
    return [
        "--config", str(REPO_ROOT / "configs" / "smollm2_xsum.yaml"),
        "--model.backbone", backbone, "--data.dataset_name", "null",
        "--data.train_file", str(data), "--data.validation_file", str(data),
        "--data.max_seq_length", "48", "--data.batch_size", "2", "--data.eval_batch_size", "4",
        "--model.init_r", "4", "--model.target_r", "2", "--model.delta_t", "1", "--model.max_new_tokens", "6",
        "--trainer.max_epochs", "3", "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
        *extra,
    ]


@pytest.mark.parametrize("config", ["smollm2_xsum.yaml", "llama_alpaca.yaml"])
def test_configs_parse_with_the_documented_settings(capsys, config):
    printed = yaml.safe_load(print_config(capsys, REPO_ROOT / "configs" / config))
    model, data = printed["model"]["init_args"], printed["data"]["init_args"]
    assert printed["model"]["class_path"] == "adalora_pl.tasks.causal_lm_module.CausalLMModule"
    # The schedule fractions of the authors' XSum script (tinit 6000, tfinal 25000 of ~79.7k steps).
    assert (model["tinit"], model["tfinal"]) == (0.075, 0.31)
    assert (model["init_r"], model["target_r"], model["method"]) == (12, 8, "adalora")
    if config == "llama_alpaca.yaml":  # alpaca-lora's recipe: lr 3e-4, 3 epochs, 128 per step, 256 tokens
        assert model["learning_rate"] == 3e-4 and printed["trainer"]["max_epochs"] == 3
        assert data["batch_size"] * printed["trainer"]["accumulate_grad_batches"] == 128
        assert data["max_seq_length"] == 256 and model["torch_dtype"] == "bfloat16"
        assert model["gradient_checkpointing"] is True and model["trust_remote_code"] is False
    else:
        assert (data["input_column"], data["output_column"]) == ("document", "summary")


def test_fit_xsum_rows_then_test_and_export(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "xsum.jsonl", XSUM_ROWS)
    cli = main(["fit", *xsum_args(tmp_path, tiny_llama, data)])
    trainer, module = cli.trainer, cli.model
    assert trainer.global_step == 3 * 3  # 6 rows / batch 2 x 3 epochs
    log_dir = Path(trainer.log_dir)
    metrics = trainer.callback_metrics
    expected = {"val/loss", "val/perplexity", "val/token_accuracy", "val/rouge1", "val/rouge2", "val/rougeL"}
    assert expected <= set(metrics)
    assert float(metrics["val/perplexity"]) == pytest.approx(float(torch.exp(metrics["val/loss"])), rel=1e-5)
    rows = [json.loads(x) for x in (log_dir / "predictions_val_epoch2.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in rows] == [r["summary"] for r in XSUM_ROWS]
    pattern = json.loads((log_dir / "rank_pattern.json").read_text())
    assert pattern["total_rank"] == 2 * len(module.adapters) == 2 * 7 * 2  # target_r x 7 projections x 2 blocks

    ckpt = log_dir / "checkpoints" / "last.ckpt"
    tested = main(["test", *xsum_args(tmp_path / "test", tiny_llama, data), "--ckpt_path", str(ckpt)])
    assert float(tested.trainer.callback_metrics["test/loss"]) == pytest.approx(float(metrics["val/loss"]), rel=1e-5)

    # The PEFT export of a causal LM loads as PeftModelForCausalLM and continues the prompts as our model does.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    main(["export", "--ckpt_path", str(ckpt), "--format", "peft", "--output", str(tmp_path / "peft")])
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(tmp_path / "peft"))
    assert type(peft_model).__name__ == "PeftModelForCausalLM"
    module.eval()
    peft_model.eval()
    prompts = cli.datamodule.eval_prompt_ids("validation")[:3]
    ours = module.generate_ids(prompts)
    pad, eos = cli.datamodule.pad_token_id, cli.datamodule.tokenizer.sep_token_id
    for i, prompt in enumerate(prompts):
        out = peft_model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                  pad_token_id=pad, eos_token_id=eos)[0, len(prompt):]
        assert out.tolist() == ours[i, : len(out)].tolist()

    # merged (a plain causal LM) and lora (PEFT LoRA) give the logits of the trained module.
    batch = next(iter(cli.datamodule.val_dataloader()))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        ours_logits = module.model(**inputs).logits
        main(["export", "--ckpt_path", str(ckpt), "--format", "merged", "--output", str(tmp_path / "merged")])
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
        assert torch.allclose(merged(**inputs).logits, ours_logits, atol=1e-5)
        main(["export", "--ckpt_path", str(ckpt), "--format", "lora", "--output", str(tmp_path / "lora")])
        lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(tmp_path / "lora"))
        assert lora.peft_config["default"].peft_type.value == "LORA"
        assert torch.allclose(lora.eval()(**inputs).logits, ours_logits, atol=1e-5)


def readme_offline_command() -> list[str]:
    """The arguments of the README's offline SmolLM2 ``cli.py fit`` command, as written there."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Decoder LLMs: instruction tuning", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    block = next(b for b in blocks if "smollm2_folder" in b)
    command = next(line for line in block.replace("\\\n", " ").splitlines() if line.startswith("python cli.py fit"))
    args = shlex.split(command)
    assert args[:3] == ["python", "cli.py", "fit"]
    return args[3:]


@pytest.mark.usefixtures("real_data")
def test_the_readmes_offline_command_runs_on_the_shared_xsum_sample_as_written(tmp_path, tiny_llama, caplog):
    """The README's command, with only the backbone folder ($FOLDER: SmolLM2 there, a tiny llama here) and the
    location of ../shared/data filled in, plus a 2-step budget and a log folder."""
    from tests.conftest import shared_data_dir

    args = []
    for arg in readme_offline_command():
        if arg == "$FOLDER":
            arg = tiny_llama
        elif arg.startswith("../shared/data/"):
            arg = str(shared_data_dir() / arg.removeprefix("../shared/data/"))
        elif arg.startswith("configs/"):
            arg = str(REPO_ROOT / arg)
        args.append(arg)
    assert "--data.validation_holdout" in args and "--data.train_file" in args
    with caplog.at_level("INFO"):
        cli = main(["fit", *args, "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path / "run"),
                    "--trainer.enable_progress_bar", "false"])
    assert cli.trainer.global_step == 2
    rows = [json.loads(line) for line in Path(args[args.index("--data.train_file") + 1]).read_text().splitlines()]
    data = cli.datamodule
    assert len(data.features("train")) == 800 and len(data.features("validation")) == 200
    assert data.example_ids("validation") == [r["id"] for r in rows[800:]]
    assert data.eval_references("validation") == [r["summary"] for r in rows[800:]]
    empty = next(i for i, r in enumerate(rows) if not r["document"].strip())
    assert f"1 of 800 inputs are empty ({args[args.index('--data.train_file') + 1]}, line {empty + 1}, column " \
           "'document')" in caplog.text
    # the sanity check ran the teacher-forced evaluation without generating
    assert "sanity check: teacher-forced evaluation only, no generation" in caplog.text
    assert "generating up to" not in caplog.text
