"""``beit-data shards``: write WebDataset shards (and DALI indexes) from images on disk."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

import webdataset as wds

from beit_common import BeitDataError, ensure_writable_dir, output_location, write_text_atomic
from beit_data.images import FORMAT_EXT, ImageError, probe_image
from beit_data.progress import progress_bar
from beit_data.shard_index import write_index
from beit_data.shards import IMAGE_EXTS, Reject
from beit_data.views import stable_rng
from pipelines.config import ShardsConfig

__all__ = ["ShardsConfig", "ShardsResult", "ListedImage", "collect_images", "write_order", "run_shards",
           "load_class_map", "class_map_digest"]

LISTED_EXTS = IMAGE_EXTS + ("bmp", "gif", "tif", "tiff")


@dataclass
class ShardsResult:
    """What ``run_shards`` wrote."""

    images: int = 0
    shards: list[Path] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    shuffled: bool = False
    seed: int = 0

    def summary(self) -> dict:
        return {"images": self.images, "shards": len(self.shards), "rejects": len(self.rejects),
                "shuffled": self.shuffled}


class ListedImage(NamedTuple):
    """One image file found in a source.

    Attributes:
        path: Where to read it.
        cls: Its class (the ImageFolder sub-folder), or None.
        source: How the user names it: the path relative to the source folder, or the line
            of a text-file list as written. Stored in the sample's ``.json`` member.
    """

    path: Path
    cls: str | None
    source: str


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower().lstrip(".") in LISTED_EXTS


def _is_listed_file(f: Path) -> bool:
    """A visible file, or a symbolic link that points nowhere (listed, to be rejected with its reason)."""
    return not f.name.startswith(".") and (f.is_file() or (f.is_symlink() and not f.exists()))


def _visible_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if _is_listed_file(f))


def collect_images(source: str | os.PathLike) -> list[ListedImage]:
    """List the images of one source, in a stable order (by class, then by name).

    Raises:
        BeitDataError: If the source does not exist.
    """
    src = Path(source)
    if not src.exists():
        raise BeitDataError(f"image source not found: {src}")
    if src.is_file():
        lines = [ln.strip() for ln in src.read_text().splitlines()]
        return [ListedImage(Path(ln) if os.path.isabs(ln) else src.parent / ln, None, ln) for ln in lines if ln]
    entries = sorted(src.iterdir())
    subdirs = [d for d in entries if d.is_dir() and not d.name.startswith(".")]
    files = [f for f in entries if _is_listed_file(f)]
    if subdirs and not any(_is_image_name(f) for f in files):
        return [ListedImage(f, d.name, f.relative_to(src).as_posix()) for d in subdirs for f in _visible_files(d)]
    return [ListedImage(f, None, f.name) for f in files]


def write_order(listing: list[ListedImage], *, shuffle: bool, seed: int) -> list[ListedImage]:
    """The listing in the order its images are written: a permutation drawn from ``seed`` alone.

    Sharded training reads a shard's samples close together, so class-sorted shards give
    class-sorted batches; shuffling here is what prevents that.
    """
    if not shuffle:
        return list(listing)
    return [listing[i] for i in stable_rng(seed, "shards").permutation(len(listing))]


def _read_image(path: Path, max_pixels: int | None) -> tuple[bytes, str]:
    """The file's bytes and the member extension of its real format.

    Raises:
        OSError, ImageError: If it cannot be read or is not a decodable JPEG, PNG or WebP.
    """
    if path.is_symlink() and not path.exists():
        raise ImageError(f"broken symbolic link to {os.readlink(path)}")
    data = path.read_bytes()
    return data, FORMAT_EXT[probe_image(data, decode=True, max_pixels=max_pixels).format]


def load_class_map(path: str | os.PathLike) -> list[str]:
    """The class names, in id order, from a ``shards.json`` or ``classes.json`` a ``shards`` run
    wrote (or any JSON list of names).

    Raises:
        BeitDataError: For a missing file, or one that holds no list of distinct names.
    """
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BeitDataError(f"class map not found: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BeitDataError(f"{path} is not a class map (JSON): {exc}") from None
    classes = data.get("classes") if isinstance(data, dict) else data
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes) or \
            len(set(classes)) != len(classes):
        raise BeitDataError(f"{path} holds no class map: expected a list of distinct class names, or a shards.json "
                            "with one under \"classes\"")
    return classes


def class_map_digest(classes: list[str]) -> str:
    """A short identity of a class map: shards written with the same map share it."""
    return hashlib.sha256(json.dumps(classes).encode()).hexdigest()[:16]


def _class_map(listing: list[ListedImage], classes_file: str | os.PathLike | None) -> list[str]:
    """The class names in id order: the file's, or the tree's folders sorted by name."""
    found = sorted({item.cls for item in listing if item.cls is not None})
    if classes_file is None:
        return found
    classes = load_class_map(classes_file)
    unknown = [c for c in found if c not in set(classes)]
    if unknown:
        raise BeitDataError(f"class folder {unknown[0]} is not in the class map {classes_file} ({len(unknown)} "
                            "such); the ids must mean the same classes in every set")
    return classes


def _sample(key: str, item: ListedImage, data: bytes, ext: str, class_index: dict[str, int], digest: str) -> dict:
    """One WebDataset sample: the image, its ``.json`` provenance and, in a tree, its ``.cls``
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


def run_shards(config: ShardsConfig) -> ShardsResult:
    """Write every decodable image into shards, with a ``.idx`` beside each shard.

    Images go in a seeded random order unless ``config.shuffle`` is off; keys count up in
    write order. Image bytes are stored unchanged. A file that is not a decodable JPEG, PNG or
    WebP is skipped and listed in ``rejects.json`` with its reason; every other file is written.

    Raises:
        BeitDataError: For an output folder that is not empty (without ``overwrite``) or not
            local, a source without images, or when every file was rejected (the reasons
            are in ``rejects.json`` then, and no shard is left).
    """
    out = output_location(config.out, "shards", remote=False)
    listing = [item for source in config.sources for item in collect_images(source)]
    if not listing:
        raise BeitDataError(f"no files in {', '.join(map(str, config.sources))}")
    classes = _class_map(listing, config.classes)
    _clear_earlier_run(out, config.overwrite)
    out = ensure_writable_dir(out)
    result = ShardsResult(classes=classes, shuffled=config.shuffle, seed=config.seed)
    class_index = {name: i for i, name in enumerate(result.classes)}
    digest = class_map_digest(classes)
    ordered = write_order(listing, shuffle=config.shuffle, seed=config.seed)
    # Each shard is written under a hidden temporary name and renamed when it is complete, so
    # a killed run never leaves a half shard under a final name; one that got no sample is removed.
    pattern = str(out / f".{config.prefix}-%06d.tar.tmp")
    in_shard = [0]

    def finish(tmp: str) -> None:
        if not in_shard[0]:
            os.remove(tmp)
            return
        final = out / Path(tmp).name[1:-len(".tmp")]
        os.replace(tmp, final)
        write_index(final)
        result.shards.append(final)
        in_shard[0] = 0

    with wds.ShardWriter(pattern, maxcount=config.maxcount, verbose=0, post=finish) as writer:
        for item in progress_bar(ordered, desc="shards", unit="img", disable=not config.progress):
            try:
                data, ext = _read_image(item.path, config.max_pixels)
            except (OSError, ImageError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                result.rejects.append(Reject(key=str(item.path), reason=reason))
                continue
            writer.write(_sample(f"{result.images:09d}", item, data, ext, class_index, digest))
            result.images += 1
            in_shard[0] += 1
    _write_reports(out, result)
    if not result.images:
        first = result.rejects[0]
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
