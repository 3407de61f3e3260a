"""A fixed held-out set for validation: the same images, views and masks at every evaluation.

The set is drawn from the validation shards' token files and the seed alone, never from the
world size: the tokenized keys, ordered by shard and key, are permuted by ``(seed, "heldout")``
and the first ``count`` are kept. Each image gets one stored view and one block mask from
``(seed, "heldout", shard, key)``. Rank ``r`` of ``W`` takes every ``W``-th image from ``r``, so
the ranks' shares make up the one set. The views are decoded by DALI once, when the set is
loaded, into float16 tensors of the model's input (``model_view_spec``): an evaluation is then
forward passes only. A share costs about 300 KB per image at 224 pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from beit_common import BeitDataError, Location, storage
from beit_data.masking import BlockMaskGenerator
from beit_data.shard_index import read_images
from beit_data.shards import expand_shards
from beit_data.stream_config import IMAGENET_MEAN, IMAGENET_STD
from beit_data.tokens import (
    TARGET_KEYS,
    VIEW_COLUMNS,
    TokenMeta,
    check_recipe,
    file_keys,
    read_meta,
    read_table,
    token_paths,
)
from beit_data.views import row_view, stable_rng

__all__ = ["Holdout", "load_holdout", "select_holdout"]

DECODE_BATCH = 32


@dataclass
class Holdout:
    """One rank's share of the held-out set, ready for the model."""

    images: torch.Tensor  # (n, 3, S, S) float16, normalised
    tokens: torch.Tensor  # (n, grid*grid) int64
    mask: torch.Tensor  # (n, grid*grid) bool
    keys: list[str]  # this rank's, in order
    chosen: list[tuple[Location, str]]  # (shard, key) of the whole set, every rank's
    shards: list[Location]

    @property
    def total(self) -> int:
        """Images over all ranks."""
        return len(self.chosen)


def select_holdout(shards: list[Location], tokens_dir: Location, count: int, seed: int,
                   reference: TokenMeta) -> list[tuple[Location, str, dict]]:
    """The whole held-out set, in evaluation order: ``(shard, key, row)`` with the picked view's row.

    Only the key columns are read whole; the rows of the chosen views are then taken.

    Raises:
        BeitDataError: For a shard without a token file, tokens unlike the training tokens
            (``reference``'s metadata: the same tokenizer, view filter and jitter rule,
            ``TARGET_KEYS``), or no tokenized image at all.
    """
    candidates, paths = [], []
    for shard, path in zip(shards, token_paths(tokens_dir, shards)):
        if not storage.exists(path):
            raise BeitDataError(f"validation shard {shard} has no token file {path}; tokenize it first")
        meta = read_meta(path)
        check_recipe(meta, reference, f"{path} and the training tokens", "; tokenize it with the training tokenizer "
                     "and recipe", TARGET_KEYS)
        views = meta.views.views
        keys = file_keys(read_table(path, columns=["key"]).column("key"), views, path)
        first = {key: k * views for k, key in enumerate(keys)}  # a key's views are rows first .. first + views - 1
        for key in sorted(keys):
            pick = int(stable_rng(seed, "heldout", shard.name, key).integers(views))
            candidates.append((shard, key, len(paths), first[key] + pick))
        paths.append(path)
    if not candidates:
        raise BeitDataError(f"the validation shards hold no tokenized image ({shards[0]} ...)")
    chosen = [candidates[i] for i in stable_rng(seed, "heldout").permutation(len(candidates))[:count]]
    rows: dict[tuple[int, int], dict] = {}
    for f in sorted({f for _, _, f, _ in chosen}):
        picked = sorted(i for _, _, g, i in chosen if g == f)
        table = read_table(paths[f], columns=["key", *VIEW_COLUMNS, "tokens"]).take(picked)
        rows.update({(f, i): row for i, row in zip(picked, table.to_pylist())})
    return [(shard, key, rows[f, i]) for shard, key, f, i in chosen]


def load_holdout(shards_spec: str, tokens_dir: Location, *, count: int, seed: int, meta: TokenMeta,
                 image_size: int, num_masked: int, min_block: int = 16, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> Holdout:
    """This rank's share of the held-out set, decoded.

    Args:
        meta: The training tokens' metadata: the validation tokens must share its tokenizer.
        mean, std: The model input's normalisation: the training stream's.
    """
    from beit_data.dali_views import DaliViews
    from beit_data.stream import model_view_spec

    shards = expand_shards(shards_spec)
    chosen = select_holdout(shards, tokens_dir, count, seed, meta)
    mine = chosen[rank::world_size]
    grid = meta.tokenizer.grid
    masker = BlockMaskGenerator((grid, grid), num_masked, min_block)
    masks = [masker(stable_rng(seed, "heldout-mask", s.name, k)).reshape(-1) for s, k, _ in mine]
    decode = DaliViews(model_view_spec(meta, image_size, mean=mean, std=std), batch_size=DECODE_BATCH, device=device,
                       num_threads=2)
    images = []
    found = read_images([(s, k) for s, k, _ in mine])
    missing = [f"{s.name}:{k}" for s, k, _ in mine if (s, k) not in found]
    if missing:
        raise BeitDataError(f"validation samples {', '.join(missing[:3])} have tokens but no image in their shard")
    encoded = [found[s, k] for s, k, _ in mine]
    for i in range(0, len(mine), DECODE_BATCH):
        views = [[row_view(row)] for _, _, row in mine[i:i + DECODE_BATCH]]
        images.append(decode(encoded[i:i + DECODE_BATCH], views)[:, 0].to(torch.float16))
    device = torch.device(device)
    empty = torch.zeros((0, 3, image_size, image_size), dtype=torch.float16, device=device)
    return Holdout(images=torch.cat(images) if images else empty,
                   tokens=torch.from_numpy(np.array([row["tokens"] for _, _, row in mine], np.int64)
                                           .reshape(-1, grid * grid)).to(device),
                   mask=torch.from_numpy(np.array(masks, bool).reshape(-1, grid * grid)).to(device),
                   keys=[k for _, k, _ in mine], chosen=[(s, k) for s, k, _ in chosen], shards=shards)
