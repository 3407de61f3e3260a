"""Block-wise masking, as in BEiT (``masking_generator.py`` of the reference code).

Rectangular blocks are added until ``num_masked`` patches are masked or no block fits. Each
block's target area is uniform between ``min_block`` and the patches still to mask, the log
of its aspect ratio is uniform, and it gets 10 attempts to add at least one new patch.
"""

from __future__ import annotations

import math

import numpy as np

from beit_data.views import stable_rng

__all__ = ["BlockMaskGenerator", "mask_rng"]


class BlockMaskGenerator:
    """Draws (grid) bool masks with about ``num_masked`` patches set.

    Args:
        grid: (height, width) in patches.
        num_masked: Patches to mask (75 of 196 in BEiT, about 40%).
        min_block: Smallest block area in patches.
        min_aspect: Smallest block aspect ratio; the largest is its inverse.
        max_block: Largest block area in patches (the reference's ``max_num_patches``);
            default ``num_masked``.
    """

    def __init__(self, grid: tuple[int, int] = (14, 14), num_masked: int = 75, min_block: int = 16,
                 min_aspect: float = 0.3, max_block: int | None = None):
        self.height, self.width = grid
        if not 0 < num_masked <= self.height * self.width:
            raise ValueError(f"num_masked must be in 1..{self.height * self.width}, got {num_masked}")
        self.num_masked, self.min_block = num_masked, min_block
        self.max_block = num_masked if max_block is None else max_block
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def _add_block(self, mask: np.ndarray, max_patches: int, rng: np.random.Generator) -> int:
        # The 10 attempts' uniforms come in one call: numpy's per-scalar calls cost more than the rest.
        draws = rng.random((10, 4)).tolist()
        lo, hi = self.log_aspect
        for u_area, u_aspect, u_top, u_left in draws:
            # As Python's random.uniform, which the reference uses: max_patches may be under min_block.
            target_area = self.min_block + (max_patches - self.min_block) * u_area
            aspect = math.exp(lo + (hi - lo) * u_aspect)
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < self.width and h < self.height:
                top = int(u_top * (self.height - h + 1))
                left = int(u_left * (self.width - w + 1))
                block = mask[top : top + h, left : left + w]
                new = h * w - int(np.count_nonzero(block))
                if 0 < new <= max_patches:
                    block[...] = True
                    return new
        return 0

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < self.num_masked:
            added = self._add_block(mask, min(self.num_masked - count, self.max_block), rng)
            if added == 0:
                break
            count += added
        return mask


def mask_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The generator of image ``key``'s mask in ``epoch``. It draws nothing else, so an image has
    the same mask whatever its targets (stored or online), V and jitter setting: arms of an
    ablation differ by their views alone."""
    return stable_rng(seed, epoch, key)
