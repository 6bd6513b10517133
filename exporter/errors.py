"""Typed errors. Each one names the file or tensor, says what is wrong, and says how to fix it.

The CLI prints ``str(error)`` as one line and exits with ``exit_code``: 2 for bad input or a file-system error, 3 for a
parity failure (1 is an internal error, 130 an interrupted run); library code raises and never exits.
"""

from __future__ import annotations


class ExportError(Exception):
    """Base class for every error lora-export raises on purpose."""

    exit_code = 2

    def __init__(self, what: str, problem: str, fix: str | None = None) -> None:
        self.what, self.problem, self.fix = what, problem, fix
        message = f"{what}: {problem}"
        if fix:
            message += f" Fix: {fix}"
        super().__init__(message)


class InputError(ExportError):
    """The base model or adapter given cannot be used as it is."""


class MismatchError(InputError):
    """The adapter does not belong to the base model."""


class NonFiniteError(ExportError):
    """NaN or Inf found in adapter weights or in a merged tensor."""


class OutputError(ExportError):
    """The output location cannot be written as asked."""


class FileSystemError(ExportError):
    """The operating system refused a read or a write (a full disk, a permission): the path and the cause."""


class StageCheckError(ExportError):
    """A stage's own check of its output failed."""


class ParityError(ExportError):
    """An artifact does not behave like base + adapter within the declared tolerance."""

    exit_code = 3
