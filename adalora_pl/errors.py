"""The one exception type for wrong settings and wrong input files.

Every check of a value the user gave (a constructor argument, a command-line option, a line of a data file)
raises :class:`ConfigError` with one message that names the option or file (and line), the value, and what is
allowed. ``cli.py`` prints such an error as one line at the end of its output instead of a traceback, wherever it
was raised: in a module or DataModule constructor, in a DataModule's ``setup``, or during ``fit``.

It subclasses ``ValueError``, so code that catches ``ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = ["ConfigError", "MissingFileError"]


class ConfigError(ValueError):
    """A setting or input the user gave is wrong; the message says which, the value, and what is allowed."""


class MissingFileError(ConfigError, FileNotFoundError):
    """A file the user named (a data file, a checkpoint) does not exist; the message names it.

    A :class:`ConfigError` for ``cli.py`` (one line), and still the ``FileNotFoundError`` callers catch.
    """
