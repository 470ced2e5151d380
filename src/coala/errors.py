"""The one documented error type of coala: ``CoalaError``, raised for bad input and for faults the user can fix.

``CoalaError`` is a ``ValueError`` (so ``except ValueError`` keeps working) whose message names the culprit and
says what to do; the culprit is also an attribute, None when it does not apply:

- ``argument``: the offending argument or setting ("ratio", "W", "x", "--out", ...);
- ``path``: the offending file or folder (a ``str``);
- ``layer``: the offending layer or parameter's module ("model.layers.1.mlp.up_proj").

Subclasses keep the other built-in type a caller may already catch: ``CoalaFileError`` is also an ``OSError``
(files and folders: unreadable, not writable, damaged), ``CoalaFileNotFoundError`` also a ``FileNotFoundError``,
``CoalaTypeError`` also a ``TypeError``.
``coala``'s command line prints a ``CoalaError`` as one line and exits with status 2.

This module imports nothing from coala: every layer may raise these errors.
"""

from __future__ import annotations

import os

__all__ = ["CoalaError", "CoalaFileError", "CoalaFileNotFoundError", "CoalaTypeError"]


class CoalaError(ValueError):
    """Bad input or a fixable fault, with the culprit named in the message and in ``argument`` / ``path`` /
    ``layer`` (None when not applicable)."""

    def __init__(self, message: str, *, argument: str | None = None, path: str | os.PathLike | None = None,
                 layer: str | None = None) -> None:
        super().__init__(message)
        self.argument = argument
        self.path = None if path is None else os.fspath(path)
        self.layer = layer


class CoalaFileError(CoalaError, OSError):
    """A file or folder coala cannot use (missing, unreadable, not writable, damaged); ``path`` names it."""


class CoalaFileNotFoundError(CoalaFileError, FileNotFoundError):
    """A file or folder that should exist does not; ``path`` names it."""


class CoalaTypeError(CoalaError, TypeError):
    """An argument of the wrong type; ``argument`` names it."""
