"""The training stream: shards joined to their token Parquet rows, replayed through DALI.

(With a tokenizer instead, the targets are online: a fresh view each epoch, tokenized in the
loop; see ``beit_data.online``.)

Which samples, views, tokens and masks make each batch is decided by ``ReplaySource`` (see
``beit_data.replay``), which DALI runs in a worker process of its own. DALI then decodes
exactly each stored crop (see ``model_view_spec``), resizes it to the model's input with bicubic, replays
the stored jitter (or draws fresh jitter for tokens made with ``--no-target-jitter``), flips
it and normalises it with the run's mean and std (ImageNet's by default). The stream's state
is ``(epoch, step)``, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from beit_common import BeitDataError
from beit_data.dali_views import DaliViews, UndecodableImage, ViewSpec, types
from beit_data.prefetch import prefetch
from beit_data.replay import ReplaySource
from beit_data.stream_config import IMAGENET_MEAN, IMAGENET_STD, StreamConfig
from beit_data.tokens import TokenMeta
from beit_data.views import ViewRecipe

__all__ = ["StreamConfig", "TrainStream", "Batch", "model_view_spec"]


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, S, S)
    tokens: torch.Tensor  # (B, grid*grid) int64
    mask: torch.Tensor  # (B, grid*grid) bool
    epoch: int
    step: int  # within the epoch, counting from 0
    keys: list[str] = field(default_factory=list)
    micro: int = 0  # which of the step's ``accum`` micro-batches
    accum: int = 1

    @property
    def ends_step(self) -> bool:
        return self.micro + 1 == self.accum


def model_view_spec(meta: TokenMeta, image_size: int, *, online: bool = False, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> ViewSpec:
    """The model's view of a stored view: bicubic, normalised by ``mean`` and ``std`` (the run's
    ``StreamConfig``'s), float16.

    Where the tokenizer saw that same view (BEiT v2: a bicubic view at the model's size), the
    image is decoded whole and the window resized exactly as tokenize did, so the model's
    pixels are the tokenizer's. Otherwise only the window is decoded (ROI decode), which is
    cheaper and differs from a whole decode by a few levels in the last bits. Online targets
    decode the whole image once for both views.
    """
    same = online or meta.views.interp == "bicubic" and meta.tokenizer.input_size == image_size
    return ViewSpec(views=1, size=image_size, interp="bicubic", jitter=True, mean=tuple(mean), std=tuple(std),
                    half=True, roi_decode=not same)


class TrainStream:
    """Batches for one rank; ``batches(epoch, step)`` starts anywhere, exactly.

    Args:
        cfg: Stream settings.
        rank, world_size: This process's place among the ranks.
        device: Where the batches go.
        tokenizer, recipe: For online targets (``cfg.targets``): the tokenizer run in the loop,
            and the recipe of its views.
        source: Stored targets' source opened already (its token footers read, with settings
            that ``cfg`` may complete); None opens it here.
    """

    def __init__(self, cfg: StreamConfig, *, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", tokenizer=None, recipe: ViewRecipe | None = None,
                 source: ReplaySource | None = None):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = torch.device(device)
        self.tokenizer, self.target = None, None
        if cfg.online:
            from beit_data.online import open_online

            if tokenizer is None or recipe is None:
                raise BeitDataError("online targets are tokenized in the loop: give TrainStream the tokenizer and "
                                    "the recipe of its views (pipelines.pretrain.online_tokenizer, "
                                    "pipelines.recipes.view_recipe)")

            self.source = open_online(cfg, recipe=recipe, tokenizer=tokenizer.describe(), rank=rank,
                                      world_size=world_size)
            self.tokenizer = tokenizer.eval().to(self.device)
            self.target = ViewSpec(size=tokenizer.input_size, interp=recipe.interp, jitter=recipe.target_jitter)
        elif source is not None:
            self.source = source.configured(cfg, rank=rank, world_size=world_size)
        else:
            self.source = ReplaySource.open(cfg, rank=rank, world_size=world_size)
        self.meta, self.missing = self.source.meta, self.source.missing
        self.shards = self.source.shards
        self.grid = self.meta.tokenizer.grid
        self.vocab = self.meta.tokenizer.vocab
        self.spec = model_view_spec(self.meta, cfg.image_size, online=cfg.online, mean=cfg.mean, std=cfg.std)
        self.skipped_rejected = 0  # keys without token rows, passed over by the batches delivered
        self.position = (0, 0)  # (epoch, step) of the next batch

    def seek(self, epoch: int, step: int) -> None:
        """Make ``(epoch, step)`` the position of the next batch."""
        self.position = (epoch, step)

    def state_dict(self) -> dict:
        """The stream's state in a checkpoint: the position of its next batch."""
        return {"epoch": self.position[0], "step": self.position[1]}

    def load_state_dict(self, state: dict) -> None:
        self.seek(state["epoch"], state["step"])

    def steps_per_epoch(self, epoch: int) -> int:
        """Full batches every rank can make in ``epoch``: the same number on each rank."""
        return self.source.steps_per_epoch(epoch)

    def _replay(self, source: ReplaySource):
        """Batches decoded and augmented by DALI; the source runs in DALI's worker process."""
        views = DaliViews(self.spec, batch_size=self.cfg.batch_size, device=self.device,
                          num_threads=self.cfg.num_threads, target=self.target)
        # tokens (stored only), mask, key, rejected
        extras = (types.INT64,) * (not self.cfg.online) + (types.BOOL, types.UINT8, types.INT32)
        batches = views.stream(source, extras)
        try:
            for epoch, step, micro in source.positions():
                try:
                    images, targets, outputs = next(batches)
                except UndecodableImage as exc:
                    raise self._undecodable(source, epoch, step, micro * self.cfg.batch_size + exc.sample) from None
                *tokens, mask, keys, rejected = outputs
                # (B, N) each; online, the tokens come from the target views, once on the device
                tokens = torch.from_numpy(np.array(tokens[0].as_tensor())) if tokens else targets
                mask = torch.from_numpy(np.array(mask.as_tensor()))
                if self.device.type == "cuda":
                    # A copy from pageable memory waits for the GPU to drain; from pinned memory it does not.
                    tokens = tokens if targets is not None else tokens.pin_memory()
                    mask = mask.pin_memory()
                yield Batch(images=images[:, 0], tokens=tokens, mask=mask, epoch=epoch, step=step, micro=micro,
                            accum=self.cfg.grad_accum, keys=[np.array(k).tobytes().decode() for k in keys]), \
                    int(np.array(rejected.as_tensor()).sum())
        finally:
            batches.close()  # stops DALI's worker process now

    def _undecodable(self, source: ReplaySource, epoch: int, step: int, i: int) -> BeitDataError:
        """The error for sample ``i`` of this rank's step, which DALI could not decode, naming it."""
        from beit_data.online import NEEDS_DECODABLE

        key = next(source.at(epoch, step).plan()).keys[i]
        why = NEEDS_DECODABLE if self.cfg.online else "it decoded when it was tokenized: has its shard changed?"
        return BeitDataError(f"sample {key} (epoch {epoch}, step {step}): DALI could not decode its image; {why}")

    def batches(self, epoch: int | None = None, step: int | None = None, *, dtype: torch.dtype | None = None):
        """Batches on the device from ``position`` on (or from ``(epoch, step)``), forever.

        ``position`` moves on as each batch is handed out, so a checkpoint taken after a
        step records where the next run starts. A DALI worker process prepares the samples
        and a loader thread runs the DALI graph, so the training loop's thread only moves
        finished batches to the device.
        """
        if epoch is not None:
            self.seek(epoch, step or 0)
        epoch, step = self.position
        source = self.source.at(epoch, step)
        source.check_epoch(epoch)
        for batch, rejected in prefetch(self._replay(source), depth=3):
            self.skipped_rejected += rejected
            batch.images = batch.images.to(self.device, dtype or batch.images.dtype, non_blocking=True)
            batch.tokens = batch.tokens.to(self.device, non_blocking=True)
            if self.tokenizer is not None:  # online: the target views become their ids here, in the loop
                # ids of the loader's own views, in [0,1]: no range check waiting on the device; cloned, as
                # an inference tensor cannot enter autograd
                batch.tokens = self.tokenizer.ids(batch.tokens, trusted=True).flatten(1).clone()
            batch.mask = batch.mask.to(self.device, non_blocking=True)
            if batch.ends_step:
                last = batch.step + 1 >= self.steps_per_epoch(batch.epoch)
                self.position = (batch.epoch + 1, 0) if last else (batch.epoch, batch.step + 1)
            yield batch
