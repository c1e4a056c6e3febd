"""Check and load what ``--model.backbone`` and the tokenizer name, with errors that say what to do.

transformers takes any string that is not an existing folder for a hub id, so a mistyped folder comes back as
"Repo id must use alphanumeric chars", and a run without network buries the hub error deep in a traceback. The
functions here catch both cases early and raise :class:`LoadError` with one message naming the value.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from adalora_pl.errors import ConfigError

__all__ = [
    "DTYPE_KEYWORD_SINCE", "LoadError", "check_backbone", "check_tokenizer", "dtype_keyword", "load_pretrained",
    "looks_like_path",
]

T = TypeVar("T")

#: What a backbone or tokenizer may be, appended to the messages.
FORMS = {
    "backbone": "a backbone is a local folder with config.json (written by save_pretrained) or a Hugging Face hub "
    "id like microsoft/deberta-v3-base",
    "tokenizer": "a tokenizer is a local folder written by save_pretrained (normally the backbone's) or a Hugging "
    "Face hub id like microsoft/deberta-v3-base",
}
#: The offline form of the README's commands, appended to hub errors.
OFFLINE_HINT = (
    "without network, use local copies: --model.backbone /path/to/local/folder "
    "--data.data_dir /path/to/glue/CoLA (or --data.train_file/--data.validation_file for SQuAD and summarization)"
)


class LoadError(ConfigError):
    """A backbone, tokenizer or hub dataset the user named could not be found or loaded; the message says what
    to do. ``cli.py`` prints it as one line instead of a traceback."""


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub id.

    True when it is absolute, starts with ``.`` or ``~``, exists here (file or folder), has more than one ``/`` (hub
    ids are ``name`` or ``namespace/name``), or has a first component that exists here (``runs/best``).
    """
    if os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name):
        return True
    parts = Path(name).parts
    return len(parts) > 2 or (len(parts) == 2 and os.path.exists(parts[0]))


def _local_folder(name: str, what: str, required_file: str | None) -> str:
    """``name`` (``~`` expanded) when it is a hub id or a folder holding ``required_file``; else LoadError."""
    if not looks_like_path(name):
        return name
    folder = Path(name).expanduser()
    if not folder.is_dir():
        kind = "is a file, not a folder" if folder.exists() else "folder not found"
        raise LoadError(f"{what} {name!r}: {kind}; {FORMS[what]}")
    if required_file is not None and not (folder / required_file).is_file():
        raise LoadError(f"{what} {name!r}: the folder has no {required_file}; {FORMS[what]}")
    return str(folder)


def check_backbone(name: str) -> str:
    """Check a ``--model.backbone`` value before transformers sees it.

    Args:
        name: A hub id (``microsoft/deberta-v3-base``) or a local folder.

    Returns:
        The value to pass to ``from_pretrained``: ``name`` itself, or the folder with ``~`` expanded.

    Raises:
        LoadError: ``name`` looks like a path (see :func:`looks_like_path`) but is not a folder with config.json.
    """
    return _local_folder(name, "backbone", "config.json")


def check_tokenizer(name: str) -> str:
    """Like :func:`check_backbone` for a tokenizer: a path must be an existing folder (config.json not needed)."""
    return _local_folder(name, "tokenizer", None)


def load_pretrained(load: Callable[..., T], name: str, *, what: str = "backbone", **kwargs) -> T:
    """``load(name, **kwargs)`` (a ``from_pretrained``), with transformers' OSError turned into a short LoadError.

    Args:
        load: E.g. ``AutoConfig.from_pretrained`` or ``AutoTokenizer.from_pretrained``.
        name: A value already passed through :func:`check_backbone` or :func:`check_tokenizer`.
        what: ``"backbone"`` or ``"tokenizer"``, for the message.
        **kwargs: Passed to ``load``.

    Raises:
        LoadError: ``load`` raised OSError: no network or ``HF_HUB_OFFLINE=1`` with nothing cached, an unknown
            hub id, or a local folder missing a weight file. The message names ``name``, the first line of
            transformers' reason and, for a hub id, the offline form of the command.
    """
    try:
        return load(name, **kwargs)
    except OSError as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")
        if os.path.isdir(name):
            raise LoadError(f"could not load {what} from the folder {name!r} ({reason})") from err
        raise LoadError(
            f"could not load {what} {name!r}: the Hugging Face hub could not be reached (no network, or "
            f"HF_HUB_OFFLINE=1) and it is not in the local cache, or the hub has no such model ({reason}); "
            f"{OFFLINE_HINT}"
        ) from err


#: The transformers release that renamed ``from_pretrained``'s ``torch_dtype`` to ``dtype`` (huggingface/transformers
#: PR 39782). Earlier releases (pyproject allows >= 4.45) hand an unknown ``dtype`` on to the model's constructor,
#: which raises a TypeError; later ones still take ``torch_dtype`` but warn that it is deprecated.
DTYPE_KEYWORD_SINCE = (4, 56)


def dtype_keyword(version: str | None = None) -> str:
    """The ``from_pretrained`` keyword for the weights' dtype: ``"dtype"`` from transformers 4.56 on, else
    ``"torch_dtype"``.

    Args:
        version: a transformers version string; ``None`` reads the installed one.
    """
    if version is None:
        import transformers

        version = transformers.__version__
    major_minor = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    return "dtype" if major_minor >= DTYPE_KEYWORD_SINCE else "torch_dtype"
