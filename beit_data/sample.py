"""The embedded sample: real photographs shipped with the package (see sample_images/LICENSES.md)."""

from __future__ import annotations

from pathlib import Path

from beit_common import Location, write_text_atomic

__all__ = ["SAMPLE_DIR", "sample_images"]

SAMPLE_DIR = Path(__file__).parent / "sample_images"


def sample_images() -> list[Path]:
    """The embedded photographs, sorted by name."""
    return sorted(p for p in SAMPLE_DIR.glob("*.jpg"))


def write_sample_list(path: Location, photos: list[Path] | None = None) -> Location:
    """Write a text file listing the embedded photographs (or ``photos``), for ``run_shards``."""
    if path.local_path() is not None:
        path.local_path().parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(f"{p}\n" for p in (sample_images() if photos is None else photos)))
    return path
