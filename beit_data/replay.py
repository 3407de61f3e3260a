"""The Python half of the training stream: which samples, views, tokens and masks make a batch.

``ReplaySource`` is iterated by a DALI parallel external source in a worker process, so tar
reading, the Parquet join, view picking and mask drawing never hold the training process's
GIL. It imports only numpy and pyarrow, so a spawned worker starts without torch.

The order of the samples is ``beit_data.order``'s: each epoch a rank reads its shards in
windows of ``mix_shards`` shards, each window's samples permuted as a whole, each sample
read by its offset in its shard (from the ``.idx`` file, or the tar headers without one).
A window holds each of its shards as a ``LoadedShard``, closed once the batch holding its last
sample has been read. Seekable shards (local files, objects) are read by the images' offsets
(``beit_common.ranges``); a ``pipe:`` shard is read once from its start (``SequentialReader``).

The source walks that one order and hands each sample to its targets, composed with it rather
than subclassed: ``StoredTargets`` (here: the ``i``-th key of its shard's token file, with its
stored view and tokens) or ``beit_data.online.OnlineTargets`` (a fresh view each epoch,
tokenized in the loop). A stored sample's view, its fresh jitter (tokens made with
``--no-target-jitter``) and its mask each have a generator of ``(seed, epoch, key)``; runs from
before keep their draws (``beit_data.old_orders``). ``plan`` walks the same order without
reading an image.
"""

from __future__ import annotations

import multiprocessing
from contextlib import closing
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import ClassVar, Iterator, Protocol

import numpy as np
import pyarrow as pa

from beit_common import BeitDataError, Location, storage
from beit_common.ranges import RangeFile, read_batch
from beit_data.loader_signals import outlive_job_signals
from beit_data.masking import BlockMaskGenerator
from beit_data.old_orders import Draws, draws_for, layout_for, partitions_for
from beit_data.order import (
    Layout,
    OrderSpec,
    PlannedBatch,
    check_steps,
    epoch_layout,
    partition_spans,
    rank_slices,
    steps_from,
    take_batches,
)
from beit_data.prefetch import prefetch
from beit_data.shard_index import check_fingerprint, read_index
from beit_data.shards import duplicate_keys, expand_shards, iter_samples
from beit_data.stream_config import StreamConfig
from beit_data.tokens import (
    VIEW_COLUMNS,
    WINDOW_COLUMNS,
    TokenMeta,
    check_rows,
    file_keys,
    read_consistent_footers,
    read_table,
    token_files,
    token_paths,
)
from beit_data.views import roi, row_view, stable_rng

__all__ = ["StreamConfig", "ReplaySource", "Targets", "StoredTargets", "OUTPUTS", "PlannedBatch",
           "pair_token_files", "LoadedShard", "SequentialReader", "close_all", "image_members", "read_images_of"]

# What one iteration yields, in this order.
OUTPUTS = ("encoded", "roi", "flips", "jitter", "tokens", "mask", "key", "rejected")
_RAGGED = ("encoded", "key")


# ---- a shard as a window holds it ---------------------------------------------------------------


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
        raise BeitDataError(f"{self.shard} no longer holds key {key} that {self.token_file.name} lists, in "
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


# ---- stored targets ----------------------------------------------------------------------------


def pair_token_files(spec: str, tokens: Location, *, skip_missing: bool = False, held_out: bool = False
                     ) -> tuple[list[Location], list[Location], list[tuple[TokenMeta, int]], list[Location]]:
    """``(shards, token_files, footers, missing)``: each shard of ``spec`` paired with its token
    file in ``tokens``, checked as training checks them before its first step.

    Every file shares the first one's tokenizer and recipe, its footer is sound (``read_footer``:
    the schema, and ids and windows as its statistics show them), and each shard is still the
    one its file was made from (its size, and its members where a ``.idx`` lists them; a stale
    ``.idx`` is named as such). What needs the rows is checked when a shard is loaded
    (``check_rows``, ``image_members``). The held-out set of ``pretrain --val-shards`` is paired
    by this too (``held_out``: the messages name validation shards).

    Raises:
        BeitDataError: A shard without a token file (unless ``skip_missing``), or any of the above.
    """
    shards, paths, missing = [], [], []
    # One listing, not a request per shard.
    have = {p.name for p in token_files(tokens, allow_empty=True)}
    listed = expand_shards(spec)
    for shard, path in zip(listed, token_paths(tokens, listed)):
        if path.name in have:
            shards.append(shard)
            paths.append(path)
        elif skip_missing:
            missing.append(shard)
        elif held_out:
            raise BeitDataError(f"validation shard {shard} has no token file {path}; tokenize it into `val_tokens`")
        else:
            raise BeitDataError(f"no token file for shard {shard} (expected {path}); "
                                "tokenize it or pass `skip_missing`")
    if not shards:
        raise BeitDataError(f"none of the shards has a token file in {tokens}")
    footers = read_consistent_footers(paths)
    # Size, and the .idx if any (objects were listed when the spec was expanded; .idx read at once).
    storage.map_concurrently(lambda s: check_fingerprint(s[0], s[1][0].shard, s[2], full=False),
                             list(zip(shards, footers, paths)))
    return shards, paths, footers, missing



class Targets(Protocol):
    """What a source's samples are trained against: how a shard of a window is loaded, and the
    row of ``OUTPUTS`` each of its samples gives. The source walks the order; its targets know
    the files."""

    OUTPUTS: tuple[str, ...]

    def shard_keys(self, source: ReplaySource, index: int) -> list[str]: ...

    def load(self, source: ReplaySource, index: int, epoch: int, *, read: bool) -> LoadedShard: ...

    def item(self, source: ReplaySource, masker: BlockMaskGenerator, image: np.ndarray, epoch: int,
             shard: LoadedShard, i: int) -> list[np.ndarray]: ...

    def fresh(self) -> Targets: ...


@dataclass(kw_only=True)
class StoredTargets:
    """The views and tokens of the token Parquet files, one per shard.

    Attributes:
        token_files: Each shard's token file, in the source's shard order.
        views: Stored views per image.
        target_jitter: Whether the stored jitter is replayed; otherwise it is drawn fresh.
        jitter: Strength of fresh jitter: factors are uniform in [1 - jitter, 1 + jitter].
        fingerprints: Of each shard, as its token file records it.
    """

    token_files: list[Location]
    views: int
    target_jitter: bool
    jitter: float
    fingerprints: list[dict] = field(default_factory=list)
    _counted: set = field(default_factory=set, repr=False, compare=False)
    _checked: set = field(default_factory=set, repr=False, compare=False)  # token files whose rows were checked
    OUTPUTS: ClassVar[tuple[str, ...]] = OUTPUTS

    def fresh(self) -> StoredTargets:
        """A copy that has checked and counted nothing yet."""
        return replace(self, _counted=set(), _checked=set())

    def shard_keys(self, source: ReplaySource, index: int) -> list[str]:
        return read_table(self.token_files[index], columns=["key"]).column("key").unique().to_pylist()

    def load(self, source: ReplaySource, index: int, epoch: int, *, read: bool) -> LoadedShard:
        """A shard's keys and picked views for ``epoch``; with ``read``, also their rows and
        image offsets, and the shard opened for reading."""
        path, cfg = self.token_files[index], source.cfg
        table = read_table(path, columns=None if read else ["key"])
        keys = file_keys(table.column("key"), self.views, path)
        if read and index not in self._checked:  # once per process: the windows, which need the rows
            check_rows(table.select(WINDOW_COLUMNS), source.meta.tokenizer.vocab, path)
            self._checked.add(index)
        picks = np.array([source.draws.view_rng(epoch, k).integers(self.views) for k in keys], np.int64)
        shard = LoadedShard(keys, picks)
        if not read:
            return shard
        first = np.arange(len(keys)) * self.views
        picked = pa.array(first + picks)
        shard.rows = {name: table.column(name).take(picked).to_numpy() for name in VIEW_COLUMNS}
        if cfg.shuffle_targets:  # every image keeps its view, with another image's tokens for it
            first = first[stable_rng(cfg.seed, "shuffle-targets", index).permutation(len(keys))]
        shard.rows["tokens"] = (table.column("tokens").take(pa.array(first + picks)).combine_chunks().flatten()
                                .to_numpy().reshape(len(keys), source.grid ** 2))
        location = source.shards[index]
        if not location.seekable:
            shard.reader = SequentialReader(location, keys, path)
            return shard
        shard.images, shard.rejected = self._offsets(source, index, keys)
        shard.file = RangeFile.open(location, source.etags[index])  # closed when its window is done
        return shard

    def _offsets(self, source: ReplaySource, index: int, keys: list[str]) -> tuple[list, int]:
        """Each key's image (offset, size) in the shard, and how many shard keys have no tokens."""
        members = image_members(source.shards[index], keys, token_file=self.token_files[index],
                                fingerprint=self.fingerprints[index], etag=source.etags[index])
        rejected = 0
        if index not in self._counted:  # once per process, not once per epoch
            self._counted.add(index)
            rejected = len(set(members) - set(keys))
        return [members[k][:2] for k in keys], rejected

    def item(self, source: ReplaySource, masker: BlockMaskGenerator, image: np.ndarray, epoch: int,
             shard: LoadedShard, i: int) -> list[np.ndarray]:
        """One row of ``OUTPUTS``: the picked view's window and tokens, fresh jitter where the
        tokens have none, and the mask."""
        key, draws = shard.keys[i], source.draws
        view = row_view({name: shard.rows[name][i] for name in VIEW_COLUMNS})
        rng = draws.mask_rng(epoch, key, self.views)
        if self.target_jitter:
            jitter = np.array([[view.brightness, view.contrast, view.saturation]], np.float32)
        else:
            fresh = draws.jitter_rng(epoch, key, rng)
            jitter = fresh.uniform(1 - self.jitter, 1 + self.jitter, size=(1, 3)).astype(np.float32)
        rejected, shard.rejected = shard.rejected, 0
        return [image, roi([view]), np.array([view.flip], np.int32), jitter, shard.rows["tokens"][i].astype(np.int64),
                masker(rng).reshape(-1), np.frombuffer(key.encode(), np.uint8), np.array([rejected], np.int32)]


# ---- the source: one order walk, with its targets -----------------------------------------------


@dataclass(kw_only=True)
class ReplaySource:
    """Batches of one rank from ``start = (epoch, step)`` on, forever; picklable.

    Attributes:
        cfg: The stream settings.
        shards: The shards, in the order of their targets' files.
        images_per_shard: Images of each shard the order counts (tokenized images: rows / views).
        grid: Token grid side.
        targets: What the samples are trained against (``StoredTargets``, or online ones).
        meta: The tokenizer and view recipe of the targets, as a token file's footer holds them.
        bytes_read: Image bytes this source has read (in the process that iterates it).

    Shards may be local files or objects (a batch's images read by range requests at once);
    ``pipe:`` shards cannot seek, so each is read from its start (``sequential``).
    """

    cfg: StreamConfig
    shards: list[Location]
    images_per_shard: list[int]
    grid: int
    targets: Targets
    rank: int = 0
    world_size: int = 1
    start: tuple[int, int] = (0, 0)
    missing: list[Location] = field(default_factory=list)
    meta: TokenMeta
    etags: list[str | None] = field(default_factory=list)  # of each object when the run started
    bytes_read: int = field(default=0, compare=False)

    @classmethod
    def open(cls, cfg: StreamConfig, *, rank: int = 0, world_size: int = 1) -> ReplaySource:
        """The source of stored targets: each shard paired with its token file and checked
        (``pair_token_files``).

        Raises:
            BeitDataError: A shard without a token file (unless ``skip_missing``), token files
                from different tokenizers or recipes, or that are not sound, or a shard that
                has changed since it was tokenized.
        """
        shards, paths, footers, missing = pair_token_files(cfg.shards, cfg.tokens, skip_missing=cfg.skip_missing)
        meta = footers[0][0]
        views = meta.views
        targets = StoredTargets(token_files=paths, views=views.views, target_jitter=views.target_jitter,
                                jitter=views.jitter, fingerprints=[m.shard for m, _ in footers])
        return cls(cfg=cfg, shards=shards, missing=missing, meta=meta, targets=targets,
                   etags=[storage.stat(s, fresh=False)["etag"] for s in shards],
                   images_per_shard=[rows // views.views for _, rows in footers],
                   grid=meta.tokenizer.grid, rank=rank, world_size=world_size)

    @property
    def OUTPUTS(self) -> tuple[str, ...]:  # noqa: N802 (the targets' constant)
        """What one iteration yields, in this order."""
        return self.targets.OUTPUTS

    @cached_property
    def draws(self) -> Draws:
        """Where each sample's view, fresh jitter and mask come from: the order version's."""
        return draws_for(self.cfg)

    @cached_property
    def spec(self) -> OrderSpec:
        """What fixes the order: the same on any number of ranks (but for runs of version 1), laid
        out as the order version lays out its epochs."""
        return OrderSpec(seed=self.cfg.seed, global_batch=self.cfg.global_batch(self.world_size),
                         partitions=partitions_for(self.cfg, self.world_size), mix_shards=self.cfg.mix_shards,
                         sequential=self.sequential, layout=layout_for(self.cfg.order_version))

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
        return not all(s.seekable for s in self.shards)

    def positions(self) -> Iterator[tuple[int, int, int]]:
        """``(epoch, step, micro)`` of each batch yielded, in order: ``grad_accum`` micro-batches a step."""
        for epoch, step in steps_from(self.start, self.check_epoch):
            for micro in range(self.cfg.grad_accum):
                yield epoch, step, micro

    # ---- the order ----------------------------------------------------------------------

    def _partition(self, partition: int, *, read: bool, done: list[LoadedShard] | None
                   ) -> Iterator[tuple[int, LoadedShard, int]]:
        """``(epoch, shard, i)`` for each sample of ``partition`` in order from ``start`` on,
        forever, with its next window loading meanwhile.

        A batch may hold the last samples of one window and the first of the next, and its
        images are read after all of them are picked. So a window's shards are not closed here
        when its last sample is handed out: they go to ``done``, and whoever reads the samples
        closes them once the batch is read (``__iter__``). Without ``done`` nothing is open.
        """
        windows = ((epoch, window, [self.targets.load(self, i, epoch, read=read) for i in window.shards], lo, hi)
                   for epoch, window, lo, hi in partition_spans(self.images_per_shard, self.spec, partition,
                                                                self.start))
        if read:
            windows = prefetch(windows, depth=1)
        loaded: list[LoadedShard] = []
        try:
            for epoch, window, loaded, lo, hi in windows:
                for j in range(lo, hi):
                    yield epoch, loaded[window.shard_of[j]], int(window.sample_of[j])
                if done is not None:
                    done.extend(loaded)
                loaded = []
        finally:
            close_all(loaded)  # a window left part way, by an error or an early close
            windows.close()  # stops the loading thread now, not when the garbage collector finds it

    def _picked(self, *, read: bool, done: list[LoadedShard] | None = None
                ) -> Iterator[tuple[tuple[int, int], list[tuple[int, LoadedShard, int]]]]:
        """``((epoch, step), samples)`` of each step of this rank from ``start`` on, forever: its
        share of the global step, ``batch_size * grad_accum`` samples."""
        slices = rank_slices(self.spec, self.world_size, self.rank)
        streams = {p: self._partition(p, read=read, done=done) for p, _, _ in slices}
        try:
            yield from zip(steps_from(self.start, self.check_epoch), take_batches(streams, slices, self.spec.shares))
        finally:
            for stream in streams.values():
                stream.close()

    def plan(self) -> Iterator[PlannedBatch]:
        """What each step of this rank from ``start`` on holds (all its micro-batches), forever,
        without reading an image."""
        for (epoch, step), picked in self._picked(read=False):
            yield PlannedBatch(epoch, self.rank, step, [s.keys[i] for _, s, i in picked],
                               [int(s.views[i]) for _, s, i in picked])

    # ---- batches ------------------------------------------------------------------------

    def _read(self, picked: list[tuple[int, LoadedShard, int]]) -> list[np.ndarray]:
        images = read_images_of(picked)
        self.bytes_read += sum(len(d) for d in images)
        return [np.frombuffer(d, np.uint8) for d in images]

    def __iter__(self) -> Iterator[tuple[list[np.ndarray] | np.ndarray, ...]]:
        """One tuple per micro-batch with each of ``OUTPUTS``: a list of per-sample arrays for the
        encoded images and keys, a dense (B, ...) array for the rest."""
        if multiprocessing.parent_process() is not None:
            outlive_job_signals()
        masker = BlockMaskGenerator((self.grid, self.grid), self.cfg.num_masked, self.cfg.min_block)
        item = self.targets.item
        done: list[LoadedShard] = []
        size = self.cfg.batch_size
        try:
            with closing(self._picked(read=True, done=done)) as steps:
                for _, step in steps:
                    for i in range(0, len(step), size):  # the step's micro-batches
                        picked = step[i:i + size]
                        rows = [item(self, masker, image, *p) for image, p in zip(self._read(picked), picked)]
                        if i + size >= len(step):  # the windows this step finished: their last images are read
                            close_all(done)
                        # Same-shape outputs go as one dense array: DALI's per-sample hand-over costs Python time.
                        yield tuple(list(column) if name in _RAGGED else np.stack(column)
                                    for name, column in zip(self.OUTPUTS, zip(*rows)))
        finally:
            close_all(done)

    def shard_keys(self, index: int) -> list[str]:
        """The keys training reads of shard ``index``."""
        return self.targets.shard_keys(self, index)

    def for_rank(self, rank: int) -> ReplaySource:
        """The same source as another rank sees it."""
        return self._fresh(rank=rank)

    def configured(self, cfg: StreamConfig, *, rank: int, world_size: int) -> ReplaySource:
        """The same shards and token files under ``cfg`` (the settings completed once they were read)."""
        return self._fresh(cfg=cfg, rank=rank, world_size=world_size)

    def at(self, epoch: int, step: int) -> ReplaySource:
        """The same source, starting at ``(epoch, step)``."""
        return self._fresh(start=(epoch, step))

    def _fresh(self, **changes) -> ReplaySource:
        """A copy with ``changes`` that has read nothing yet."""
        return replace(self, bytes_read=0, targets=self.targets.fresh(), **changes)
