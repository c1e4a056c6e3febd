"""The allocation report: the layers x module-types rank table, the heatmap and the budget curve."""

from __future__ import annotations

import pytest

from adalora_pl.io.report import rank_table, save_budget_curve, save_rank_heatmap
from tests.builders import REPO_ROOT

BERT_TYPES = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
              "intermediate.dense", "output.dense"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def flags(kept: int, init_r: int = 4) -> list[bool]:
    # Kept triplets at the end, not the start: the table must count flags, not read a prefix length.
    return [False] * (init_r - kept) + [True] * kept


def bert_pattern(num_layers: int = 3, peft_keys: bool = False) -> tuple[dict, list[list[int]]]:
    pattern, expected = {}, []
    for layer in range(num_layers):
        row = []
        for j, module_type in enumerate(BERT_TYPES):
            kept = (layer + j) % 5  # 0..4
            key = f"bert.encoder.layer.{layer}.{module_type}" + (".lora_E" if peft_keys else "")
            pattern[key] = flags(kept)
            row.append(kept)
        expected.append(row)
    return pattern, expected


@pytest.mark.parametrize("peft_keys", [False, True], ids=["module-paths", "peft-lora_E-keys"])
def test_rank_table_bert(peft_keys):
    pattern, expected = bert_pattern(peft_keys=peft_keys)
    # Insertion order must not matter for the rows.
    layers, types, ranks = rank_table(dict(reversed(list(pattern.items()))))
    assert layers == [0, 1, 2]
    assert sorted(types) == sorted(BERT_TYPES)
    reordered = [[row[BERT_TYPES.index(t)] for t in types] for row in expected]
    assert ranks == reordered
    assert sum(map(sum, ranks)) == sum(sum(v) for v in pattern.values())


def test_rank_table_bart_separates_encoder_and_decoder():
    pattern = {
        "model.encoder.layers.0.self_attn.q_proj": [True, True, False],
        "model.encoder.layers.0.fc1": [True, False, False],
        "model.encoder.layers.1.self_attn.q_proj": [False, False, False],
        "model.decoder.layers.0.self_attn.q_proj": [True, True, True],
        "model.decoder.layers.0.encoder_attn.q_proj": [False, True, False],
        "model.decoder.layers.0.fc1": [True, True, False],
    }
    layers, types, ranks = rank_table(pattern)
    assert layers == ["encoder.0", "encoder.1", "decoder.0"]
    assert types == ["self_attn.q_proj", "fc1", "encoder_attn.q_proj"]
    assert ranks == [[2, 1, None], [0, None, None], [3, 2, 1]]


def test_rank_table_accepts_kept_ranks_as_ints():
    layers, types, ranks = rank_table({"h.0.attn.c_attn": 3, "h.1.attn.c_attn": 1, "h.1.mlp.c_fc": 2})
    assert (layers, types, ranks) == ([0, 1], ["attn.c_attn", "mlp.c_fc"], [[3, None], [1, 2]])


def test_heatmap_and_budget_curve_are_written(tmp_path):
    pattern, expected = bert_pattern(num_layers=4)
    out = tmp_path / "plots" / "ranks.png"
    layers, types, ranks = save_rank_heatmap(pattern, out, title="tiny BERT")
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 1000
    assert (layers, types, ranks) == rank_table(pattern)
    assert len(ranks) == 4 and all(len(row) == len(BERT_TYPES) for row in ranks)
    assert ranks == expected  # insertion order of the pattern is the BERT_TYPES order

    curve = save_budget_curve(list(range(0, 100, 10)), [24, 24, 22, 18, 15, 13, 12, 12, 12, 12], tmp_path / "b.png")
    assert curve.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="length"):
        save_budget_curve([0, 1], [3], tmp_path / "c.png")
    with pytest.raises(ValueError, match="empty"):
        save_rank_heatmap({}, tmp_path / "d.png")


def test_plots_work_headless_with_an_interactive_backend_requested(tmp_path):
    # An interactive backend requested through the environment and no display: the plots draw on their own
    # Agg canvas, so they must still be written.
    import os
    import subprocess
    import sys

    script = (
        "from adalora_pl.io.report import save_budget_curve, save_rank_heatmap; "
        f"save_rank_heatmap({{'encoder.layer.0.query': [True, False]}}, {str(tmp_path / 'h.png')!r}); "
        f"save_budget_curve([0, 1], [2, 1], {str(tmp_path / 'b.png')!r})"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env["MPLBACKEND"] = "TkAgg"
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60,
                            cwd=str(REPO_ROOT))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "h.png").read_bytes()[:8] == PNG_MAGIC and (tmp_path / "b.png").is_file()
