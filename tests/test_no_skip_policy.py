"""The CI policy of tests/conftest.py: under ADALORA_NO_SKIP=1 a skip fails, except for `gpu` tests."""

from __future__ import annotations

from pathlib import Path

CONFTEST = Path(__file__).with_name("conftest.py")

SAMPLE = """
import pytest

def test_oracle_missing():
    pytest.skip("PEFT is not installed")

@pytest.mark.gpu
def test_needs_cuda():
    pytest.skip("no CUDA")

def test_passes():
    assert True
"""


def _run(pytester, monkeypatch, value):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs CUDA\n")
    pytester.makepyfile(test_sample=SAMPLE)
    if value is None:
        monkeypatch.delenv("ADALORA_NO_SKIP", raising=False)
    else:
        monkeypatch.setenv("ADALORA_NO_SKIP", value)
    return pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")


def test_a_skip_fails_under_the_ci_variable_but_a_gpu_skip_does_not(pytester, monkeypatch):
    result = _run(pytester, monkeypatch, "1")
    result.assert_outcomes(passed=1, failed=1, skipped=1)
    result.stdout.fnmatch_lines(["*skipped under ADALORA_NO_SKIP=1*PEFT is not installed*"])


def test_without_the_variable_skips_stay_skips(pytester, monkeypatch):
    result = _run(pytester, monkeypatch, None)
    result.assert_outcomes(passed=1, skipped=2)
