"""Online targets: a fresh view of every image each epoch, tokenized in the training loop.

This is the reference recipe (BEiT's two-view loader, the dVAE run on every step), on the
same stream as stored targets: the same source walks the same order over the samples
(``beit_data.order``, over the shards' own indexes rather than token files, so every image
with a key counts, where tokenize may have set small ones aside) with ``OnlineTargets`` in
place of stored ones, the same masks (``beit_data.masking.mask_rng``) and the same
checkpoints. Each epoch, image ``key`` gets the view ``sample_view(recipe, key, "epoch-E",
width, height)``, a pure function of ``(seed, epoch, key)`` and the image's size, so a resumed
run sees exactly the views it would have seen. DALI decodes each image once and makes both the
model's view (bicubic, ImageNet-normalised) and the tokenizer's view of that same window, flip
and jitter (``DaliViews(target=...)``); the stream then tokenizes the tokenizer's views on the
device.

It exists to answer whether stored views cost anything (``python -m benchmarks.views``); it
pays the tokenizer on every step, which is what stored targets save. Images are upscaled
where their shorter side is under the tokenizer's input, as the reference's RandomResizedCrop
does. An image that cannot be decoded stops the run, naming it: nothing tokenized the shards
beforehand to set it aside (``beit-data shards`` writes only images that decode).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np

from beit_common import BeitDataError, Location, storage
from beit_common.ranges import RangeFile
from beit_data.images import ImageError, ImageTooLarge, probe_image
from beit_data.masking import BlockMaskGenerator, mask_rng
from beit_data.replay import LoadedShard, ReplaySource
from beit_data.shard_index import read_index
from beit_data.shards import duplicate_keys, expand_shards
from beit_data.stream_config import StreamConfig
from beit_data.tokens import TokenizerMeta, TokenMeta
from beit_data.views import ViewRecipe, roi, sample_view

__all__ = ["OnlineTargets", "open_online", "online_view", "NEEDS_DECODABLE"]

NEEDS_DECODABLE = "online targets need every image to decode (beit-data shards writes only such images)"


def online_view(recipe: ViewRecipe, epoch: int, key: str, width: int, height: int):
    """The view image ``key`` gets in ``epoch`` when targets are online. Its jitter factors are
    drawn whatever ``recipe.target_jitter`` says: the model's view always has them, and that
    setting decides whether the tokenizer's view does."""
    return sample_view(replace(recipe, target_jitter=True), key, f"epoch-{epoch}", width, height)


def _shard_images(shard: Location) -> tuple[list[str], dict]:
    """A shard's keys with an image, in tar order, and their image members; a key that names
    several samples is left out (which image it means cannot be known), as tokenize rejects it."""
    entries = read_index(shard)
    repeated = duplicate_keys(entries)
    members = {s.key: s.members[s.image_ext] for s in entries if s.image_ext and s.key not in repeated}
    return list(members), members


@dataclass(kw_only=True)
class OnlineTargets:
    """The targets of the order's samples when they are tokenized in the loop: each image with its
    view of the epoch (``recipe`` draws them) and no stored tokens."""

    recipe: ViewRecipe
    OUTPUTS: ClassVar[tuple[str, ...]] = ("encoded", "roi", "flips", "jitter", "mask", "key", "rejected")

    def fresh(self) -> OnlineTargets:
        return self

    def shard_keys(self, source: ReplaySource, index: int) -> list[str]:
        return _shard_images(source.shards[index])[0]

    def load(self, source: ReplaySource, index: int, epoch: int, *, read: bool) -> LoadedShard:
        """A shard's keys (every epoch reads its index again: a window holds only its own);
        with ``read``, their image offsets and the shard opened for reading."""
        shard, etag = source.shards[index], source.etags[index]
        if read and etag is not None and storage.stat(shard)["etag"] != etag:
            raise BeitDataError(f"{shard} changed during the run; a shard must stay as it was when the run started")
        keys, members = _shard_images(shard)
        if len(keys) != source.images_per_shard[index]:
            raise BeitDataError(f"{shard} holds {len(keys)} images, {source.images_per_shard[index]} when the run "
                                "started; a shard must stay as it was when the run started")
        loaded = LoadedShard(keys, np.full(len(keys), -1, np.int64), location=shard)  # no stored view: fresh ones
        if read:
            loaded.images = [members[k][:2] for k in keys]
            loaded.file = RangeFile.open(shard, etag)  # closed when its window is done
        return loaded

    def item(self, source: ReplaySource, masker: BlockMaskGenerator, image: np.ndarray, epoch: int,
             shard: LoadedShard, i: int) -> list[np.ndarray]:
        """One row of ``OUTPUTS``: the epoch's view of the image, and the mask a stored run
        gives it (``mask_rng``)."""
        key = shard.keys[i]
        try:
            info = probe_image(image.tobytes())
        except ImageTooLarge as exc:  # pretrain has no --max-pixels
            raise BeitDataError(f"{shard.location}: sample {key}: {exc.reason}; pretrain decodes images up to that "
                                "size: resize it, or write the shards without it") from None
        except ImageError as exc:
            raise BeitDataError(f"{shard.location}: sample {key}: {exc}; {NEEDS_DECODABLE}") from None
        view = online_view(self.recipe, epoch, key, info.width, info.height)
        jitter = np.array([[view.brightness, view.contrast, view.saturation]], np.float32)
        return [image, roi([view]), np.array([view.flip], np.int32), jitter,
                masker(mask_rng(source.cfg.seed, epoch, key)).reshape(-1), np.frombuffer(key.encode(), np.uint8),
                np.array([0], np.int32)]


def open_online(cfg: StreamConfig, *, recipe: ViewRecipe, tokenizer: dict, rank: int = 0,
                world_size: int = 1) -> ReplaySource:
    """The order over the shards' images, with online targets: each shard's images are counted
    from its index (a ``.idx`` beside it, else its tar headers).

    Args:
        tokenizer: The tokenizer's description (``describe()``), which ``meta`` holds with ``recipe``.

    Raises:
        BeitDataError: For ``pipe:`` shards (the order reads samples by their offsets) or
            shards without an image.
    """
    shards = expand_shards(cfg.shards)
    pipes = [s for s in shards if not s.seekable]
    if pipes:
        raise BeitDataError(f"{pipes[0]}: online targets read images by their offsets in the shard, which a pipe: "
                            "command cannot give; use local files or object storage")
    counts = storage.map_concurrently(lambda s: len(_shard_images(s)[0]), shards)
    if not any(counts):
        raise BeitDataError(f"none of the shards {cfg.shards} holds an image")
    meta = TokenMeta(tokenizer=TokenizerMeta.from_dict(tokenizer), views=recipe)
    return ReplaySource(cfg=cfg, shards=shards, images_per_shard=counts, grid=meta.tokenizer.grid,
                        targets=OnlineTargets(recipe=recipe), rank=rank, world_size=world_size, meta=meta,
                        etags=[storage.stat(s, fresh=False)["etag"] for s in shards])
