"""What ``beit-data shards`` reads, as one stream of items in write order, with their class map.

Sources are image files (flat folders, ImageFolder trees with a folder per class, text files
listing paths) or Parquet image datasets (``beit_data.parquet_images``): one kind per run. Each
item says where it came from (stored in its sample's ``.json``), its class, and how to get its
bytes; a held-out share of each class can be set apart (``holdout_per_class``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

from beit_common import BeitDataError, Location
from beit_data.images import FORMAT_EXT, ImageError, probe_image
from beit_data.parquet_images import ParquetImages, file_identity, is_parquet_source
from beit_data.shards import IMAGE_EXTS
from beit_data.views import stable_rng
from pipelines.config import ShardsConfig

__all__ = ["ListedImage", "Item", "Source", "collect_images", "write_order", "open_source", "load_class_map",
           "class_map_digest", "held_out"]

LISTED_EXTS = IMAGE_EXTS + ("bmp", "gif", "tif", "tiff")


class ListedImage(NamedTuple):
    """One image file found in a source.

    Attributes:
        path: Where to read it.
        cls: Its class (the ImageFolder sub-folder), or None.
        source: How the user names it: the path relative to the source folder, or the line
            of a text-file list as written. Stored in the sample's ``.json`` member.
        base: The folder a list's relative line was resolved against (the list's own), which
            a reject for a missing file names; None for every other file.
    """

    path: Path
    cls: str | None
    source: str
    base: Path | None = None


@dataclass(frozen=True)
class Item:
    """One image to write: its provenance, class name (None: unlabeled), place in the listing
    (for the held-out choice) and its bytes, read when called (raising ``OSError`` or
    ``ImageError`` for one that cannot be written)."""

    source: str
    cls: str | None
    index: int
    read: Callable[[], bytes]
    where: str = ""  # what a reject names: the file's path, or the Parquet file and row

    def __post_init__(self):
        if not self.where:
            object.__setattr__(self, "where", self.source)


@dataclass
class Source:
    """A run's items in write order, their class map, and how many there are."""

    items: Iterator[Item]
    classes: list[str]
    labels: list[str | None]  # each item's class, in listing order (the held-out choice draws from it)


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower().lstrip(".") in LISTED_EXTS


def _is_listed_file(f: Path) -> bool:
    """A visible file, or a symbolic link that points nowhere (listed, to be rejected with its reason)."""
    return not f.name.startswith(".") and (f.is_file() or (f.is_symlink() and not f.exists()))


def _visible_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if _is_listed_file(f))


def collect_images(source: Location) -> list[ListedImage]:
    """List the images of one source, in a stable order (by class, then by name).

    A folder is an ImageFolder tree when its images are all in sub-folders (one per class;
    files at its top that are not images are left out), else a flat folder of images. Images
    at the top beside sub-folders that hold images are refused: one half would be skipped
    (torchvision's ImageFolder skips the top without a word), or the classes lost.

    Raises:
        BeitDataError: If the source does not exist, or mixes the two layouts.
    """
    src = source.path  # image files are listed on this machine: a URL source is Parquet
    if not src.exists():
        raise BeitDataError(f"image source not found: {src}")
    if src.is_file():
        try:
            lines = [ln.strip() for ln in src.read_text().splitlines()]
        except UnicodeDecodeError:
            raise BeitDataError(f"{src} is neither a text list of image paths nor a Parquet file") from None
        base = src.parent.absolute()  # relative lines are read from the list's folder, wherever it is run from
        return [ListedImage(Path(ln), None, ln) if os.path.isabs(ln) else ListedImage(src.parent / ln, None, ln, base)
                for ln in lines if ln]
    entries = sorted(src.iterdir())
    subdirs = [d for d in entries if d.is_dir() and not d.name.startswith(".")]
    files = [f for f in entries if _is_listed_file(f)]
    top = [f for f in files if _is_image_name(f)]
    if subdirs and not top:
        return [ListedImage(f, d.name, f.relative_to(src).as_posix()) for d in subdirs for f in _visible_files(d)]
    nested = next((d for d in subdirs if any(_is_image_name(f) and _is_listed_file(f) for f in d.rglob("*"))), None)
    if nested is not None:
        raise BeitDataError(f"{src} holds images at its top (such as {top[0].name}) and in sub-folders (such as "
                            f"{nested.name}/): class folders and images without a class cannot be mixed; move the "
                            "top images into a class folder, or list every path in a text file to write them all "
                            "without classes")
    return [ListedImage(f, None, f.name) for f in files]


def _refuse_overlap(listing: list[tuple[str, ListedImage]]) -> None:
    """Refuse a file listed twice (overlapping sources, a link to a listed file, a repeated
    line): it would be written twice, and could be held out and trained on at once.

    Raises:
        BeitDataError: Naming the first such file, both ways it was reached and the count.
    """
    seen: dict[tuple[int, int] | str, tuple[str, ListedImage]] = {}
    twice = []
    for source, image in listing:
        first = seen.setdefault(file_identity(image.path), (source, image))
        if first[1] is not image:
            twice.append((first, (source, image)))
    if twice:
        (a, x), (b, y) = twice[0]
        raise BeitDataError(f"{y.path} is listed twice: as {x.source} of source {a} and as {y.source} of source {b} "
                            f"({len(twice)} files are); the sources overlap: give each image once")


def write_order(listing: list, *, shuffle: bool, seed: int) -> list:
    """The listing in the order its images are written: a permutation drawn from ``seed`` alone.

    Sharded training reads a shard's samples close together, so class-sorted shards give
    class-sorted batches; shuffling here is what prevents that.
    """
    if not shuffle:
        return list(listing)
    return [listing[i] for i in stable_rng(seed, "shards").permutation(len(listing))]


def read_image(data: bytes, max_pixels: int | None, min_size: int = 0) -> tuple[bytes, str]:
    """The bytes and the member extension of their real format.

    Raises:
        ImageError: If they are not a decodable JPEG, PNG or WebP, or the image's shorter side is
            under ``min_size`` pixels.
    """
    info = probe_image(data, decode=True, max_pixels=max_pixels)
    side = min(info.width, info.height)
    if side < min_size:
        raise ImageError(f"its shorter side is {side} px, under --min-size {min_size} (tokenize would set it aside)")
    return data, FORMAT_EXT[info.format]


def _file_bytes(image: ListedImage) -> bytes:
    path = image.path
    if path.is_symlink() and not path.exists():
        raise ImageError(f"broken symbolic link to {os.readlink(path)}")
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        if image.base is None:
            raise
        raise ImageError(f"{exc.strerror}: {image.source!r} in {image.base} (a list's relative paths are read "
                         "from the list's own folder)") from None


def load_class_map(path: Location) -> list[str]:
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


def _class_map(found: list[str], classes_file: Location | None) -> list[str]:
    """The class names in id order: the file's, or ``found`` (already in id order)."""
    if classes_file is None:
        return found
    classes = load_class_map(classes_file)
    unknown = [c for c in found if c not in set(classes)]
    if unknown:
        raise BeitDataError(f"class {unknown[0]} is not in the class map {classes_file} ({len(unknown)} such); the "
                            "ids must mean the same classes in every set")
    return classes


def open_source(config: ShardsConfig) -> Source:
    """The items of ``config.sources`` in write order, and their class map.

    Raises:
        BeitDataError: For a missing source, sources of both kinds, or no item at all.
    """
    parquet = [is_parquet_source(s) for s in config.sources]
    if any(parquet) and not all(parquet):
        raise BeitDataError("the sources mix Parquet with image files; write them in separate runs (with one class "
                            "map: `classes`)")
    if config.image_root is not None and not all(parquet):
        raise BeitDataError("`image_root` is for Parquet sources whose image column holds paths; a list file's "
                            "relative paths are read from the list's own folder")
    return _parquet_source(config) if all(parquet) else _file_source(config)


def _file_source(config: ShardsConfig) -> Source:
    found = [(str(source), item) for source in config.sources for item in collect_images(source)]
    if not found:
        raise BeitDataError(f"no files in {', '.join(map(str, config.sources))}")
    _refuse_overlap(found)
    listing = [item for _, item in found]
    classes = _class_map(sorted({item.cls for item in listing if item.cls is not None}), config.classes)
    items = (Item(f.source, f.cls, i, lambda f=f: _file_bytes(f), str(f.path))
             for i, f in write_order(list(enumerate(listing)), shuffle=config.shuffle, seed=config.seed))
    return Source(items, classes, [f.cls for f in listing])


def _parquet_source(config: ShardsConfig) -> Source:
    """Rows of Parquet files; a label becomes its ClassLabel name where the file's metadata has
    names, else the id itself (``"0"`` .. ``"N-1"``, so that the ids stay the dataset's)."""
    images = ParquetImages.open(config.sources, config.image_column, config.label_column, config.image_root)
    labels = images.labels() if images.label_column else None
    names = images.names
    if labels is not None and names is None:
        names = [str(i) for i in range(int(labels.max(initial=-1)) + 1)]
    if labels is not None and len(labels) and labels.max() >= len(names):
        raise BeitDataError(f"label {int(labels.max())} in {images.files[0].parent} is past the {len(names)} class "
                            "names of the dataset's metadata")
    classes = _class_map(names, config.classes) if names is not None else []

    def name(label: int | None) -> str | None:
        return None if label is None or label < 0 else names[label]

    items = (Item(row.source, name(row.label), row.index, row.read)
             for row in images.rows(shuffle=config.shuffle, seed=config.seed))
    return Source(items, classes, [name(int(x)) for x in labels] if labels is not None else [None] * images.count)


def held_out(labels: list[str | None], per_class: float, seed: int) -> tuple[set[int], str | None]:
    """The listing positions set apart, drawn from ``seed`` within each class: ``per_class``
    images of each (a count), or that share of each (below 1), at least one of every class
    with two or more; and a warning where that was capped.

    No class gives more images to the held-out set than it keeps for training: a request that
    would is capped at half the class, rounded down (a class of one image keeps it), and the
    warning says so.

    Raises:
        BeitDataError: For unlabeled images.
    """
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        if label is None:
            raise BeitDataError("`holdout_per_class` needs labeled images (class folders or a label column)")
        by_class.setdefault(label, []).append(i)
    chosen, capped, asked = set(), [], 0
    for label in sorted(by_class):
        members = by_class[label]
        want = int(per_class) if per_class >= 1 else max(1, round(per_class * len(members)))
        count = min(want, len(members) // 2)
        if count < want:
            capped.append(label)
            asked += want
        picks = stable_rng(seed, "holdout", label).permutation(len(members))[:count]
        chosen.update(members[int(p)] for p in picks)
    warning = None
    if capped:
        held = sum(len(by_class[c]) // 2 for c in capped)
        warning = (f"`holdout_per_class` {per_class:g} would leave {len(capped)} of {len(by_class)} classes with "
                   f"fewer training than held-out images (such as {capped[0]}, which has {len(by_class[capped[0]])}): "
                   f"held out half of each of those, rounded down ({held} images instead of {asked}), "
                   f"{len(chosen)} in all")
    return chosen, warning
