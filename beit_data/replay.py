"""The Python half of the training stream: which samples, views, tokens and masks make a batch.

``ReplaySource`` is iterated by a DALI parallel external source in a worker process, so tar
reading, the Parquet join, view picking and mask drawing never hold the training process's
GIL. It imports only numpy and pyarrow, so a spawned worker starts without torch.

The order of the samples is ``beit_data.order``'s: each epoch a rank reads its shards in
windows of ``mix_shards`` shards, each window's samples permuted as a whole, each sample
read by its offset in its shard (from the ``.idx`` file, or the tar headers without one).
A sample is the ``i``-th key of its shard's token file. Its stored view, its fresh jitter
(tokens made with ``--no-target-jitter``) and its mask each have a generator of ``(seed,
epoch, key)`` (one for all three in runs from before, ``shared_draws``). ``plan`` walks the
same order without reading an image.
"""

from __future__ import annotations

import multiprocessing
from contextlib import closing
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import ClassVar, Iterator

import numpy as np
import pyarrow as pa

from beit_common import BeitDataError, Location, storage
from beit_common.ranges import RangeFile
from beit_data.loader_signals import outlive_job_signals
from beit_data.masking import BlockMaskGenerator, mask_rng
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
from beit_data.shard_index import check_fingerprint
from beit_data.shard_rows import LoadedShard, SequentialReader, close_all, image_members, read_images_of, table_keys
from beit_data.shards import expand_shards
from beit_data.stream_config import StreamConfig
from beit_data.tokens import (
    VIEW_COLUMNS,
    WINDOW_COLUMNS,
    check_rows,
    read_consistent_footers,
    read_table,
    token_files,
    token_paths,
)
from beit_data.views import stable_rng

__all__ = ["StreamConfig", "ReplaySource", "OUTPUTS", "PlannedBatch", "pair_token_files"]

# What one iteration yields, in this order.
OUTPUTS = ("encoded", "roi", "flips", "jitter", "tokens", "mask", "key", "rejected")
_RAGGED = ("encoded", "key")


def pair_token_files(spec: str, tokens: str, *, skip_missing: bool = False, held_out: bool = False
                     ) -> tuple[list[Location], list[Location], list[tuple[dict, int]], list[Location]]:
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
    storage.map_concurrently(lambda s: check_fingerprint(s[0], s[1][0].get("shard"), s[2], full=False),
                             list(zip(shards, footers, paths)))
    return shards, paths, footers, missing


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

    Shards may be local files or objects (a batch's images read by range requests at once);
    ``pipe:`` shards cannot seek, so each is read from its start (``sequential``).
    """

    cfg: StreamConfig
    shards: list[Location]
    token_files: list[Location]
    images_per_shard: list[int]
    views: int
    grid: int
    target_jitter: bool
    jitter: float
    rank: int = 0
    world_size: int = 1
    start: tuple[int, int] = (0, 0)
    missing: list[Location] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    fingerprints: list[dict] = field(default_factory=list)  # of each shard, as its token file records it
    etags: list[str | None] = field(default_factory=list)  # of each object when the run started
    bytes_read: int = field(default=0, compare=False)
    _counted: set = field(default_factory=set, repr=False, compare=False)
    _checked: set = field(default_factory=set, repr=False, compare=False)  # token files whose rows were checked
    OUTPUTS: ClassVar[tuple[str, ...]] = OUTPUTS

    @classmethod
    def open(cls, cfg: StreamConfig, *, rank: int = 0, world_size: int = 1) -> ReplaySource:
        """Pair each shard with its token file and check them (``pair_token_files``).

        Raises:
            BeitDataError: A shard without a token file (unless ``skip_missing``), token files
                from different tokenizers or recipes, or that are not sound, or a shard that
                has changed since it was tokenized.
        """
        shards, paths, footers, missing = pair_token_files(cfg.shards, cfg.tokens, skip_missing=cfg.skip_missing)
        metas = [m for m, _ in footers]
        meta, views = metas[0], metas[0]["views"]
        return cls(cfg=cfg, shards=shards, token_files=paths, missing=missing, meta=meta,
                   fingerprints=[m["shard"] for m in metas],
                   etags=[storage.stat(s, fresh=False)["etag"] for s in shards],
                   images_per_shard=[rows // views["views"] for _, rows in footers],
                   views=views["views"], grid=meta["tokenizer"]["grid"], target_jitter=views["target_jitter"],
                   jitter=views["jitter"], rank=rank, world_size=world_size)

    @cached_property
    def spec(self) -> OrderSpec:
        """What fixes the order: the same on any number of ranks (but for ``dealt`` runs)."""
        return OrderSpec(seed=self.cfg.seed, global_batch=self.cfg.global_batch(self.world_size),
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
        windows = ((epoch, window, [self._load(i, epoch, read=read) for i in window.shards], lo, hi)
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

    # ---- loading ------------------------------------------------------------------------

    def _load(self, index: int, epoch: int, *, read: bool) -> LoadedShard:
        """A shard's keys and picked views for ``epoch``; with ``read``, also their rows and
        image offsets, and the shard opened for reading."""
        path = self.token_files[index]
        table = read_table(path, columns=None if read else ["key"])
        keys = table_keys(table, self.views, path)
        if read and index not in self._checked:  # once per process: the windows, which need the rows
            check_rows(table.select(WINDOW_COLUMNS), self.meta, path)
            self._checked.add(index)
        seeds = (self.cfg.seed,) if self.cfg.shared_draws else (self.cfg.seed, "view")
        picks = np.array([stable_rng(*seeds, epoch, k).integers(self.views) for k in keys], np.int64)
        shard = LoadedShard(keys, picks)
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
        if not location.seekable:
            shard.reader = SequentialReader(location, keys, path)
            return shard
        shard.images, shard.rejected = self._offsets(index, keys)
        shard.file = RangeFile.open(location, self.etags[index])  # closed when its window is done
        return shard

    def _offsets(self, index: int, keys: list[str]) -> tuple[list, int]:
        """Each key's image (offset, size) in the shard, and how many shard keys have no tokens."""
        members = image_members(self.shards[index], keys, token_file=self.token_files[index],
                                fingerprint=self.fingerprints[index], etag=self.etags[index])
        rejected = 0
        if index not in self._counted:  # once per process, not once per epoch
            self._counted.add(index)
            rejected = len(set(members) - set(keys))
        return [members[k][:2] for k in keys], rejected

    def _read(self, picked: list[tuple[int, LoadedShard, int]]) -> list[np.ndarray]:
        images = read_images_of(picked)
        self.bytes_read += sum(len(d) for d in images)
        return [np.frombuffer(d, np.uint8) for d in images]

    # ---- batches ------------------------------------------------------------------------

    def _item(self, masker: BlockMaskGenerator, image: np.ndarray, epoch: int, shard: LoadedShard, i: int
              ) -> list[np.ndarray]:
        """One row of ``OUTPUTS``: the picked view's window and tokens, fresh jitter where the
        tokens have none, and the mask (``mask_rng``)."""
        key, rows = shard.keys[i], shard.rows
        rng = mask_rng(self.cfg.seed, epoch, key)
        if self.cfg.shared_draws:  # the view was picked by the mask's generator, first
            rng.integers(self.views)
        if self.target_jitter:
            jitter = np.array([[rows["brightness"][i], rows["contrast"][i], rows["saturation"][i]]], np.float32)
        else:
            fresh = rng if self.cfg.shared_draws else stable_rng(self.cfg.seed, "jitter", epoch, key)
            jitter = fresh.uniform(1 - self.jitter, 1 + self.jitter, size=(1, 3)).astype(np.float32)
        x, y, w, h = (int(rows[c][i]) for c in ("x", "y", "w", "h"))
        rejected, shard.rejected = shard.rejected, 0
        return [image, np.array([[x, y, x + w, y + h]], np.float32),
                np.array([rows["flip"][i]], np.int32), jitter, rows["tokens"][i].astype(np.int64),
                masker(rng).reshape(-1), np.frombuffer(key.encode(), np.uint8), np.array([rejected], np.int32)]

    def __iter__(self) -> Iterator[tuple[list[np.ndarray] | np.ndarray, ...]]:
        """One tuple per micro-batch with each of ``OUTPUTS``: a list of per-sample arrays for the
        encoded images and keys, a dense (B, ...) array for the rest."""
        if multiprocessing.parent_process() is not None:
            outlive_job_signals()
        masker = BlockMaskGenerator((self.grid, self.grid), self.cfg.num_masked, self.cfg.min_block)
        done: list[LoadedShard] = []
        size = self.cfg.batch_size
        try:
            with closing(self._picked(read=True, done=done)) as steps:
                for _, step in steps:
                    for i in range(0, len(step), size):  # the step's micro-batches
                        picked = step[i:i + size]
                        rows = [self._item(masker, image, *p) for image, p in zip(self._read(picked), picked)]
                        if i + size >= len(step):  # the windows this step finished: their last images are read
                            close_all(done)
                        # Same-shape outputs go as one dense array: DALI's per-sample hand-over costs Python time.
                        yield tuple(list(column) if name in _RAGGED else np.stack(column)
                                    for name, column in zip(self.OUTPUTS, zip(*rows)))
        finally:
            close_all(done)

    def shard_keys(self, index: int) -> list[str]:
        """The keys training reads of shard ``index``."""
        return read_table(self.token_files[index], columns=["key"]).column("key").unique().to_pylist()

    def for_rank(self, rank: int) -> ReplaySource:
        """The same source as another rank sees it."""
        return self._fresh(rank=rank)

    def at(self, epoch: int, step: int) -> ReplaySource:
        """The same source, starting at ``(epoch, step)``."""
        return self._fresh(start=(epoch, step))

    def _fresh(self, **changes) -> ReplaySource:
        """A copy with ``changes`` that has read nothing yet."""
        return replace(self, bytes_read=0, _counted=set(), _checked=set(), **changes)
