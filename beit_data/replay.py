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
from typing import BinaryIO, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from beit_common import BeitDataError, storage
from beit_data.masking import BlockMaskGenerator
from beit_data.order import MIX_SHARDS, Window, epoch_windows, steps_per_epoch
from beit_data.prefetch import prefetch
from beit_data.shards import check_fingerprint, expand_shards, iter_samples, read_index
from beit_data.tokens import VIEW_COLUMNS, read_consistent_footers, read_table, token_files, token_path
from beit_data.views import stable_rng

__all__ = ["StreamConfig", "ReplaySource", "OUTPUTS", "PlannedBatch", "outlive_job_signals"]

# What one iteration yields, in this order.
OUTPUTS = ("encoded", "roi", "flips", "jitter", "tokens", "mask", "key", "rejected")
_RAGGED = ("encoded", "key")


@dataclass(frozen=True, kw_only=True)
class StreamConfig:
    """What the training stream reads and how it orders it.

    Attributes:
        mix_shards: Shards a rank reads at once; their samples are permuted together.
            Memory per rank grows with it (one token row and one offset per sample of a
            window, up to three windows at a time: the one being read, the next one and
            the one loading); reads are random within those shards.
    """

    shards: str
    tokens: str
    batch_size: int
    seed: int = 0
    image_size: int = 224
    num_masked: int = 75
    min_block: int = 16
    mix_shards: int = MIX_SHARDS
    skip_missing: bool = False
    num_threads: int = 4
    # Control experiment only: pair every image with another image's tokens.
    shuffle_targets: bool = False

    def __post_init__(self):
        if self.batch_size < 1 or self.mix_shards < 1:
            raise BeitDataError("`batch_size` and `mix_shards` must be at least 1")


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
    _steps: dict = field(default_factory=dict, repr=False, compare=False)
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
        for shard in expand_shards(cfg.shards):
            path = token_path(cfg.tokens, shard)
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

    def steps_per_epoch(self, epoch: int) -> int:
        """Full batches every rank can make in ``epoch``: the same number on each rank."""
        if epoch not in self._steps:
            self._steps[epoch] = steps_per_epoch(self.images_per_shard, seed=self.cfg.seed, epoch=epoch,
                                                 world_size=self.world_size, batch_size=self.cfg.batch_size)
        return self._steps[epoch]

    def check_epoch(self, epoch: int) -> None:
        """Refuse an epoch in which some rank cannot make one batch, saying what would help."""
        if self.steps_per_epoch(epoch) > 0:
            return
        images = sum(self.images_per_shard)
        fewest = steps_per_epoch(self.images_per_shard, seed=self.cfg.seed, epoch=epoch, world_size=self.world_size,
                                 batch_size=1)
        if fewest > 0:
            raise BeitDataError(f"epoch {epoch} has fewer tokenized images on some rank than one batch of "
                                f"{self.cfg.batch_size} ({images} in all, {len(self.shards)} shards, "
                                f"{self.world_size} ranks); lower `batch_size`")
        raise BeitDataError(f"some rank has no tokenized image in epoch {epoch}: the {len(self.shards)} shards hold "
                            f"{images} tokenized images for {self.world_size} ranks; tokenize more shards, or run "
                            "on fewer ranks")

    @property
    def sequential(self) -> bool:
        """Whether the shards are read from their start only (some are ``pipe:`` commands)."""
        return any(storage.is_pipe(s) for s in self.shards)

    def positions(self) -> Iterator[tuple[int, int]]:
        """``(epoch, step)`` of each batch this source yields, in order."""
        epoch, step = self.start
        while True:
            self.check_epoch(epoch)
            yield from ((epoch, s) for s in range(step, self.steps_per_epoch(epoch)))
            epoch, step = epoch + 1, 0

    # ---- the order ----------------------------------------------------------------------

    def _windows(self, *, read: bool) -> Iterator[tuple[int, Window, list[_Shard], int, int]]:
        """From ``start`` on, forever: each window with its loaded shards and the part of it
        (``lo``, ``hi``) that falls inside the epoch's full batches."""
        epoch, step = self.start
        skip = step * self.cfg.batch_size
        while True:
            limit = self.steps_per_epoch(epoch) * self.cfg.batch_size
            for window in epoch_windows(self.images_per_shard, seed=self.cfg.seed, epoch=epoch, rank=self.rank,
                                        world_size=self.world_size, mix_shards=self.cfg.mix_shards, skip=skip,
                                        sequential=self.sequential):
                if window.start >= limit:
                    break
                loaded = [self._load(index, epoch, read=read) for index in window.shards]
                yield epoch, window, loaded, max(skip - window.start, 0), min(len(window), limit - window.start)
            epoch, skip = epoch + 1, 0

    def _samples(self, *, read: bool, done: list[_Shard] | None = None) -> Iterator[tuple[int, _Shard, int]]:
        """``(epoch, shard, i)`` for each sample in order, with the next window loading meanwhile.

        A batch may hold the last samples of one window and the first of the next, and its
        images are read after all of them are picked. So a window's shards are not closed here
        when its last sample is handed out: they go to ``done``, and whoever reads the samples
        closes them once the batch is read (``_batches``). Without ``done`` nothing is open.
        """
        windows = self._windows(read=read)
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

    def plan(self) -> Iterator[PlannedBatch]:
        """What each batch from ``start`` on holds, forever, without reading an image."""
        samples = self._samples(read=False)
        for epoch, step in self.positions():
            picked = [next(samples) for _ in range(self.cfg.batch_size)]
            yield PlannedBatch(epoch, self.rank, step, [s.keys[i] for _, s, i in picked],
                               [int(s.views[i]) for _, s, i in picked])

    # ---- loading ------------------------------------------------------------------------

    def _keys(self, table: pa.Table, path: str) -> list[str]:
        """The token file's keys in order; each must have exactly ``views`` rows."""
        if table.num_rows == 0:  # every image of the shard was rejected
            return []
        keys = table.column("key").take(pa.array(np.arange(0, table.num_rows, self.views)))
        repeated = pc.take(keys, pa.array(np.repeat(np.arange(len(keys)), self.views)))
        if table.num_rows % self.views or not pc.all(pc.equal(table.column("key"), repeated)).as_py():
            raise BeitDataError(f"{path} does not hold {self.views} rows for each key; tokenize it again")
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
            shard.url = location
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
            for j, data in zip(remote, storage.read_many(requests)):
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
            with closing(self._samples(read=True, done=done)) as samples:
                yield from self._batches(masker, samples, done)
        finally:
            _close(done)

    def _batches(self, masker: BlockMaskGenerator, samples, done: list[_Shard]) -> Iterator[tuple]:
        """The batches of ``OUTPUTS`` from the samples in order, a batch's images read together;
        the shards of the windows it finished are closed once its images are read."""
        for _ in self.positions():
            picked = [next(samples) for _ in range(self.cfg.batch_size)]
            rows = [self._item(masker, image, *p) for image, p in zip(self._read(picked), picked)]
            _close(done)
            # Same-shape outputs go as one dense array: DALI's per-sample hand-over costs Python time.
            yield tuple(list(column) if name in _RAGGED else np.stack(column)
                        for name, column in zip(OUTPUTS, zip(*rows)))

    def for_rank(self, rank: int) -> ReplaySource:
        """The same source as another rank sees it."""
        return self._fresh(rank=rank)

    def at(self, epoch: int, step: int) -> ReplaySource:
        """The same source, starting at ``(epoch, step)``."""
        return self._fresh(start=(epoch, step))

    def _fresh(self, **changes) -> ReplaySource:
        """A copy with ``changes`` that has read nothing yet."""
        return replace(self, bytes_read=0, _steps=dict(self._steps), _counted=set(), **changes)
