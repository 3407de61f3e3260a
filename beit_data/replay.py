"""The Python half of the training stream: which samples, views, tokens and masks make a batch.

``ReplaySource`` is iterated by a DALI parallel external source in a worker process, so tar
reading, the Parquet join, view picking and mask drawing never hold the training process's
GIL. It imports only numpy and pyarrow, so a spawned worker starts without torch.

The order of the samples is ``beit_data.order``'s: each epoch a rank reads its shards in
windows of ``mix_shards`` shards, each window's samples permuted as a whole, each sample
read by its offset in its shard (from the ``.idx`` file, or the tar headers without one).
A sample is the ``i``-th key of its shard's token file. One stored view is picked from
``(seed, epoch, key)``; the same generator draws fresh jitter (for tokens made with
``--no-target-jitter``) and the block mask. ``plan`` walks the same order without reading
an image.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from contextlib import closing
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import BinaryIO, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from beit_common import BeitDataError, storage
from beit_data.masking import BlockMaskGenerator
from beit_data.order import (
    MIX_SHARDS,
    PARTITIONS,
    Layout,
    OrderSpec,
    check_steps,
    epoch_layout,
    partition_spans,
    rank_slices,
    steps_from,
    take_batches,
)
from beit_data.prefetch import prefetch
from beit_data.shards import check_fingerprint, duplicate_keys, expand_shards, iter_samples, read_index
from beit_data.tokens import VIEW_COLUMNS, read_consistent_footers, read_table, token_files, token_paths
from beit_data.views import stable_rng

__all__ = ["StreamConfig", "ReplaySource", "OUTPUTS", "PlannedBatch", "outlive_job_signals"]

# What one iteration yields, in this order.
OUTPUTS = ("encoded", "roi", "flips", "jitter", "tokens", "mask", "key", "rejected")
_RAGGED = ("encoded", "key")


@dataclass(frozen=True, kw_only=True)
class StreamConfig:
    """What the training stream reads and how it orders it (see ``beit_data.order``).

    Attributes:
        batch_size: Samples per rank per step; the global batch is that times the world size.
        partitions: Partitions of each epoch. A rank reads whole partitions when the world
            size divides them, and reads the windows of every partition it takes a part of.
        mix_shards: Shards a partition reads at once; their samples are permuted together.
            Memory per partition read grows with it (one token row and one offset per sample
            of a window, up to three windows at a time: the one being read, the next one and
            the one loading); reads are random within those shards.
        dealt: The order of runs started before partitions: shards dealt to ranks.
    """

    shards: str
    tokens: str
    batch_size: int
    seed: int = 0
    image_size: int = 224
    num_masked: int = 75
    min_block: int = 16
    partitions: int = PARTITIONS
    mix_shards: int = MIX_SHARDS
    dealt: bool = False
    skip_missing: bool = False
    num_threads: int = 4
    # Control experiment only: pair every image with another image's tokens.
    shuffle_targets: bool = False

    def __post_init__(self):
        if min(self.batch_size, self.mix_shards, self.partitions) < 1:
            raise BeitDataError("`batch_size`, `mix_shards` and `partitions` must be at least 1")


@dataclass(frozen=True)
class PlannedBatch:
    """What one step of one rank sees: its keys and the stored view of each."""

    epoch: int
    rank: int
    step: int
    keys: list[str]
    views: list[int]

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "rank": self.rank, "step": self.step, "keys": self.keys, "views": self.views}


@dataclass
class _Shard:
    """One shard of a loaded window: its keys in sample order, the view each key replays, and
    (when the images are to be read) that view's row, the image offsets and the open file."""

    keys: list[str]
    views: np.ndarray  # (n,) picked view per key
    rows: dict[str, np.ndarray] | None = None  # VIEW_COLUMNS and tokens (n, grid*grid) of the picked views
    images: list | None = None  # (offset, size) of each key's image member
    file: BinaryIO | None = None  # a local shard, open
    url: str | None = None  # an object's URL
    etag: str | None = None  # the object's ETag when the run started: its reads are pinned to it
    reader: _Sequential | None = None  # a pipe: shard, read from the start
    rejected: int = 0  # keys of the shard without token rows

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.reader is not None:
            self.reader.close()


class _Sequential:
    """A shard read once from its start (a ``pipe:`` command): the images of its token file's
    keys, in tar order; the shard's other samples (rejected when it was tokenized) are passed."""

    def __init__(self, shard: str, keys: list[str], token_file: str):
        self.shard, self.keys, self.token_file = shard, keys, token_file
        self.samples = iter_samples(shard)

    def read(self, i: int) -> bytes:
        key = self.keys[i]
        for sample in self.samples:
            if sample.key == key:
                return sample.image
        raise BeitDataError(f"{self.shard} no longer holds key {key} that {storage.basename(self.token_file)} "
                            "lists, in that order; was it rewritten?")

    def close(self) -> None:
        self.samples.close()


def _close(shards: list[_Shard]) -> None:
    """Close ``shards`` and empty the list."""
    for shard in shards:
        shard.close()
    shards.clear()


LOADER_GRACE_S = 20.0


def outlive_job_signals(grace: float = LOADER_GRACE_S) -> None:
    """Keep DALI's loader process alive while its trainer finishes the step it is on.

    Ctrl-C and a closed terminal reach the whole process group, Slurm's ``scancel`` every
    process of the job, and torchrun each worker's process group, so under Slurm and torchrun
    a preemption brings this process two SIGTERMs. The trainer answers all of them by finishing
    its step (which may still need a batch from here), saving, and closing this process itself.
    So SIGINT and SIGHUP are ignored here, and SIGTERMs end this process ``grace`` seconds after
    the first one, or at once when the trainer is gone. (DALI itself sends SIGTERM only to a
    loader that is still busy a second after the trainer closed the pipeline; that one waits out
    the grace too.)
    """
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    parent = os.getppid()
    timer: threading.Timer | None = None

    def on_sigterm(signum, frame) -> None:
        nonlocal timer
        if os.getppid() != parent:
            os._exit(128 + signum)
        if timer is None:
            timer = threading.Timer(grace, os._exit, (128 + signum,))
            timer.daemon = True
            timer.start()

    signal.signal(signal.SIGTERM, on_sigterm)


@dataclass(kw_only=True)
class ReplaySource:
    """Batches of one rank from ``start = (epoch, step)`` on, forever; picklable.

    Attributes:
        cfg: The stream settings.
        shards, token_files: The shards and their token Parquet files, in the same order.
        images_per_shard: Tokenized images in each shard (rows / views).
        views: Stored views per image.
        grid: Token grid side.
        target_jitter: Whether the stored jitter is replayed; otherwise it is drawn fresh.
        jitter: Strength of fresh jitter: factors are uniform in [1 - jitter, 1 + jitter].
        bytes_read: Image bytes this source has read (in the process that iterates it).

    Shards may be local files or objects (read by range requests, a batch's images at once).
    ``pipe:`` shards cannot seek: the order then reads each shard from its start, in its own
    order (``sequential``), and only the shard order mixes.
    """

    cfg: StreamConfig
    shards: list[str]
    token_files: list[str]
    images_per_shard: list[int]
    views: int
    grid: int
    target_jitter: bool
    jitter: float
    rank: int = 0
    world_size: int = 1
    start: tuple[int, int] = (0, 0)
    missing: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    fingerprints: list[dict] = field(default_factory=list)  # of each shard, as its token file records it
    etags: list[str | None] = field(default_factory=list)  # of each object when the run started
    bytes_read: int = field(default=0, compare=False)
    _counted: set = field(default_factory=set, repr=False, compare=False)

    @classmethod
    def open(cls, cfg: StreamConfig, *, rank: int = 0, world_size: int = 1) -> ReplaySource:
        """Pair each shard with its token file and check that they all share one recipe.

        Raises:
            BeitDataError: A shard without a token file (unless ``skip_missing``), or token
                files from different tokenizers or recipes.
        """
        shards, paths, missing = [], [], []
        # One listing, not a request per shard.
        have = {storage.basename(p) for p in token_files(cfg.tokens, allow_empty=True)}
        listed = expand_shards(cfg.shards)
        for shard, path in zip(listed, token_paths(cfg.tokens, listed)):
            if storage.basename(path) in have:
                shards.append(str(shard))
                paths.append(str(path))
            elif cfg.skip_missing:
                missing.append(str(shard))
            else:
                raise BeitDataError(f"no token file for shard {shard} (expected {path}); "
                                    "tokenize it or pass `skip_missing`")
        if not shards:
            raise BeitDataError(f"none of the shards has a token file in {cfg.tokens}")
        footers = read_consistent_footers(paths)
        metas = [m for m, _ in footers]
        # Size, and the .idx where there is one. Objects were listed (sizes, ETags) when the spec
        # was expanded; their .idx files are read many at once.
        storage.map_concurrently(lambda i: check_fingerprint(shards[i], metas[i].get("shard"), paths[i], full=False),
                                 range(len(shards)), concurrent=any(map(storage.is_url, shards)))
        meta, views = metas[0], metas[0]["views"]
        return cls(cfg=cfg, shards=shards, token_files=paths, missing=missing, meta=meta,
                   fingerprints=[m["shard"] for m in metas],
                   etags=[storage.stat(s, fresh=False)["etag"] if storage.is_url(s) else None for s in shards],
                   images_per_shard=[rows // views["views"] for _, rows in footers],
                   views=views["views"], grid=meta["tokenizer"]["grid"], target_jitter=views["target_jitter"],
                   jitter=views["jitter"], rank=rank, world_size=world_size)

    @cached_property
    def spec(self) -> OrderSpec:
        """What fixes the order: the same on any number of ranks (but for ``dealt`` runs)."""
        return OrderSpec(seed=self.cfg.seed, global_batch=self.cfg.batch_size * self.world_size,
                         partitions=self.world_size if self.cfg.dealt else self.cfg.partitions,
                         mix_shards=self.cfg.mix_shards, sequential=self.sequential, dealt=self.cfg.dealt)

    def layout(self, epoch: int) -> Layout:
        """The steps and partitions of ``epoch``."""
        return epoch_layout(self.images_per_shard, self.spec, epoch)

    def steps_per_epoch(self, epoch: int) -> int:
        """Global steps of ``epoch``: every rank takes each of them."""
        return self.layout(epoch).steps

    def check_epoch(self, epoch: int) -> int:
        """The steps of ``epoch``; an epoch without one is refused, saying what would help."""
        return check_steps(self.layout(epoch), self.spec, epoch)

    @property
    def sequential(self) -> bool:
        """Whether the shards are read from their start only (some are ``pipe:`` commands)."""
        return any(storage.is_pipe(s) for s in self.shards)

    def positions(self) -> Iterator[tuple[int, int]]:
        """``(epoch, step)`` of each batch this source yields, in order."""
        return steps_from(self.start, self.check_epoch)

    # ---- the order ----------------------------------------------------------------------

    def _partition(self, partition: int, *, read: bool, done: list[_Shard] | None
                   ) -> Iterator[tuple[int, _Shard, int]]:
        """``(epoch, shard, i)`` for each sample of ``partition`` in order from ``start`` on,
        forever, with its next window loading meanwhile.

        A batch may hold the last samples of one window and the first of the next, and its
        images are read after all of them are picked. So a window's shards are not closed here
        when its last sample is handed out: they go to ``done``, and whoever reads the samples
        closes them once the batch is read (``__iter__``). Without ``done`` nothing is open.
        """
        windows = ((epoch, window, [self._load(i, epoch, read=read) for i in window.shards], lo, hi)
                   for epoch, window, lo, hi in partition_spans(self.images_per_shard, self.spec, partition,
                                                                self.start))
        if read:
            windows = prefetch(windows, depth=1)
        loaded: list[_Shard] = []
        try:
            for epoch, window, loaded, lo, hi in windows:
                for j in range(lo, hi):
                    yield epoch, loaded[window.shard_of[j]], int(window.sample_of[j])
                if done is not None:
                    done.extend(loaded)
                loaded = []
        finally:
            _close(loaded)  # a window left part way, by an error or an early close
            windows.close()  # stops the loading thread now, not when the garbage collector finds it

    def _picked(self, *, read: bool, done: list[_Shard] | None = None
                ) -> Iterator[tuple[tuple[int, int], list[tuple[int, _Shard, int]]]]:
        """``((epoch, step), samples)`` of each batch of this rank from ``start`` on, forever."""
        slices = rank_slices(self.spec, self.world_size, self.rank)
        streams = {p: self._partition(p, read=read, done=done) for p, _, _ in slices}
        try:
            yield from zip(self.positions(), take_batches(streams, slices, self.spec.shares))
        finally:
            for stream in streams.values():
                stream.close()

    def plan(self) -> Iterator[PlannedBatch]:
        """What each batch from ``start`` on holds, forever, without reading an image."""
        for (epoch, step), picked in self._picked(read=False):
            yield PlannedBatch(epoch, self.rank, step, [s.keys[i] for _, s, i in picked],
                               [int(s.views[i]) for _, s, i in picked])

    # ---- loading ------------------------------------------------------------------------

    def _keys(self, table: pa.Table, path: str) -> list[str]:
        """The token file's keys in order; each must have exactly ``views`` rows."""
        if table.num_rows == 0:  # every image of the shard was rejected
            return []
        keys = table.column("key").take(pa.array(np.arange(0, table.num_rows, self.views)))
        repeated = pc.take(keys, pa.array(np.repeat(np.arange(len(keys)), self.views)))
        if table.num_rows % self.views or not pc.all(pc.equal(table.column("key"), repeated)).as_py() \
                or pc.count_distinct(keys).as_py() != len(keys):
            raise BeitDataError(f"{path} does not hold {self.views} rows for each key, each key once; tokenize it "
                                "again")
        return keys.to_pylist()

    def _load(self, index: int, epoch: int, *, read: bool) -> _Shard:
        """A shard's keys and picked views for ``epoch``; with ``read``, also their rows and
        image offsets, and the shard opened for reading."""
        path = self.token_files[index]
        table = read_table(path, columns=None if read else ["key"])
        keys = self._keys(table, path)
        picks = np.array([stable_rng(self.cfg.seed, epoch, k).integers(self.views) for k in keys], np.int64)
        shard = _Shard(keys, picks)
        if not read:
            return shard
        first = np.arange(len(keys)) * self.views
        picked = pa.array(first + picks)
        shard.rows = {name: table.column(name).take(picked).to_numpy() for name in VIEW_COLUMNS}
        if self.cfg.shuffle_targets:  # every image keeps its view, with another image's tokens for it
            first = first[stable_rng(self.cfg.seed, "shuffle-targets", index).permutation(len(keys))]
        shard.rows["tokens"] = (table.column("tokens").take(pa.array(first + picks)).combine_chunks().flatten()
                                .to_numpy().reshape(len(keys), self.grid ** 2))
        location = self.shards[index]
        if storage.is_pipe(location):
            shard.reader = _Sequential(location, keys, path)
            return shard
        shard.images, shard.rejected = self._offsets(index, keys)
        if storage.is_url(location):
            shard.url, shard.etag = location, self.etags[index]
        else:
            shard.file = open(location, "rb", buffering=0)  # closed when its window is done
        return shard

    def _offsets(self, index: int, keys: list[str]) -> tuple[list, int]:
        """Each key's image (offset, size) in the shard, and how many shard keys have no tokens."""
        location, size = self.shards[index], None
        if storage.is_url(location):  # once per window: an object replaced during the run is refused
            info, was = storage.stat(location), self.etags[index]
            if was is not None and info["etag"] != was:
                raise BeitDataError(f"{location} changed during the run (ETag {info['etag']}, {was} when it "
                                    "started); a shard must stay as it was tokenized")
            size = info["size"]
        entries = read_index(location)
        check_fingerprint(location, self.fingerprints[index], self.token_files[index], index=entries, size=size)
        members = {s.key: s.members[s.image_ext] for s in entries if s.image_ext}
        repeated = set(duplicate_keys(entries)).intersection(keys)
        if repeated:
            raise BeitDataError(f"{self.shards[index]} holds {len(repeated)} keys that name several samples (first: "
                                f"{min(repeated)}), which {storage.basename(self.token_files[index])} lists; a key "
                                "must name one image: tokenize it again")
        lost = [k for k in keys if k not in members]
        if lost:
            raise BeitDataError(f"{self.shards[index]} no longer holds {len(lost)} of the keys that "
                                f"{storage.basename(self.token_files[index])} lists (first: {lost[0]}); "
                                "was it rewritten?")
        rejected = 0
        if index not in self._counted:  # once per process, not once per epoch
            self._counted.add(index)
            rejected = len(set(members) - set(keys))
        return [members[k][:2] for k in keys], rejected

    def _read(self, picked: list[tuple[int, _Shard, int]]) -> list[np.ndarray]:
        """The images of a batch: local files by ``pread``, objects by concurrent range requests
        (one per image, all of the batch's at once), ``pipe:`` shards from their streams."""
        out: list[bytes | None] = [None] * len(picked)
        remote = []
        for j, (_, shard, i) in enumerate(picked):
            if shard.reader is not None:
                out[j] = shard.reader.read(i)
            elif shard.url is not None:
                remote.append(j)
            else:
                offset, size = shard.images[i]
                out[j] = os.pread(shard.file.fileno(), size, offset)
        if remote:
            requests = [(picked[j][1].url, *picked[j][1].images[picked[j][2]]) for j in remote]
            etags = [picked[j][1].etag for j in remote]
            for j, data in zip(remote, storage.read_many(requests, etags)):
                out[j] = data
        self.bytes_read += sum(len(d) for d in out)
        return [np.frombuffer(d, np.uint8) for d in out]

    # ---- batches ------------------------------------------------------------------------

    def _item(self, masker: BlockMaskGenerator, image: np.ndarray, epoch: int, shard: _Shard, i: int
              ) -> list[np.ndarray]:
        """One row of ``OUTPUTS``: one generator from (seed, epoch, key) picks the view (again),
        draws fresh jitter where the tokens have none, and draws the mask."""
        key, rows = shard.keys[i], shard.rows
        rng = stable_rng(self.cfg.seed, epoch, key)
        rng.integers(self.views)  # the view, picked when the shard was loaded
        if self.target_jitter:
            jitter = np.array([[rows["brightness"][i], rows["contrast"][i], rows["saturation"][i]]], np.float32)
        else:
            jitter = rng.uniform(1 - self.jitter, 1 + self.jitter, size=(1, 3)).astype(np.float32)
        x, y, w, h = (int(rows[c][i]) for c in ("x", "y", "w", "h"))
        rejected, shard.rejected = shard.rejected, 0
        return [image, np.array([[x, y, x + w, y + h]], np.float32),
                np.array([rows["flip"][i]], np.int32), jitter, rows["tokens"][i].astype(np.int64),
                masker(rng).reshape(-1), np.frombuffer(key.encode(), np.uint8), np.array([rejected], np.int32)]

    def __iter__(self) -> Iterator[tuple[list[np.ndarray] | np.ndarray, ...]]:
        """One tuple per batch with each of ``OUTPUTS``: a list of per-sample arrays for the
        encoded images and keys, a dense (B, ...) array for the rest."""
        if multiprocessing.parent_process() is not None:
            outlive_job_signals()
        masker = BlockMaskGenerator((self.grid, self.grid), self.cfg.num_masked, self.cfg.min_block)
        done: list[_Shard] = []
        try:
            with closing(self._picked(read=True, done=done)) as batches:
                for _, picked in batches:
                    rows = [self._item(masker, image, *p) for image, p in zip(self._read(picked), picked)]
                    _close(done)  # the windows this batch finished: their last images are read
                    # Same-shape outputs go as one dense array: DALI's per-sample hand-over costs Python time.
                    yield tuple(list(column) if name in _RAGGED else np.stack(column)
                                for name, column in zip(OUTPUTS, zip(*rows)))
        finally:
            _close(done)

    def for_rank(self, rank: int) -> ReplaySource:
        """The same source as another rank sees it."""
        return self._fresh(rank=rank)

    def at(self, epoch: int, step: int) -> ReplaySource:
        """The same source, starting at ``(epoch, step)``."""
        return self._fresh(start=(epoch, step))

    def _fresh(self, **changes) -> ReplaySource:
        """A copy with ``changes`` that has read nothing yet."""
        return replace(self, bytes_read=0, _counted=set(), **changes)
