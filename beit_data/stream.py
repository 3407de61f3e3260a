"""The training stream: shards joined to their token Parquet rows, replayed through DALI.

Which samples, views, tokens and masks make each batch is decided by ``ReplaySource`` (see
``beit_data.replay``), which DALI runs in a worker process of its own. DALI then decodes
exactly each stored crop (see ``model_view_spec``), resizes it to the model's input with bicubic, replays
the stored jitter (or draws fresh jitter for tokens made with ``--no-target-jitter``), flips
it and normalises it with the ImageNet mean and std. The stream's state is ``(epoch, step)``,
so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from beit_data.dali_views import IMAGENET_MEAN, IMAGENET_STD, DaliViews, ViewSpec, types
from beit_data.prefetch import prefetch
from beit_data.replay import ReplaySource
from beit_data.stream_config import StreamConfig

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


def model_view_spec(meta: dict, image_size: int) -> ViewSpec:
    """The model's view of a stored view: bicubic, ImageNet-normalised, float16.

    Where the tokenizer saw that same view (BEiT v2: a bicubic view at the model's size), the
    image is decoded whole and the window resized exactly as tokenize did, so the model's
    pixels are the tokenizer's. Otherwise only the window is decoded (ROI decode), which is
    cheaper and differs from a whole decode by a few levels in the last bits.
    """
    same = meta["views"].get("interp") == "bicubic" and meta["tokenizer"]["input_size"] == image_size
    return ViewSpec(views=1, size=image_size, interp="bicubic", jitter=True, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                    half=True, roi_decode=not same)


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
        self.source = ReplaySource.open(cfg, rank=rank, world_size=world_size)
        self.meta, self.missing = self.source.meta, self.source.missing
        self.shards, self.token_files = self.source.shards, self.source.token_files
        self.grid = self.meta["tokenizer"]["grid"]
        self.vocab = self.meta["tokenizer"]["vocab"]
        self.spec = model_view_spec(self.meta, cfg.image_size)
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
                          num_threads=self.cfg.num_threads)
        extras = (types.INT64, types.BOOL, types.UINT8, types.INT32)  # tokens, mask, key, rejected
        for (epoch, step, micro), (images, (tokens, mask, keys, rejected)) in zip(
                source.positions(), views.stream(source, extras)):
            tokens = torch.from_numpy(np.array(tokens.as_tensor()))  # (B, N)
            mask = torch.from_numpy(np.array(mask.as_tensor()))  # (B, N)
            if self.device.type == "cuda":
                # A copy from pageable memory waits for the GPU to drain; from pinned memory it does not.
                tokens, mask = tokens.pin_memory(), mask.pin_memory()
            yield Batch(images=images[:, 0], tokens=tokens, mask=mask, epoch=epoch, step=step, micro=micro,
                        accum=self.cfg.grad_accum, keys=[np.array(k).tobytes().decode() for k in keys]), \
                int(np.array(rejected.as_tensor()).sum())

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
            batch.mask = batch.mask.to(self.device, non_blocking=True)
            if batch.ends_step:
                last = batch.step + 1 >= self.steps_per_epoch(batch.epoch)
                self.position = (batch.epoch + 1, 0) if last else (batch.epoch, batch.step + 1)
            yield batch
