"""The update-size probe of the long grid's first steps (benchmarks/update_scale.py)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.builders import REPO_ROOT, write_cola

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import update_scale  # noqa: E402


def relative_update(layer) -> float:
    """``||delta W|| / ||W||`` from the adapter's factors, by the formulas (not through ``delta_weight``)."""
    if hasattr(layer, "lora_E"):  # AdaLoRA: B diag(E) A * alpha / ranknum (eps as in the reference)
        delta = layer.lora_B @ (layer.lora_A * layer.lora_E) * layer.lora_alpha / (layer.ranknum + 1e-5)
    else:  # LoRA: B A * alpha / r
        delta = layer.lora_B @ layer.lora_A * layer.scaling
    return float(delta.norm() / layer.base_layer.weight.norm())


@pytest.mark.parametrize("method", ["adalora", "lora_scaled"])
def test_probe_stops_at_its_step_and_records_the_update_size(tmp_path, tiny_backbone, method):
    write_cola(tmp_path / "glue" / "CoLA", rows=48)  # 2 steps an epoch at batch 32: 3 steps cross an epoch
    args = update_scale.argparse.Namespace(steps=3, every=1)
    grid = update_scale.reproduce.parse_args(["--preset", "long", "--tasks", "cola", "--seeds", "1", "--backbone",
                                              tiny_backbone, "--data-dir", str(tmp_path / "glue")])
    records, module = update_scale.probe(method, "cola", 1, args, grid)
    assert [r["step"] for r in records] == [1, 2, 3] and module.trainer.global_step == 3
    with torch.no_grad():
        expected = [relative_update(layer) for layer in module.adapters.values()]
    assert records[-1]["relative_update"] == pytest.approx(sum(expected) / len(expected), rel=1e-6)
    assert 0 < records[0]["relative_update"] < records[-1]["relative_update"]


def test_main_writes_the_table_and_json(tmp_path, tiny_backbone):
    write_cola(tmp_path / "glue" / "CoLA", rows=48)
    out = tmp_path / "scale.json"
    payload = update_scale.main(["--steps", "2", "--every", "2", "--methods", "adalora", "lora_scaled",
                                 "--backbone", tiny_backbone, "--data-dir", str(tmp_path / "glue"),
                                 "--json", str(out)])
    assert json.loads(out.read_text()) == payload
    assert payload["table"].splitlines()[0] == "| step | adalora | lora_scaled |"
    assert payload["table"].splitlines()[2].startswith("| 2 | ")
    with pytest.raises(SystemExit):
        update_scale.main(["--steps", "0"])
