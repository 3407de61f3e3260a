"""The training order: which tokenized sample each global step reads, and which rank reads it.

Everything here is a pure function of the shards' sample counts and an ``OrderSpec`` (seed,
global batch, partitions, shards per window); nothing reads an image. The stream and
``beit-data plan`` both walk this order, so the plan is the stream's order, not a copy of it.
The world size is not part of it: it only decides which rank reads which part of a step.

For each epoch:

1. The shards are permuted from ``(seed, epoch)``. Their samples, shard after shard in that
   order, form one sequence of N samples. The epoch has ``S = N // G`` global steps of G
   samples; the last ``N - S*G`` samples of the sequence (fewer than one global batch) are
   left out of this epoch, and the next epoch's permutation leaves out others.
2. The first ``S*G`` samples are cut into P partitions of consecutive samples. Partition
   ``p`` gives ``g_p`` samples to every step (``G // P``, one more for the first ``G % P``),
   so it holds ``S * g_p``: a run of whole shards, with a piece of a shard at either end.
3. A partition reads its pieces in windows of ``mix_shards`` pieces. The samples of a window
   are permuted as a whole from ``(seed, epoch, partition, window)`` and read in that order.
4. Global step ``s`` is samples ``s*g_p .. (s+1)*g_p`` of each partition, partition after
   partition. Rank ``r`` of W reads positions ``r*G/W .. (r+1)*G/W`` of it: P/W whole
   partitions when W divides P, a slice of one partition when P divides W.

So a step holds the same samples on any number of ranks, and a run can resume on another.
Resuming at ``(epoch, step)`` skips whole windows by their counts and permutes only the one
it lands in, so it reads nothing of the samples before the position.

The stream and the plan walk the order alike: ``partition_spans`` gives each partition's windows,
epoch after epoch, and ``take_batches`` cuts a rank's batches from its partitions' samples.

Steps 1 and 2 are ``partition_layout``, the layout of every new run. A run started with an
earlier order keeps it: its ``OrderSpec.layout`` is the one its version had
(``beit_data.old_orders``), and the rest of the walk is the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np

from beit_common import BeitDataError
from beit_data.stream_config import MIX_SHARDS, PARTITIONS
from beit_data.views import stable_rng

__all__ = ["MIX_SHARDS", "PARTITIONS", "OrderSpec", "Piece", "Layout", "LayoutFn", "partition_layout", "epoch_layout",
           "rank_slices", "check_steps", "left_out_note", "Window", "PlannedBatch", "partition_windows",
           "partition_spans", "take_batches", "steps_from"]


T = TypeVar("T")


@dataclass(frozen=True)
class Piece:
    """Samples ``lo .. hi`` of shard ``shard``."""

    shard: int
    lo: int
    hi: int


@dataclass(frozen=True)
class Layout:
    """One epoch: its steps and the pieces of each partition.

    Attributes:
        steps: Global steps of the epoch.
        pieces: The pieces each partition reads, in order.
        samples: Tokenized samples of all shards.
        used: Samples the steps read (``steps * G``); the rest are left out of the epoch.
    """

    steps: int
    pieces: tuple[tuple[Piece, ...], ...]
    samples: int
    used: int

    @property
    def left_out(self) -> int:
        return self.samples - self.used

    def too_few(self, spec: OrderSpec, epoch: int) -> str:
        """Why ``epoch`` has no step though the shards hold images, and what would help."""
        return (f"the shards hold {self.samples} tokenized images, fewer than one global batch of "
                f"{spec.global_batch}; lower `batch_size` or tokenize more shards")

    def why_left_out(self, spec: OrderSpec) -> str:
        """Why some images are left out of each epoch."""
        return (f"an epoch is {self.steps:,} global steps of {spec.global_batch:,} images, and the rest are fewer "
                "than one more step (the next epoch leaves out others); a smaller batch leaves out fewer")


def _cut(counts: Sequence[int], order: Sequence[int], bounds: Sequence[int]) -> list[tuple[Piece, ...]]:
    """The sequence of the shards' samples in ``order``, cut at ``bounds`` (sample positions)."""
    parts: list[list[Piece]] = [[] for _ in range(len(bounds) - 1)]
    start, p = 0, 0
    for shard in order:
        end = start + counts[shard]
        while p < len(parts) and start < end:
            lo, hi = max(start, bounds[p]), min(end, bounds[p + 1])
            if lo < hi:
                parts[p].append(Piece(int(shard), lo - start, hi - start))
            if end < bounds[p + 1]:
                break
            p += 1
        start = end
    return [tuple(part) for part in parts]


@lru_cache(maxsize=64)
def partition_layout(counts: tuple[int, ...], spec: OrderSpec, epoch: int) -> Layout:
    """The steps and partitions of ``epoch`` (steps 1 and 2 above): ``S = N // G`` steps, and the
    shards' samples in their permutation cut into partitions of ``S * g_p`` samples."""
    order = stable_rng(spec.seed, "shards", epoch).permutation(len(counts))
    samples = sum(counts)
    steps = samples // spec.global_batch
    bounds = np.concatenate([[0], np.cumsum(spec.shares)]) * steps
    return Layout(steps, tuple(_cut(counts, order, [int(b) for b in bounds])), samples, steps * spec.global_batch)


# An order's layout of one epoch: ``(counts, spec, epoch) -> Layout``, cached (its arguments hashable).
LayoutFn = Callable[[tuple[int, ...], "OrderSpec", int], Layout]


@dataclass(frozen=True, kw_only=True)
class OrderSpec:
    """What fixes the order of every epoch.

    Attributes:
        seed: Seed of the shard permutations and the windows' orders.
        global_batch: Samples of one step, over all ranks (G).
        partitions: Partitions of the epoch (P); at most G are used.
        mix_shards: Pieces of shards a partition reads at once, their samples permuted together.
        sequential: Shards that can only be read from their start (``pipe:`` commands): each
            window is one piece, read in its own order; only the shard order mixes.
        layout: How an epoch's shards are laid out in its steps and partitions
            (``partition_layout``; runs from before keep theirs: ``beit_data.old_orders``).
    """

    seed: int
    global_batch: int
    partitions: int = PARTITIONS
    mix_shards: int = MIX_SHARDS
    sequential: bool = False
    layout: LayoutFn = partition_layout

    def __post_init__(self):
        if min(self.global_batch, self.partitions, self.mix_shards) < 1:
            raise BeitDataError("`batch_size`, `partitions` and `mix_shards` must be at least 1")

    @property
    def shares(self) -> tuple[int, ...]:
        """Samples each partition gives to every step."""
        parts = min(self.partitions, self.global_batch)
        return tuple(self.global_batch // parts + (p < self.global_batch % parts) for p in range(parts))

    @property
    def window(self) -> int:
        return 1 if self.sequential else self.mix_shards


def epoch_layout(counts: Sequence[int], spec: OrderSpec, epoch: int) -> Layout:
    """The steps and partitions of ``epoch``, as ``spec.layout`` lays them out.

    Args:
        counts: Tokenized samples of each shard.
    """
    return spec.layout(tuple(int(c) for c in counts), spec, epoch)


def rank_slices(spec: OrderSpec, world_size: int, rank: int) -> list[tuple[int, int, int]]:
    """What rank ``rank`` of ``world_size`` reads of each step: ``(partition, lo, hi)``, samples
    ``lo .. hi`` of what that partition gives the step, partition after partition."""
    if spec.global_batch % world_size:
        raise BeitDataError(f"a global batch of {spec.global_batch} does not split over {world_size} ranks; "
                            "choose a `batch_size` it divides")
    per_rank = spec.global_batch // world_size
    first, last = rank * per_rank, (rank + 1) * per_rank
    slices, start = [], 0
    for p, share in enumerate(spec.shares):
        lo, hi = max(first, start), min(last, start + share)
        if lo < hi:
            slices.append((p, lo - start, hi - start))
        start += share
    return slices


def check_steps(layout: Layout, spec: OrderSpec, epoch: int) -> int:
    """The epoch's steps; an epoch without one is refused, saying what would help."""
    if layout.steps:
        return layout.steps
    if not layout.samples:
        raise BeitDataError("the shards hold no tokenized image (every sample was rejected); no batch size helps")
    raise BeitDataError(layout.too_few(spec, epoch))


LEFT_OUT_NOTE = 0.02  # a share of the images left out of each epoch worth saying


def left_out_note(layout: Layout, spec: OrderSpec) -> str | None:
    """One line on the images each epoch leaves out, where they are more than ``LEFT_OUT_NOTE``."""
    if not layout.samples or layout.left_out <= LEFT_OUT_NOTE * layout.samples:
        return None
    return (f"each epoch leaves out {layout.left_out:,} of {layout.samples:,} tokenized images "
            f"({100 * layout.left_out / layout.samples:.1f}%): {layout.why_left_out(spec)}")


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
