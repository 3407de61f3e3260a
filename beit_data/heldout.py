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

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from beit_common import BeitDataError
from beit_data.masking import BlockMaskGenerator
from beit_data.shards import expand_shards, read_index
from beit_data.tokens import VIEW_COLUMNS, read_meta, token_path
from beit_data.views import View, stable_rng

__all__ = ["HeldOut", "load_heldout", "select_heldout"]

DECODE_BATCH = 32


@dataclass
class HeldOut:
    """One rank's share of the held-out set, ready for the model."""

    images: torch.Tensor  # (n, 3, S, S) float16, normalised
    tokens: torch.Tensor  # (n, grid*grid) int64
    mask: torch.Tensor  # (n, grid*grid) bool
    keys: list[str]  # this rank's, in order
    chosen: list[tuple[Path, str]]  # (shard, key) of the whole set, every rank's
    shards: list[Path]

    @property
    def total(self) -> int:
        """Images over all ranks."""
        return len(self.chosen)


def select_heldout(shards: list[Path], tokens_dir: str | os.PathLike, count: int, seed: int,
                   tokenizer: dict) -> list[tuple[Path, str, dict]]:
    """The whole held-out set, in evaluation order: ``(shard, key, row)`` with the picked view's row.

    Raises:
        BeitDataError: For a shard without a token file, tokens of another tokenizer, or no
            tokenized image at all.
    """
    candidates = []
    for shard in shards:
        path = token_path(tokens_dir, shard)
        if not path.exists():
            raise BeitDataError(f"validation shard {shard} has no token file {path}; tokenize it first")
        meta = read_meta(path)
        if meta["tokenizer"] != tokenizer:
            raise BeitDataError(f"{path} was made by another tokenizer than the training tokens "
                                f"({meta['tokenizer']['fingerprint'][:12]} != {tokenizer['fingerprint'][:12]})")
        table = pq.read_table(path, columns=["key", *VIEW_COLUMNS, "tokens"]).to_pydict()
        by_key: dict[str, list[int]] = {}
        for i, key in enumerate(table["key"]):
            by_key.setdefault(key, []).append(i)
        for key in sorted(by_key):
            rows = by_key[key]
            rng = stable_rng(seed, "heldout", shard.name, key)
            i = rows[int(rng.integers(len(rows)))]
            candidates.append((shard, key, {c: table[c][i] for c in table}))
    if not candidates:
        raise BeitDataError(f"the validation shards hold no tokenized image ({shards[0]} ...)")
    order = stable_rng(seed, "heldout").permutation(len(candidates))
    return [candidates[i] for i in order[:count]]


def _image_bytes(chosen: list[tuple[Path, str, dict]]) -> list[bytes]:
    """Each chosen sample's image, read by its offset in its shard."""
    out: dict[tuple[Path, str], bytes] = {}
    for shard in dict.fromkeys(s for s, _, _ in chosen):
        wanted = {k for s, k, _ in chosen if s == shard}
        with open(shard, "rb") as f:
            for sample in read_index(shard):
                if sample.key in wanted and sample.image_ext:
                    member = sample.members[sample.image_ext]
                    out[shard, sample.key] = os.pread(f.fileno(), member.size, member.offset)
    missing = [f"{s.name}:{k}" for s, k, _ in chosen if (s, k) not in out]
    if missing:
        raise BeitDataError(f"validation samples {', '.join(missing[:3])} have tokens but no image in their shard")
    return [out[s, k] for s, k, _ in chosen]


def load_heldout(shards_spec: str, tokens_dir: str | os.PathLike, *, count: int, seed: int, meta: dict,
                 image_size: int, num_masked: int, min_block: int = 16, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu") -> HeldOut:
    """This rank's share of the held-out set, decoded.

    Args:
        meta: The training tokens' metadata: the validation tokens must share its tokenizer.
    """
    from beit_data.dali_views import DaliViews
    from beit_data.stream import model_view_spec

    shards = expand_shards(shards_spec)
    chosen = select_heldout(shards, tokens_dir, count, seed, meta["tokenizer"])
    mine = chosen[rank::world_size]
    grid = meta["tokenizer"]["grid"]
    masker = BlockMaskGenerator((grid, grid), num_masked, min_block)
    masks = [masker(stable_rng(seed, "heldout-mask", s.name, k)).reshape(-1) for s, k, _ in mine]
    decode = DaliViews(model_view_spec(meta, image_size), batch_size=DECODE_BATCH, device=device, num_threads=2)
    images = []
    encoded = _image_bytes(mine)
    for i in range(0, len(mine), DECODE_BATCH):
        views = [[View(*(row[c] for c in ("x", "y", "w", "h", "flip", "brightness", "contrast", "saturation")))]
                 for _, _, row in mine[i:i + DECODE_BATCH]]
        images.append(decode(encoded[i:i + DECODE_BATCH], views)[:, 0].to(torch.float16))
    device = torch.device(device)
    empty = torch.zeros((0, 3, image_size, image_size), dtype=torch.float16, device=device)
    return HeldOut(images=torch.cat(images) if images else empty,
                   tokens=torch.from_numpy(np.array([row["tokens"] for _, _, row in mine], np.int64)
                                           .reshape(-1, grid * grid)).to(device),
                   mask=torch.from_numpy(np.array(masks, bool).reshape(-1, grid * grid)).to(device),
                   keys=[k for _, k, _ in mine], chosen=[(s, k) for s, k, _ in chosen], shards=shards)
