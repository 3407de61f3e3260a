"""``beit-data shards``: write WebDataset shards (and DALI indexes) from image files or Parquet
image datasets (what is read: ``pipelines.shard_sources``), and a held-out set beside them."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import webdataset as wds

from beit_common import BeitDataError, ensure_writable_dir, output_location, write_text_atomic
from beit_data.images import ImageError
from beit_data.progress import progress_bar
from beit_data.shard_index import write_index
from beit_data.shards import Reject
from pipelines.config import ShardsConfig
from pipelines.shard_sources import (
    Item,
    ListedImage,
    class_map_digest,
    collect_images,
    held_out,
    load_class_map,
    open_source,
    read_image,
    write_order,
)

__all__ = ["ShardsConfig", "ShardsResult", "ListedImage", "collect_images", "write_order", "run_shards",
           "load_class_map", "class_map_digest"]

@dataclass
class ShardsResult:
    """What ``run_shards`` wrote."""

    images: int = 0
    shards: list[Path] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    shuffled: bool = False
    seed: int = 0
    holdout: ShardsResult | None = None  # the held-out set, with ``holdout_per_class``

    def summary(self) -> dict:
        summary = {"images": self.images, "shards": len(self.shards), "rejects": len(self.rejects),
                   "shuffled": self.shuffled}
        if self.holdout is not None:
            summary.update(holdout_images=self.holdout.images, holdout_shards=len(self.holdout.shards))
        return summary


def _sample(key: str, item: Item, data: bytes, ext: str, class_index: dict[str, int], digest: str) -> dict:
    """One WebDataset sample: the image, its ``.json`` provenance and, with a class, its ``.cls``
    and class name, with the identity of the class map its id belongs to."""
    meta = {"source": item.source}
    sample = {"__key__": key, ext: data}
    if item.cls is not None:
        meta.update({"class": item.cls, "class_map": digest})
        sample["cls"] = str(class_index[item.cls]).encode()
    sample["json"] = json.dumps(meta).encode()
    return sample


def _write_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1))


def _write_reports(out: Path, result: ShardsResult) -> None:
    """``classes.json`` (trees only), ``rejects.json`` and ``shards.json``, each written atomically."""
    if result.classes:
        _write_json(out / "classes.json", result.classes)
    _write_json(out / "rejects.json", [{"path": r.key, "reason": r.reason} for r in result.rejects])
    classes = {"classes": result.classes, "class_map": class_map_digest(result.classes)} if result.classes else {}
    _write_json(out / "shards.json", {"shuffle": result.shuffled, "seed": result.seed, "images": result.images,
                                      "shards": [p.name for p in result.shards], **classes})


REPORTS = ("shards.json", "rejects.json", "classes.json")


def _clear_earlier_run(out: Path, overwrite: bool) -> None:
    """Refuse a folder that is not empty; with ``overwrite``, remove an earlier run's shards,
    indexes and reports first (a folder that holds anything else is still refused)."""
    present = sorted(p for p in out.iterdir()) if out.is_dir() else []
    if not present:
        return
    if not overwrite:
        raise BeitDataError(f"{out} is not empty ({len(present)} files, such as {present[0].name}): every --shards "
                            f"{out} would read what is there too; pass `overwrite` to replace an earlier shards run, "
                            "or choose an empty folder")
    ours = [p for p in present if p.suffix in (".tar", ".idx") or p.name in REPORTS
            or (p.name.startswith(".") and p.name.endswith(".tar.tmp"))]
    others = [p for p in present if p not in ours]
    if others:
        raise BeitDataError(f"{out} holds {others[0].name}, which no shards run wrote; `overwrite` replaces shards "
                            "and their reports only: choose another folder")
    for path in ours:
        path.unlink()


class _ShardSet:
    """One folder of shards being written: each shard under a hidden temporary name, renamed
    with its ``.idx`` when complete (a killed run never leaves a half shard under a final name;
    one that got no sample is removed)."""

    def __init__(self, out: Path, config: ShardsConfig, prefix: str, classes: list[str]):
        _clear_earlier_run(out, config.overwrite)
        self.out = ensure_writable_dir(out)
        self.result = ShardsResult(classes=classes, shuffled=config.shuffle, seed=config.seed)
        self.in_shard, self.writer = 0, None
        self.pattern, self.maxcount = str(self.out / f".{prefix}-%06d.tar.tmp"), config.maxcount

    def _finish(self, tmp: str) -> None:
        if not self.in_shard:
            os.remove(tmp)
            return
        final = self.out / Path(tmp).name[1:-len(".tmp")]
        os.replace(tmp, final)
        write_index(final)
        self.result.shards.append(final)
        self.in_shard = 0

    def write(self, sample: dict) -> None:
        if self.writer is None:  # opened with the first sample: a set that gets none leaves no file
            self.writer = wds.ShardWriter(self.pattern, maxcount=self.maxcount, verbose=0, post=self._finish)
        self.writer.write(sample)
        self.result.images += 1
        self.in_shard += 1

    def close(self) -> ShardsResult:
        if self.writer is not None:
            self.writer.close()
        _write_reports(self.out, self.result)
        return self.result


def run_shards(config: ShardsConfig) -> ShardsResult:
    """Write every decodable image into shards, with a ``.idx`` beside each shard, and with
    ``holdout_per_class`` the held-out images into shards of their own (``result.holdout``).

    Images go in a seeded random order unless ``config.shuffle`` is off; keys count up in
    write order, over both sets (a key names one image of the run). Image bytes are stored
    unchanged. A file or row that is not a decodable JPEG, PNG or WebP is skipped and listed
    in ``rejects.json`` with its reason; every other image is written.

    Raises:
        BeitDataError: For an output folder that is not empty (without ``overwrite``) or not
            local, a source without images, or when every image was rejected (the reasons
            are in ``rejects.json`` then, and no shard is left).
    """
    out = output_location(config.out, "shards", remote=False)
    source = open_source(config)
    if not source.labels:
        raise BeitDataError(f"no files in {', '.join(map(str, config.sources))}")
    chosen = held_out(source.labels, config.holdout_per_class, config.seed) if config.holdout_per_class else set()
    folder = None
    if config.holdout_per_class:
        folder = output_location(config.holdout_out or f"{out}-holdout", "held-out shards", remote=False)
        if folder.resolve() == out.resolve() or out.resolve() in folder.resolve().parents:
            raise BeitDataError(f"`holdout_out` {folder} is in `out` {out}: the held-out shards need a folder of "
                                "their own, or every --shards OUT would read them too")
    sets = [_ShardSet(out, config, config.prefix, source.classes)]
    if folder is not None:
        sets.append(_ShardSet(folder, config, "holdout", source.classes))
    class_index = {name: i for i, name in enumerate(source.classes)}
    digest, written = class_map_digest(source.classes), 0
    for item in progress_bar(source.items, total=len(source.labels), desc="shards", unit="img",
                             disable=not config.progress):
        target = sets[-1] if item.index in chosen else sets[0]
        try:
            data, ext = read_image(item.read(), config.max_pixels)
        except (OSError, ImageError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            target.result.rejects.append(Reject(key=item.where, reason=reason))
            continue
        target.write(_sample(f"{written:09d}", item, data, ext, class_index, digest))
        written += 1
    result, *rest = [s.close() for s in sets]
    result.holdout = rest[0] if rest else None
    if not result.images:
        first = result.rejects[0] if result.rejects else rest[0].rejects[0]
        raise BeitDataError(f"no image was written: all {len(result.rejects)} files were rejected (first: "
                            f"{first.key}: {first.reason}); every reason is in {out / 'rejects.json'}")
    return result


def write_sample(out: str | os.PathLike, *, maxcount: int = 8, holdout: int = 0,
                 holdout_out: str | os.PathLike | None = None) -> Iterator[tuple[str, Path, ShardsResult]]:
    """The embedded photographs as shards in ``out``, the last ``holdout`` (by name) in
    ``holdout_out``: ``(prefix, folder, result)`` of each part as it is written."""
    import tempfile

    from beit_data.sample import sample_images, write_sample_list

    photos = sample_images()
    parts = [(out, photos[:len(photos) - holdout], "sample")]
    if holdout:
        parts.append((holdout_out, photos[len(photos) - holdout:], "holdout"))
    with tempfile.TemporaryDirectory() as tmp:
        for folder, chosen, prefix in parts:
            listing = write_sample_list(f"{tmp}/{prefix}.txt", chosen)
            yield prefix, Path(folder), run_shards(ShardsConfig(sources=[listing], out=folder, maxcount=maxcount,
                                                                prefix=prefix, progress=False))
