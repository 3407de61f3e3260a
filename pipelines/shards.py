"""``beit-data shards``: write WebDataset shards (and DALI indexes) from images on disk."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import webdataset as wds

from beit_data import BeitDataError, ensure_writable_dir
from beit_data.images import FORMAT_EXT, ImageError, probe_image
from beit_data.progress import progress_bar
from beit_data.shards import IMAGE_EXTS, Reject, write_index

__all__ = ["ShardsConfig", "ShardsResult", "collect_images", "run_shards"]

LISTED_EXTS = IMAGE_EXTS + ("bmp", "gif", "tif", "tiff")


@dataclass(frozen=True, kw_only=True)
class ShardsConfig:
    """Where the images come from and how the shards are cut.

    Attributes:
        sources: Flat image folders, ImageFolder trees (class sub-folders) or text files
            listing image paths (relative paths are taken from the list's folder).
        out: Output folder for the shards, their ``.idx`` files and the reports.
        maxcount: Samples per shard.
        prefix: Shard names are ``{prefix}-{000000}.tar``.
    """

    sources: Sequence[str | os.PathLike]
    out: str | os.PathLike
    maxcount: int = 10000
    prefix: str = "shard"
    progress: bool = True

    def __post_init__(self):
        if not self.sources:
            raise BeitDataError("give at least one image source")
        if self.maxcount < 1:
            raise BeitDataError(f"--maxcount must be at least 1, got {self.maxcount}")
        if not self.prefix or "/" in self.prefix:
            raise BeitDataError(f"--prefix must be a plain file-name prefix, got {self.prefix!r}")


@dataclass
class ShardsResult:
    images: int = 0
    shards: list[Path] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"images": self.images, "shards": len(self.shards), "rejects": len(self.rejects)}


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower().lstrip(".") in LISTED_EXTS


def collect_images(source: str | os.PathLike) -> list[tuple[Path, str | None]]:
    """List ``(path, class name or None)`` for one source, in a stable order.

    Raises:
        BeitDataError: If the source does not exist.
    """
    src = Path(source)
    if not src.exists():
        raise BeitDataError(f"image source not found: {src}")
    if src.is_file():
        lines = [ln.strip() for ln in src.read_text().splitlines()]
        return [((src.parent / ln) if not os.path.isabs(ln) else Path(ln), None) for ln in lines if ln]
    entries = sorted(src.iterdir())
    subdirs = [d for d in entries if d.is_dir() and not d.name.startswith(".")]
    files = [f for f in entries if f.is_file() and not f.name.startswith(".")]
    if subdirs and not any(_is_image_name(f) for f in files):
        return [
            (f, d.name)
            for d in subdirs
            for f in sorted(d.rglob("*"))
            if f.is_file() and not f.name.startswith(".")
        ]
    return [(f, None) for f in files]


def run_shards(config: ShardsConfig) -> ShardsResult:
    """Write every decodable image into shards, with a ``.idx`` beside each shard.

    Image bytes are stored unchanged. A file that is not a decodable JPEG, PNG or WebP is
    skipped and listed in ``rejects.json`` with its reason; every other file is written.
    """
    listing: list[tuple[Path, str | None]] = []
    for source in config.sources:
        listing += collect_images(source)
    out = Path(config.out)
    ensure_writable_dir(out)
    result = ShardsResult(classes=sorted({c for _, c in listing if c is not None}))
    class_index = {name: i for i, name in enumerate(result.classes)}
    pattern = str(out / f"{config.prefix}-%06d.tar")
    written: list[str] = []
    with wds.ShardWriter(pattern, maxcount=config.maxcount, verbose=0, post=written.append) as writer:
        for path, cls in progress_bar(listing, desc="shards", unit="img", disable=not config.progress):
            try:
                data = path.read_bytes()
                ext = FORMAT_EXT[probe_image(data, decode=True).format]
            except (OSError, ImageError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                result.rejects.append(Reject(key=str(path), reason=reason))
                continue
            sample = {"__key__": f"{result.images:09d}", ext: data}
            if cls is not None:
                sample["cls"] = str(class_index[cls]).encode()
            writer.write(sample)
            result.images += 1
    result.shards = [Path(p) for p in written]
    for shard in result.shards:
        write_index(shard)
    if result.classes:
        (out / "classes.json").write_text(json.dumps(result.classes, indent=1))
    (out / "rejects.json").write_text(
        json.dumps([{"path": r.key, "reason": r.reason} for r in result.rejects], indent=1)
    )
    return result
