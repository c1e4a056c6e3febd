"""The CI policy of tests/conftest.py: under ADALORA_NO_SKIP=1 a skip fails, except for `gpu` tests and expected
failures (a strict xfail is reported as skipped by pytest's hook, but it is not an oracle that is missing)."""

from __future__ import annotations

import ast

from tests.builders import REPO_ROOT

CONFTEST = REPO_ROOT / "tests" / "conftest.py"

SAMPLE = """
import pytest

def test_oracle_missing():
    pytest.skip("PEFT is not installed")

@pytest.mark.gpu
def test_needs_cuda():
    pytest.skip("no CUDA")

def test_passes():
    assert True

@pytest.mark.xfail(strict=True, reason="a known gap")
def test_known_gap():
    assert False
"""


def policy_source() -> str:
    """The hook of tests/conftest.py with only the imports and the constant it uses: the pytester run below shows
    that the hook works without the rest of that conftest (its fixtures, its import of tests.builders)."""
    lines = CONFTEST.read_text().splitlines()
    kept = []
    for node in ast.parse("\n".join(lines)).body:
        hook = isinstance(node, ast.FunctionDef) and node.name == "pytest_runtest_makereport"
        variable = isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["NO_SKIP_VARIABLE"]
        module = isinstance(node, ast.Import) and [a.name for a in node.names] in (["os"], ["pytest"])
        if hook or variable or module:
            start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            kept.append("\n".join(lines[start - 1 : node.end_lineno]))
    assert len(kept) == 4, kept
    return "\n\n\n".join(kept) + "\n"


def _run(pytester, monkeypatch, value):
    pytester.makeconftest(policy_source())
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs CUDA\n")
    pytester.makepyfile(test_sample=SAMPLE)
    if value is None:
        monkeypatch.delenv("ADALORA_NO_SKIP", raising=False)
    else:
        monkeypatch.setenv("ADALORA_NO_SKIP", value)
    return pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")


def test_a_skip_fails_under_the_ci_variable_but_a_gpu_skip_does_not(pytester, monkeypatch):
    result = _run(pytester, monkeypatch, "1")
    result.assert_outcomes(passed=1, failed=1, skipped=1, xfailed=1)
    result.stdout.fnmatch_lines(["*skipped under ADALORA_NO_SKIP=1*PEFT is not installed*"])


def test_without_the_variable_skips_stay_skips(pytester, monkeypatch):
    result = _run(pytester, monkeypatch, None)
    result.assert_outcomes(passed=1, skipped=2, xfailed=1)
