"""Exceptions: one class per kind of failure, the same kinds (and exit codes) as the CLI's.

Every exception phasekit raises is a :class:`PhasekitError` subclass carrying ``path`` (the
file it is about, or ``None``), ``kind`` (the CLI's name for the class of failure) and
``exit_code`` (what ``phasekit`` on the command line would exit with)::

    try:
        ck = phasekit.open("student.safetensors")
        ck.verify()
    except phasekit.IntegrityError as e:      # exit code 8: a hash does not match
        print("damaged:", e.path, e)
    except phasekit.PhasekitError as e:       # any other phasekit failure
        print(e.kind, e.exit_code, e)

``IoError`` is also an :class:`OSError` and ``UsageError`` also a :class:`ValueError`, so
code that catches those built-in classes keeps working.
"""

from __future__ import annotations

from typing import Dict, Optional, Type

__all__ = [
    "PhasekitError",
    "InternalError",
    "UsageError",
    "IoError",
    "TruncatedError",
    "MalformedError",
    "InconsistentError",
    "UnsupportedError",
    "IntegrityError",
    "LimitError",
]


class PhasekitError(Exception):
    """A phasekit failure. ``str(e)`` is ``"<path>: <message>"`` like the CLI's error line."""

    #: The CLI's name for this class of failure (``"integrity"``, ``"malformed"``, ...).
    kind: str = "internal"
    #: The exit code of ``phasekit`` for this class of failure.
    exit_code: int = 1

    def __init__(self, message: str, path: Optional[str] = None) -> None:
        super().__init__(message)
        #: The one-line message, without the path.
        self.message: str = message
        #: The file the failure is about, when there is one.
        self.path: Optional[str] = path

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class InternalError(PhasekitError):
    """A bug in phasekit (exit code 1)."""

    kind, exit_code = "internal", 1


class UsageError(PhasekitError, ValueError):
    """A wrong argument (exit code 2)."""

    kind, exit_code = "usage", 2


class IoError(PhasekitError, OSError):
    """The operating system refused: a missing file, permissions, a full disk (exit code 3)."""

    kind, exit_code = "io", 3


class TruncatedError(PhasekitError):
    """The file ends before the data it declares (exit code 4)."""

    kind, exit_code = "truncated", 4


class MalformedError(PhasekitError):
    """The bytes are not a valid file of the format: header, JSON, offsets, types (exit code 5)."""

    kind, exit_code = "malformed", 5


class InconsistentError(PhasekitError):
    """Files disagree: index vs shards, missing tensors, config vs shapes, routing (exit code 6)."""

    kind, exit_code = "inconsistent", 6


class UnsupportedError(PhasekitError):
    """Valid input this operation cannot handle: unknown family, dtype, layout (exit code 7)."""

    kind, exit_code = "unsupported", 7


class IntegrityError(PhasekitError):
    """A hash, digest or checksum does not match (exit code 8)."""

    kind, exit_code = "integrity", 8


class LimitError(PhasekitError):
    """A declared size or count exceeds a safety limit (exit code 9)."""

    kind, exit_code = "limit", 9


_BY_KIND: Dict[str, Type[PhasekitError]] = {
    c.kind: c
    for c in (
        InternalError,
        UsageError,
        IoError,
        TruncatedError,
        MalformedError,
        InconsistentError,
        UnsupportedError,
        IntegrityError,
        LimitError,
    )
}


def _from_native(kind: str, message: str, path: Optional[str] = None, exit_code: Optional[int] = None) -> PhasekitError:
    """The exception for a library error of ``kind`` (the native module calls this).

    ``exit_code`` is the library's code for ``kind``; the tests check that it equals the
    class's, so the two tables cannot drift apart.
    """
    cls = _BY_KIND.get(kind, InternalError)
    return cls(message, path)
