"""Image datasets stored as Parquet, read a row group at a time, never a whole file.

Two layouts are common: the Hugging Face one (a struct column ``image`` of ``bytes`` and
``path``, a ``label`` column whose class names the schema's ``huggingface`` metadata holds as a
``ClassLabel``: the hub's ``imagenet-1k`` conversions, ``timm/imagenet-*``), and img2dataset's
``--output_format parquet`` (a ``jpg`` bytes column). The image and label columns are found by
name, or given. Rows come out in a seeded order that never holds more than ``window`` row
groups: the row groups are permuted, and the rows of each ``window`` of them are permuted
together (the training stream mixes across shards again).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa

from beit_common import BeitDataError, Location, storage
from beit_common.listing import expand
from beit_data.images import ImageError
from beit_data.tokens import parquet_file
from beit_data.views import stable_rng

__all__ = ["ParquetImages", "ParquetRow", "is_parquet_source", "file_identity", "IMAGE_COLUMNS", "LABEL_COLUMNS"]

IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img", "image_bytes", "bytes")
LABEL_COLUMNS = ("label", "labels", "cls", "class", "class_id")
WINDOW = 4  # row groups whose rows are permuted together


def is_parquet_source(source: Location) -> bool:
    """Whether a ``shards`` source names Parquet: a ``.parquet`` file or pattern, a URL, or a
    folder that holds Parquet files and no images."""
    path = source.local_path()
    if source.endswith(".parquet") or path is None:
        return True
    if path.is_dir():
        names = [p.name for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
        return bool(names) and all(n.endswith(".parquet") for n in names)
    return False


@contextmanager
def _reading(file: Location, what: str) -> Iterator[None]:
    """One line naming ``file`` for what reading it raised: the system's reason (a missing file, no
    permission), or pyarrow's for a damaged file (a cut footer, a corrupt page), never a traceback."""
    try:
        with storage.remote_errors(file, what):
            yield
    except (pa.ArrowException, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise BeitDataError(f"{file}: {exc.strerror or exc}") from None
        reason = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in " ".join(str(exc).split()))
        reason = reason[:300].rstrip(".")
        raise BeitDataError(f"{file} ({what}): {reason}; the file is damaged or incomplete (a cut download?): "
                            "fetch it again") from None


def file_identity(location: Location | Path) -> tuple[int, int] | str:
    """What makes two names one file: a local file's device and inode (through symbolic and hard
    links and any spelling of the path), the absolute path of one that is not there, or the URL."""
    # A listed image is a Path: a million of them are checked quickly.
    path = location if isinstance(location, Path) else location.local_path()
    if path is None:
        return location.identity()
    try:
        st = os.stat(path)
    except OSError:
        return os.path.abspath(path)
    return st.st_dev, st.st_ino


def _refuse_overlap(files: Sequence[Location], sources: Sequence[Location]) -> None:
    """A file that two sources (or a file and its folder) both name would give every row twice."""
    seen: dict = {}
    for f in files:
        first = seen.setdefault(file_identity(f), f)
        if first is not f:
            raise BeitDataError(f"{f} is named twice by the sources {', '.join(map(str, sources))} (as {first} "
                                "too); the sources overlap: give each file once")


@dataclass(frozen=True)
class ParquetRow:
    """One row: where it came from, its image bytes (None with the reason in ``error``), its label."""

    source: str
    index: int  # the row's place among all rows of the files, in file order
    data: bytes | None
    label: int | None
    error: str | None = None
    path: str | None = None  # the image file of a row that holds a path only, read by ``read``

    def read(self) -> bytes:
        """The image bytes: the row's own, or those of the file it names.

        Raises:
            ImageError: With the reason: no bytes, or a file that cannot be read (naming it).
        """
        if self.error:
            raise ImageError(self.error)
        if self.path is None:
            return self.data
        try:
            return storage.read_bytes(self.path)
        except (BeitDataError, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ImageError(f"image file {self.path}: {reason}") from None


def _pick(names: Sequence[str], given: str | None, known: tuple[str, ...], what: str, file: Location,
          required: bool) -> str | None:
    if given is not None:
        if given not in names:
            raise BeitDataError(f"{file} has no column {given!r} (`{what}_column`); its columns: {', '.join(names)}")
        return given
    found = next((n for n in known if n in names), None)
    if found is None and required:
        raise BeitDataError(f"{file}: no image column among {', '.join(names)}; name it with `image_column`")
    return found


def _class_names(schema: pa.Schema, column: str | None) -> list[str] | None:
    """The ClassLabel names of ``column`` in the Hugging Face metadata, where there are some."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if column is None or raw is None:
        return None
    try:
        feature = json.loads(raw)["info"]["features"][column]
    except (ValueError, KeyError, TypeError):
        return None
    names = feature.get("names") if isinstance(feature, dict) else None
    return [str(n) for n in names] if isinstance(names, list) else None


@dataclass(frozen=True)
class ParquetImages:
    """The Parquet files of some sources, their image and label columns, class names, and row groups."""

    files: list[Location]
    image_column: str
    label_column: str | None
    names: list[str] | None
    row_groups: list[tuple[int, int]]  # (file, row group), in file order
    offsets: list[int]  # rows before each file
    image_root: Location | None = None  # where a row's relative image path is read from; None: its file's folder

    @property
    def count(self) -> int:
        return self.offsets[-1]

    @classmethod
    def open(cls, sources: Sequence[Location], image_column: str | None = None,
             label_column: str | None = None, image_root: Location | None = None) -> ParquetImages:
        """Every Parquet file of ``sources`` (files, folders, globs or prefixes; local or object
        URLs), checked to share the image and label columns. A row whose image struct holds a
        path and no bytes is read from that path, relative to ``image_root`` or else to the
        Parquet file's folder.

        Raises:
            BeitDataError: For no Parquet file, a file without the columns, or files that differ.
        """
        files = [f for source in sources for f in expand(source, ".parquet", "Parquet source")]
        if not files:
            raise BeitDataError(f"no Parquet file in {', '.join(map(str, sources))}")
        _refuse_overlap(files, sources)
        with _reading(files[0], "footer"):
            first = parquet_file(files[0])
            schema = first.schema_arrow
        image = _pick(schema.names, image_column, IMAGE_COLUMNS, "image", files[0], True)
        label = _pick(schema.names, label_column, LABEL_COLUMNS, "label", files[0], False)
        if label is not None and not pa.types.is_integer(schema.field(label).type):
            raise BeitDataError(f"{files[0]}: the label column {label!r} holds {schema.field(label).type}, not class "
                                "ids (integers); name the class-id column with `label_column`")
        groups, offsets = [], [0]
        for i, f in enumerate(files):
            with _reading(f, "footer"):
                meta = (first if i == 0 else parquet_file(f)).metadata
                names = meta.schema.to_arrow_schema().names
            for wanted in (image, label):
                if wanted is not None and wanted not in names:
                    raise BeitDataError(f"{f} has no column {wanted!r}, which {files[0]} has")
            groups += [(i, g) for g in range(meta.num_row_groups)]
            offsets.append(offsets[-1] + meta.num_rows)
        return cls(files, image, label, _class_names(schema, label), groups, offsets, image_root)

    def labels(self) -> np.ndarray:
        """Every row's label (the label column alone is read), -1 where it is null."""
        if self.label_column is None:
            return np.zeros(0, np.int64)
        parts = []
        for f in self.files:
            with _reading(f, f"column {self.label_column}"):
                parts.append(parquet_file(f).read(columns=[self.label_column]).column(0))
        return np.concatenate([p.fill_null(-1).to_numpy().astype(np.int64) for p in parts]) if parts else \
            np.zeros(0, np.int64)

    def rows(self, *, shuffle: bool, seed: int, window: int = WINDOW) -> Iterator[ParquetRow]:
        """Every row, in file order, or shuffled in windows of ``window`` row groups."""
        order = list(self.row_groups)
        if shuffle:
            order = [order[i] for i in stable_rng(seed, "parquet-row-groups").permutation(len(order))]
        step = window if shuffle else 1
        for w, first in enumerate(range(0, len(order), step)):
            rows = [row for group in order[first:first + step] for row in self._group(*group)]
            picks = stable_rng(seed, "parquet-rows", w).permutation(len(rows)) if shuffle else range(len(rows))
            for i in picks:
                yield rows[i]

    def _group(self, file: int, group: int) -> list[ParquetRow]:
        """The rows of one row group, with where each came from (file and row)."""
        columns = [self.image_column] + ([self.label_column] if self.label_column else [])
        with _reading(self.files[file], f"row group {group}"):
            reader = parquet_file(self.files[file])
            start = sum(reader.metadata.row_group(g).num_rows for g in range(group))
            table = reader.read_row_group(group, columns=columns)
        images = table.column(self.image_column).to_pylist()
        labels = table.column(self.label_column).to_pylist() if self.label_column else [None] * len(images)
        name, first = self.files[file].name, self.offsets[file] + start
        root = self.image_root if self.image_root is not None else self.files[file].parent
        return [_row(f"{name}:{start + i}", first + i, image, label, root)
                for i, (image, label) in enumerate(zip(images, labels))]


def _row(source: str, index: int, image, label, root: Location) -> ParquetRow:
    """A row's image: the ``bytes`` of a Hugging Face image struct, or a bytes column's value; or,
    for a struct with a path and no bytes (what ``datasets`` writes after ``cast_column('image',
    Image())`` of files), that file: an absolute path or URL as it is, a relative one under ``root``."""
    path = None
    if isinstance(image, dict):
        path = image.get("path") if not image.get("bytes") else None
        image = image.get("bytes")
    path = path if isinstance(path, str) and path else None
    if path is None and (not isinstance(image, (bytes, bytearray)) or not image):
        return ParquetRow(source, index, None, label, "no image bytes in the row")
    if label is not None and not isinstance(label, int):
        return ParquetRow(source, index, None, None, f"label {label!r} is not a class id")
    if path is not None:
        return ParquetRow(source, index, None, label, path=str(root.locate(path)))
    return ParquetRow(source, index, bytes(image), label)
