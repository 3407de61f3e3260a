"""The training order: which tokenized sample each rank reads at each step of each epoch.

Everything here is a pure function of the shards' sample counts and ``(seed, epoch, rank)``;
nothing reads an image. The stream and ``beit-data plan`` both walk this order, so the plan
is the stream's order, not a copy of it.

For each epoch:

1. The shards are permuted from ``(seed, epoch)``; shard ``i`` of that permutation goes to
   rank ``i % world_size``, so ranks are disjoint.
2. A rank reads its shards in windows of ``mix_shards`` consecutive shards. The samples of a
   window (all of them, across its shards) are permuted as a whole from
   ``(seed, epoch, rank, window)`` and read in that order, by their offsets in the shards.
3. Batch ``s`` is samples ``s*B .. (s+1)*B`` of that sequence. Every rank takes the same
   number of steps, the smallest number of full batches any rank can make; a rank's samples
   past it are left out of that epoch (the next epoch deals and permutes anew). With shards
   that do not divide evenly among the ranks, that is up to about one shard per rank.

Resuming at ``(epoch, step)`` skips whole windows by their counts and permutes only the one
it lands in, so it reads nothing of the samples before the position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from beit_data.views import stable_rng

__all__ = ["MIX_SHARDS", "rank_shards", "steps_per_epoch", "Window", "epoch_windows"]

MIX_SHARDS = 16  # shards a rank reads at once, by default


def rank_shards(num_shards: int, *, seed: int, epoch: int, rank: int, world_size: int) -> list[int]:
    """Indices of the shards ``rank`` reads in ``epoch``, in reading order."""
    order = stable_rng(seed, "shards", epoch).permutation(num_shards)
    return [int(i) for i in order[rank::world_size]]


def steps_per_epoch(counts: Sequence[int], *, seed: int, epoch: int, world_size: int, batch_size: int) -> int:
    """Full batches every rank can make in ``epoch``: the same number on each rank.

    Args:
        counts: Tokenized samples of each shard.
    """
    order = stable_rng(seed, "shards", epoch).permutation(len(counts))
    per_rank = [sum(counts[i] for i in order[r::world_size]) for r in range(world_size)]
    return min(per_rank) // batch_size


@dataclass(frozen=True)
class Window:
    """Shards a rank reads together, and the order of their samples.

    Attributes:
        index: Position of the window in the rank's epoch.
        shards: Shard indices (into the full shard list).
        start: Samples of the epoch before this window.
        shard_of: For each sample in reading order, its shard's position in ``shards``.
        sample_of: For each sample in reading order, its index within its shard.
    """

    index: int
    shards: tuple[int, ...]
    start: int
    shard_of: np.ndarray
    sample_of: np.ndarray

    def __len__(self) -> int:
        return len(self.shard_of)


def _window_order(counts: Sequence[int], rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    shard_of = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    sample_of = np.concatenate([np.arange(c, dtype=np.int32) for c in counts]) if counts else shard_of
    if rng is None:
        return shard_of, sample_of
    perm = rng.permutation(len(shard_of))
    return shard_of[perm], sample_of[perm]


def epoch_windows(counts: Sequence[int], *, seed: int, epoch: int, rank: int, world_size: int,
                  mix_shards: int = MIX_SHARDS, skip: int = 0, sequential: bool = False) -> Iterator[Window]:
    """The windows ``rank`` reads in ``epoch``, from the one that holds sample ``skip`` on.

    Windows before ``skip`` are passed over by their counts alone; they are never permuted.
    With ``sequential`` (shards that can only be read from the start, such as ``pipe:``
    commands), each window is one shard, read in its own order: only the shard order mixes.
    """
    if sequential:
        mix_shards = 1
    mine = rank_shards(len(counts), seed=seed, epoch=epoch, rank=rank, world_size=world_size)
    start = 0
    for w, first in enumerate(range(0, len(mine), mix_shards)):
        shards = tuple(mine[first:first + mix_shards])
        size = sum(counts[i] for i in shards)
        if start + size > skip:
            rng = None if sequential else stable_rng(seed, "mix", epoch, rank, w)
            shard_of, sample_of = _window_order([counts[i] for i in shards], rng)
            yield Window(w, shards, start, shard_of, sample_of)
        start += size
