"""Walking the order (``beit_data.order``): the windows of a partition, epoch after epoch, and the
batches of a rank taken from its partitions' samples. The stream and the plan walk it alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np

from beit_data.order import Layout, OrderSpec, Piece, check_steps, epoch_layout, rank_slices
from beit_data.views import stable_rng

__all__ = ["Window", "PlannedBatch", "partition_windows", "partition_spans", "take_batches", "steps_from",
           "rank_batches"]

T = TypeVar("T")


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


@dataclass(frozen=True)
class Window:
    """Pieces a partition reads together, and the order of their samples.

    Attributes:
        index: Position of the window in the partition's epoch.
        shards: Shard index of each piece (a partition holds at most one piece of a shard).
        start: Samples of the partition's epoch before this window.
        shard_of: For each sample in reading order, its piece's position in ``shards``.
        sample_of: For each sample in reading order, its index within its shard.
    """

    index: int
    shards: tuple[int, ...]
    start: int
    shard_of: np.ndarray
    sample_of: np.ndarray

    def __len__(self) -> int:
        return len(self.shard_of)


def _window(index: int, pieces: Sequence[Piece], start: int, rng: np.random.Generator | None) -> Window:
    sizes = [p.hi - p.lo for p in pieces]
    shard_of = np.repeat(np.arange(len(pieces), dtype=np.int32), sizes)
    sample_of = np.concatenate([np.arange(p.lo, p.hi, dtype=np.int32) for p in pieces])
    if rng is not None:
        perm = rng.permutation(len(shard_of))
        shard_of, sample_of = shard_of[perm], sample_of[perm]
    return Window(index, tuple(p.shard for p in pieces), start, shard_of, sample_of)


def partition_windows(layout: Layout, spec: OrderSpec, epoch: int, partition: int, skip: int = 0
                      ) -> Iterator[Window]:
    """The windows of ``partition`` in ``epoch``, from the one that holds its sample ``skip`` on.

    Windows before ``skip`` are passed over by their counts alone; they are never permuted.
    """
    pieces, size = layout.pieces[partition], spec.window
    start = 0
    for w, first in enumerate(range(0, len(pieces), size)):
        chosen = pieces[first:first + size]
        count = sum(p.hi - p.lo for p in chosen)
        if start + count > skip:
            rng = None if spec.sequential else stable_rng(spec.seed, "mix", epoch, partition, w)
            yield _window(w, chosen, start, rng)
        start += count


def partition_spans(counts: Sequence[int], spec: OrderSpec, partition: int, start: tuple[int, int]
                    ) -> Iterator[tuple[int, Window, int, int]]:
    """From global step ``start = (epoch, step)`` on, forever: each window of ``partition`` with
    its epoch and the part of it (``lo .. hi``) that the epoch's steps read."""
    epoch, step = start
    share = spec.shares[partition]
    while True:
        layout = epoch_layout(counts, spec, epoch)
        limit, skip = layout.steps * share, step * share
        for window in partition_windows(layout, spec, epoch, partition, skip):
            if window.start >= limit:
                break
            yield epoch, window, max(skip - window.start, 0), min(len(window), limit - window.start)
        epoch, step = epoch + 1, 0


def take_batches(streams: dict[int, Iterator[T]], slices: Sequence[tuple[int, int, int]],
                 shares: Sequence[int]) -> Iterator[list[T]]:
    """The batches of one rank, forever, from each partition's samples in order: of every step's
    ``shares[p]`` samples of partition ``p`` it keeps ``lo .. hi`` and passes over the rest."""
    while True:
        batch: list[T] = []
        for p, lo, hi in slices:
            stream = streams[p]
            for j in range(shares[p]):
                item = next(stream)
                if lo <= j < hi:
                    batch.append(item)
        yield batch


def steps_from(start: tuple[int, int], steps_of: Callable[[int], int]) -> Iterator[tuple[int, int]]:
    """``(epoch, step)`` of every global step from ``start`` on, forever; ``steps_of(epoch)``
    must raise for an epoch without steps."""
    epoch, step = start
    while True:
        yield from ((epoch, s) for s in range(step, steps_of(epoch)))
        epoch, step = epoch + 1, 0


def rank_batches(counts: Sequence[int], spec: OrderSpec, *, world_size: int, rank: int,
                 start: tuple[int, int] = (0, 0)) -> Iterator[tuple[int, int, list[tuple[int, int]]]]:
    """``(epoch, step, [(shard, sample), ...])`` of each step of ``rank`` from ``start`` on,
    forever: the order alone, as the stream reads it."""
    slices = rank_slices(spec, world_size, rank)

    def samples(p: int) -> Iterator[tuple[int, int]]:
        for _, window, lo, hi in partition_spans(counts, spec, p, start):
            for j in range(lo, hi):
                yield window.shards[window.shard_of[j]], int(window.sample_of[j])

    positions = steps_from(start, lambda e: check_steps(epoch_layout(counts, spec, e), spec, e))
    streams = {p: samples(p) for p, _, _ in slices}
    for (epoch, step), batch in zip(positions, take_batches(streams, slices, spec.shares)):
        yield epoch, step, batch
