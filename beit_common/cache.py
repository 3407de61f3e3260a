"""The local cache (``$BEIT_DATA_CACHE``, default ``~/.cache/beit-data``): what was learnt of remote
objects at great cost, a remote run's working folder, the run lock of a prefix, uploads on their way."""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
from pathlib import Path

from beit_common.location import Location

__all__ = ["cache_root", "cache_dir", "cache_key", "cache_file", "temp_file"]


def cache_root() -> Path:
    """``$BEIT_DATA_CACHE`` (default ``~/.cache/beit-data``), made or not."""
    return Path(os.environ.get("BEIT_DATA_CACHE") or Path.home() / ".cache" / "beit-data")


def cache_dir(*parts: str) -> Path:
    """``$BEIT_DATA_CACHE`` (default ``~/.cache/beit-data``)/parts, created."""
    folder = cache_root().joinpath(*parts)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def cache_key(*parts: object) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:24]


def cache_file(location: Location, info: dict, kind: str, suffix: str) -> Path | None:
    """Where to keep what was learnt of a remote object at great cost (its scanned tar index), under
    its URL, ETag and size, so that a changed object is learnt again; ``None`` for a local file,
    which is read again as cheaply."""
    if location.is_local:
        return None
    return cache_dir(kind) / f"{cache_key(location, info['etag'], info['size'])}{suffix}"


def temp_file(like: str | os.PathLike) -> Path:
    """A fresh local temporary file for an object on its way up (or down), named for its writer as
    ``files.temp_name`` names one (``.NAME.tmp-HOST-PID-RANDOM.part``), so that what a killed process
    leaves is found and removed (``files.remove_stale_uploads``)."""
    prefix = f".{Location(like).name}.tmp-{socket.gethostname()}-{os.getpid()}-"
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=".part", dir=cache_dir("uploads"))
    os.close(fd)
    return Path(name)
