"""The project's one error type: what the user did or gave, said in one line."""

from __future__ import annotations

import os

__all__ = ["BeitDataError", "os_error"]


class BeitDataError(Exception):
    """A user-facing error: bad input, a missing file, a refused overwrite.

    The CLI prints its message on one line and exits non-zero, without a traceback.
    """


def os_error(exc: OSError, path: str | os.PathLike | None = None) -> BeitDataError:
    """One line for an operating-system error: the file and the reason (no space, permission...)."""
    where = path if path is not None else exc.filename
    return BeitDataError(f"{where}: {exc.strerror or exc}" if where is not None else str(exc.strerror or exc))
