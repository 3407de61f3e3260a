"""The training stream: shards joined to their token Parquet rows, replayed through DALI.

For each epoch the shard order is a permutation drawn from ``(seed, epoch)`` and shard ``i``
of it goes to rank ``i % world_size``. Within a shard, samples are joined to their rows by
key, one stored view is picked from ``(seed, epoch, key)``, and DALI decodes exactly that
crop (ROI decode), resizes it to the model's input with bicubic, replays the stored jitter
(or draws fresh jitter for tokens made with ``--no-target-jitter``), flips it and normalises
it with the ImageNet mean and std. The block mask comes from ``(seed, epoch, key)``.

Every rank takes the same number of steps per epoch: the smallest number of full batches
any rank can make that epoch, known on every rank from the Parquet row counts. The stream's
state is ``(epoch, step)``, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq
import torch

from beit_data import BeitDataError
from beit_data.dali_views import IMAGENET_MEAN, IMAGENET_STD, DaliViews, ViewGraph
from beit_data.masking import BlockMaskGenerator
from beit_data.prefetch import prefetch
from beit_data.shards import expand_shards, iter_samples
from beit_data.tokens import describe_mismatch, read_meta, recipe_signature, token_path
from beit_data.views import View, stable_rng

__all__ = ["StreamConfig", "TrainStream", "Batch"]


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


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, S, S)
    tokens: torch.Tensor  # (B, grid*grid) int64
    mask: torch.Tensor  # (B, grid*grid) bool
    epoch: int
    step: int  # within the epoch, counting from 0
    keys: list[str] = field(default_factory=list)


class TrainStream:
    """Batches for one rank; ``batches(epoch, step)`` starts anywhere, exactly.

    Args:
        cfg: Stream settings.
        rank, world_size: This process's place among the ranks.
        device: Where the batches go.
    """

    def __init__(self, cfg: StreamConfig, *, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu"):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = torch.device(device)
        self.missing: list[str] = []
        self.shards, self.token_files = [], []
        for shard in expand_shards(cfg.shards):
            path = token_path(cfg.tokens, shard)
            if path.exists():
                self.shards.append(shard)
                self.token_files.append(path)
            elif cfg.skip_missing:
                self.missing.append(str(shard))
            else:
                raise BeitDataError(f"no token file for shard {shard} (expected {path}); "
                                    "tokenize it or pass --skip-missing")
        if not self.shards:
            raise BeitDataError(f"none of the shards has a token file in {cfg.tokens}")
        self.meta = read_meta(self.token_files[0])
        for path in self.token_files[1:]:
            other = read_meta(path)
            if recipe_signature(other) != recipe_signature(self.meta):
                raise BeitDataError(f"{path} and {self.token_files[0]} come from different tokenizers or recipes: "
                                    f"{describe_mismatch(recipe_signature(other), recipe_signature(self.meta))}")
        self.grid = self.meta["tokenizer"]["grid"]
        self.vocab = self.meta["tokenizer"]["vocab"]
        self.views = self.meta["views"]["views"]
        self.target_jitter = self.meta["views"]["target_jitter"]
        self.jitter = self.meta["views"]["jitter"]
        self.images_per_shard = [pq.ParquetFile(p).metadata.num_rows // self.views for p in self.token_files]
        self.masker = BlockMaskGenerator((self.grid, self.grid), cfg.num_masked, cfg.min_block)
        self.replay = DaliViews(
            ViewGraph(views=1, size=cfg.image_size, interp="bicubic", jitter=True, mean=IMAGENET_MEAN,
                      std=IMAGENET_STD, half=True, roi_decode=True),
            batch_size=cfg.batch_size, device=self.device, num_threads=cfg.num_threads)
        self.skipped_rejected = 0

    def shard_order(self, epoch: int) -> list[int]:
        """Indices of this rank's shards for ``epoch``."""
        order = stable_rng(self.cfg.seed, "shards", epoch).permutation(len(self.shards))
        return [int(i) for i in order[self.rank :: self.world_size]]

    @functools.lru_cache(maxsize=8)  # noqa: B019 (the stream lives as long as the run)
    def steps_per_epoch(self, epoch: int) -> int:
        """Full batches every rank can make in ``epoch``: the same number on each rank.

        Cached: the trainer asks every step, and the answer sums over every shard.
        """
        order = stable_rng(self.cfg.seed, "shards", epoch).permutation(len(self.shards))
        per_rank = [sum(self.images_per_shard[i] for i in order[r :: self.world_size])
                    for r in range(self.world_size)]
        return min(per_rank) // self.cfg.batch_size

    def _rows(self, index: int) -> tuple[dict[str, int], dict]:
        table = pq.read_table(self.token_files[index])
        keys = table.column("key").to_pylist()
        first = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        cols = {name: table.column(name).to_numpy(zero_copy_only=False)
                for name in ("view", "x", "y", "w", "h", "flip", "brightness", "contrast", "saturation")}
        cols["tokens"] = table.column("tokens").combine_chunks().flatten().to_numpy().reshape(-1, self.grid ** 2)
        if self.cfg.shuffle_targets:
            perm = stable_rng(self.cfg.seed, "shuffle-targets", index).permutation(len(first))
            starts = list(first.values())
            swapped = np.concatenate([np.arange(starts[j], starts[j] + self.views) for j in perm])
            cols["tokens"] = cols["tokens"][swapped]
        return first, cols

    def _item(self, epoch: int, key: str, start: int, cols: dict):
        """The view, tokens and mask of ``key`` in ``epoch``: one generator from (seed, epoch, key)."""
        rng = stable_rng(self.cfg.seed, epoch, key)
        r = start + int(rng.integers(self.views))
        if self.target_jitter:
            jitter = (float(cols["brightness"][r]), float(cols["contrast"][r]), float(cols["saturation"][r]))
        else:
            jitter = tuple(float(x) for x in rng.uniform(1 - self.jitter, 1 + self.jitter, size=3))
        view = View(int(cols["x"][r]), int(cols["y"][r]), int(cols["w"][r]), int(cols["h"][r]),
                    bool(cols["flip"][r]), *jitter)
        return view, cols["tokens"][r], self.masker(rng).reshape(-1)

    def _epoch_items(self, epoch: int, skip: int):
        """(key, image bytes, view, tokens, mask) for this rank's samples, after ``skip`` of them."""
        for index in self.shard_order(epoch):
            first, cols = self._rows(index)
            for sample in iter_samples(self.shards[index]):
                if sample.key not in first:
                    self.skipped_rejected += 1
                    continue
                if skip:
                    skip -= 1
                    continue
                yield (sample.key, sample.image, *self._item(epoch, sample.key, first[sample.key], cols))

    def _epoch_chunks(self, epoch: int, step: int):
        """(step, items) per batch of ``epoch`` from ``step`` on: the Python half of the loading."""
        B = self.cfg.batch_size
        items = self._epoch_items(epoch, skip=step * B)
        for s in range(step, self.steps_per_epoch(epoch)):
            yield epoch, s, [next(items) for _ in range(B)]

    def _replay(self, chunks):
        """Batches decoded and augmented by DALI from prepared chunks."""
        for epoch, s, chunk in chunks:
            images = self.replay([c[1] for c in chunk], [[c[2]] for c in chunk])[:, 0]  # (B, 3, S, S)
            tokens = torch.from_numpy(np.stack([c[3] for c in chunk]).astype(np.int64))  # (B, N)
            mask = torch.from_numpy(np.stack([c[4] for c in chunk]))  # (B, N)
            if self.device.type == "cuda":
                # A copy from pageable memory waits for the GPU to drain; from pinned memory it does not.
                tokens, mask = tokens.pin_memory(), mask.pin_memory()
            yield Batch(images=images, tokens=tokens, mask=mask, epoch=epoch, step=s, keys=[c[0] for c in chunk])

    def batches(self, epoch: int = 0, step: int = 0, *, dtype: torch.dtype | None = None):
        """Batches on the device from ``(epoch, step)`` on, forever, prefetched in a thread."""
        def chunks():
            e, s = epoch, step
            while True:
                if self.steps_per_epoch(e) == 0:
                    raise BeitDataError(f"epoch {e} has fewer images per rank than one batch of "
                                        f"{self.cfg.batch_size}; lower --batch-size")
                yield from self._epoch_chunks(e, s)
                e, s = e + 1, 0

        # Two loader threads overlap: Python prepares the next chunk while DALI decodes this one.
        for batch in prefetch(self._replay(prefetch(chunks(), depth=2)), depth=3):
            batch.images = batch.images.to(self.device, dtype or batch.images.dtype, non_blocking=True)
            batch.tokens = batch.tokens.to(self.device, non_blocking=True)
            batch.mask = batch.mask.to(self.device, non_blocking=True)
            yield batch
