"""The Python half of the training stream: which samples, views, tokens and masks make a batch.

``ReplaySource`` is iterated by a DALI parallel external source in a worker process, so tar
reading, the Parquet join, view picking and mask drawing never hold the training process's
GIL. It imports only numpy and pyarrow, so a spawned worker starts without torch.

For each epoch the shard order is a permutation drawn from ``(seed, epoch)`` and shard ``i``
of it goes to rank ``i % world_size``. Within a shard, samples are joined to their rows by
key and one stored view is picked from ``(seed, epoch, key)``; the same generator draws fresh
jitter (for tokens made with ``--no-target-jitter``) and the block mask. Every rank takes the
same number of steps per epoch: the smallest number of full batches any rank can make, known
on every rank from the Parquet row counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq

from beit_common import BeitDataError
from beit_data.masking import BlockMaskGenerator
from beit_data.shards import iter_samples
from beit_data.tokens import VIEW_COLUMNS
from beit_data.views import stable_rng

__all__ = ["StreamConfig", "ReplaySource", "OUTPUTS"]

# What one iteration yields, in this order.
OUTPUTS = ("encoded", "roi", "flips", "jitter", "tokens", "mask", "key", "rejected")
_RAGGED = ("encoded", "key")


@dataclass(frozen=True, kw_only=True)
class StreamConfig:
    shards: str
    tokens: str
    batch_size: int
    seed: int = 0
    image_size: int = 224
    num_masked: int = 75
    min_block: int = 16
    skip_missing: bool = False
    num_threads: int = 4
    # Control experiment only: pair every image with another image's tokens.
    shuffle_targets: bool = False


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
    _steps: dict = field(default_factory=dict, repr=False, compare=False)

    def shard_order(self, epoch: int) -> list[int]:
        """Indices of this rank's shards for ``epoch``."""
        order = stable_rng(self.cfg.seed, "shards", epoch).permutation(len(self.shards))
        return [int(i) for i in order[self.rank :: self.world_size]]

    def steps_per_epoch(self, epoch: int) -> int:
        """Full batches every rank can make in ``epoch``: the same number on each rank."""
        if epoch not in self._steps:
            order = stable_rng(self.cfg.seed, "shards", epoch).permutation(len(self.shards))
            per_rank = [sum(self.images_per_shard[i] for i in order[r :: self.world_size])
                        for r in range(self.world_size)]
            self._steps[epoch] = min(per_rank) // self.cfg.batch_size
        return self._steps[epoch]

    def positions(self) -> Iterator[tuple[int, int]]:
        """``(epoch, step)`` of each batch this source yields, in order."""
        epoch, step = self.start
        while True:
            if self.steps_per_epoch(epoch) == 0:
                raise BeitDataError(f"epoch {epoch} has fewer images per rank than one batch of "
                                    f"{self.cfg.batch_size}; lower `batch_size`")
            yield from ((epoch, s) for s in range(step, self.steps_per_epoch(epoch)))
            epoch, step = epoch + 1, 0

    def _rows(self, index: int) -> tuple[dict[str, int], dict]:
        table = pq.read_table(self.token_files[index])
        first: dict[str, int] = {}
        for i, k in enumerate(table.column("key").to_pylist()):
            first.setdefault(k, i)
        cols = {name: table.column(name).to_numpy(zero_copy_only=False) for name in VIEW_COLUMNS}
        cols["tokens"] = table.column("tokens").combine_chunks().flatten().to_numpy().reshape(-1, self.grid ** 2)
        if self.cfg.shuffle_targets:
            perm = stable_rng(self.cfg.seed, "shuffle-targets", index).permutation(len(first))
            starts = list(first.values())
            swapped = np.concatenate([np.arange(starts[j], starts[j] + self.views) for j in perm])
            cols["tokens"] = cols["tokens"][swapped]
        return first, cols

    def _item(self, masker: BlockMaskGenerator, epoch: int, key: str, start: int, cols: dict) -> tuple:
        """roi, flip, jitter, tokens and mask of ``key`` in ``epoch``: one generator from (seed, epoch, key)."""
        rng = stable_rng(self.cfg.seed, epoch, key)
        r = start + int(rng.integers(self.views))
        if self.target_jitter:
            jitter = np.array([[cols["brightness"][r], cols["contrast"][r], cols["saturation"][r]]], np.float32)
        else:
            jitter = rng.uniform(1 - self.jitter, 1 + self.jitter, size=(1, 3)).astype(np.float32)
        x, y, w, h = (int(cols[c][r]) for c in ("x", "y", "w", "h"))
        return (np.array([[x, y, x + w, y + h]], np.float32), np.array([cols["flip"][r]], np.int32), jitter,
                cols["tokens"][r].astype(np.int64), masker(rng).reshape(-1))

    def _epoch_samples(self, epoch: int, skip: int) -> Iterator[list[np.ndarray]]:
        """One row of ``OUTPUTS`` per tokenized sample of this rank in ``epoch``, after ``skip`` of them.

        ``rejected`` counts the keys without Parquet rows (rejected at tokenize time) passed
        over since the previous sample.
        """
        masker = BlockMaskGenerator((self.grid, self.grid), self.cfg.num_masked, self.cfg.min_block)
        rejected = 0
        for index in self.shard_order(epoch):
            first, cols = self._rows(index)
            for sample in iter_samples(self.shards[index]):
                if sample.key not in first:
                    rejected += 1
                    continue
                if skip:
                    skip, rejected = skip - 1, 0
                    continue
                yield [np.frombuffer(sample.image, np.uint8),
                       *self._item(masker, epoch, sample.key, first[sample.key], cols),
                       np.frombuffer(sample.key.encode(), np.uint8), np.array([rejected], np.int32)]
                rejected = 0

    def __iter__(self) -> Iterator[tuple[list[np.ndarray] | np.ndarray, ...]]:
        """One tuple per batch with each of ``OUTPUTS``: a list of per-sample arrays for the
        encoded images and keys, a dense (B, ...) array for the rest."""
        samples, current = None, None
        for epoch, step in self.positions():
            if epoch != current:
                samples, current = self._epoch_samples(epoch, skip=step * self.cfg.batch_size), epoch
            rows = [next(samples, None) for _ in range(self.cfg.batch_size)]
            if rows[-1] is None:
                raise BeitDataError(f"epoch {epoch} ran out of samples at step {step}: the shards hold fewer "
                                    "tokenized samples than their Parquet files count; were they rewritten?")
            # Same-shape outputs go as one dense array: DALI's per-sample hand-over costs Python time.
            yield tuple(list(column) if name in _RAGGED else np.stack(column)
                        for name, column in zip(OUTPUTS, zip(*rows)))
