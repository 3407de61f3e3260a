"""A shard as a window of the training stream holds it: its keys, the token rows of the views
picked for an epoch, each image's offset, and the file its images are read from.

``ReplaySource`` loads one ``LoadedShard`` per shard of a window and closes it when the batch
holding its last sample has been read. Seekable shards (local files, objects) are read by the
images' offsets (``beit_common.ranges``); a ``pipe:`` shard is read once from its start, in
its own order (``SequentialReader``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from beit_common import BeitDataError, Location, storage
from beit_common.ranges import RangeFile, read_batch
from beit_data.shard_index import check_fingerprint, read_index
from beit_data.shards import duplicate_keys, iter_samples

__all__ = ["LoadedShard", "SequentialReader", "close_all", "table_keys", "image_members", "read_images_of"]


class SequentialReader:
    """A shard read once from its start (a ``pipe:`` command): the images of its token file's
    keys, in tar order; the shard's other samples (rejected when it was tokenized) are passed."""

    def __init__(self, shard: Location, keys: list[str], token_file: Location):
        self.shard, self.keys, self.token_file = shard, keys, token_file
        self.samples = iter_samples(shard)

    def read(self, i: int) -> bytes:
        key = self.keys[i]
        for sample in self.samples:
            if sample.key == key:
                return sample.image
        raise BeitDataError(f"{self.shard} no longer holds key {key} that {Location(self.token_file).name} lists, in "
                            "that order; was it rewritten?")

    def close(self) -> None:
        self.samples.close()


@dataclass
class LoadedShard:
    """One shard of a loaded window: its keys in sample order, the view each key replays, and
    (when the images are to be read) that view's row, the image offsets and the open file."""

    keys: list[str]
    views: np.ndarray  # (n,) picked view per key
    rows: dict[str, np.ndarray] | None = None  # VIEW_COLUMNS and tokens (n, grid*grid) of the picked views
    images: list | None = None  # (offset, size) of each key's image member
    file: RangeFile | None = None  # a seekable shard, opened for range reads
    reader: SequentialReader | None = None  # a pipe: shard, read from the start
    rejected: int = 0  # keys of the shard without token rows
    location: Location | None = None  # the shard, where messages name it

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.reader is not None:
            self.reader.close()


def close_all(shards: list[LoadedShard]) -> None:
    """Close ``shards`` and empty the list."""
    for shard in shards:
        shard.close()
    shards.clear()


def table_keys(table: pa.Table, views: int, path: str) -> list[str]:
    """A token file's keys in order; each must have exactly ``views`` rows, and appear once.

    Raises:
        BeitDataError: Naming the file, for any other layout.
    """
    if table.num_rows == 0:  # every image of the shard was rejected
        return []
    keys = table.column("key").take(pa.array(np.arange(0, table.num_rows, views)))
    repeated = pc.take(keys, pa.array(np.repeat(np.arange(len(keys)), views)))
    if table.num_rows % views or not pc.all(pc.equal(table.column("key"), repeated)).as_py() \
            or pc.count_distinct(keys).as_py() != len(keys):
        raise BeitDataError(f"{path} does not hold {views} rows for each key, each key once; tokenize it again")
    return keys.to_pylist()


def image_members(shard: Location, keys: list[str], *, token_file: Location, fingerprint: dict,
                  etag: str | None) -> dict:
    """The image member of each sample of a shard, by key, after checking that the shard is still
    the one its token file was made from and holds each of ``keys`` once.

    A ``pipe:`` shard (read whole for its index) has no ETag or size to compare.

    Raises:
        BeitDataError: For an object replaced during the run (its ETag no longer ``etag``), a
            shard rewritten since it was tokenized, or a key it lost or holds twice.
    """
    info = storage.stat(shard) if shard.seekable else {"etag": None, "size": None}
    if etag is not None and info["etag"] != etag:
        raise BeitDataError(f"{shard} changed during the run (ETag {info['etag']}, {etag} when it started); a shard "
                            "must stay as it was tokenized")
    entries = read_index(shard)
    check_fingerprint(shard, fingerprint, token_file, index=entries, size=info["size"])
    members = {s.key: s.members[s.image_ext] for s in entries if s.image_ext}
    repeated = set(duplicate_keys(entries)).intersection(keys)
    if repeated:
        raise BeitDataError(f"{shard} holds {len(repeated)} keys that name several samples (first: {min(repeated)}), "
                            f"which {token_file.name} lists; a key must name one image: tokenize it again")
    lost = [k for k in keys if k not in members]
    if lost:
        raise BeitDataError(f"{shard} no longer holds {len(lost)} of the keys that {token_file.name} lists (first: "
                            f"{lost[0]}); was it rewritten?")
    return members


def read_images_of(picked: list[tuple[int, LoadedShard, int]]) -> list[bytes]:
    """The images of a batch's ``(epoch, shard, i)``: seekable shards by their offsets, all of the
    batch's at once (local files by ``pread``, objects by concurrent range requests), ``pipe:``
    shards from their streams."""
    out: list[bytes | None] = [None] * len(picked)
    ranged = [j for j, (_, shard, _) in enumerate(picked) if shard.reader is None]
    for j, (_, shard, i) in enumerate(picked):
        if shard.reader is not None:
            out[j] = shard.reader.read(i)
    requests = [(picked[j][1].file, *picked[j][1].images[picked[j][2]]) for j in ranged]
    for j, data in zip(ranged, read_batch(requests)):
        out[j] = data
    return out
