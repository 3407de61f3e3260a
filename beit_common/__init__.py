"""The ground of beit-data: what every part may use, and which imports none of them.

It holds the version, the project's one error type, atomic writes and the writable-folder
check. ``beit_data``, ``beit_model``, ``pipelines`` and ``cli`` all build on it; it imports
nothing of theirs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

__version__ = "0.1.0"

__all__ = ["__version__", "BeitDataError", "write_atomic", "save_atomic", "ensure_writable_dir"]


class BeitDataError(Exception):
    """A user-facing error: bad input, a missing file, a refused overwrite.

    The CLI prints its message on one line and exits non-zero, without a traceback.
    """


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    A process killed mid-write leaves the old file (or none), never half a file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_atomic(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename: a kill never leaves half a file."""
    import torch

    return write_atomic(path, lambda tmp: torch.save(obj, tmp))


def ensure_writable_dir(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and prove a file can be written in it.

    Raises:
        BeitDataError: With the operating system's reason, before any work is done.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".beit-data-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise BeitDataError(f"cannot write to output folder {folder}: {exc.strerror or exc}") from None
    return folder
