"""Views: the crop window, flip and colour-jitter factors of one augmented view of an image.

View ``v`` of the image with key ``k`` is a pure function of ``(seed, k, v, width, height)``:
its generator is seeded from a stable hash of those values, so it never depends on world
size, batch size, worker count or order. The window follows BEiT's RandomResizedCrop
(torchvision's ``get_params``): scale and ratio drawn 10 times, then a centre-crop fallback.

This module is also the one home of a view's geometry: a token row's window as a ``View``
(``row_view``), a ``View`` as the ``roi`` row DALI's view graph takes (``roi``), which windows
lie inside their image (``outside_image``) and a centred square window (``centre_view``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np

from beit_common import BeitDataError

__all__ = ["JITTER_ORDER", "ViewRecipe", "View", "stable_rng", "sample_view", "sample_views", "row_view", "roi",
           "outside_image", "centre_view"]


# How the jitter factors are applied (recorded in the token files; the DALI graph follows it).
JITTER_ORDER = "brightness, contrast, saturation; float, clamped to [0,255] after each; after resize, before flip"


def stable_rng(*parts) -> np.random.Generator:
    """A generator seeded from a hash of ``parts`` that is the same in every process.

    Python's ``hash()`` is salted per process, so blake2b is used instead.
    """
    text = "\x1f".join(map(str, parts)).encode()
    seed = int.from_bytes(hashlib.blake2b(text, digest_size=16).digest(), "little")
    return np.random.default_rng(seed)


@dataclass(frozen=True, kw_only=True)
class ViewRecipe:
    """How views are drawn; recorded in the token files' metadata.

    Attributes:
        views: Views per image (V).
        seed: Seed of every view.
        scale, ratio: RandomResizedCrop area fraction and aspect-ratio ranges.
        flip: Horizontal-flip probability.
        jitter: Brightness, contrast and saturation factors are drawn from 1 ± jitter.
        target_jitter: Whether the tokenizer saw the jittered view (BEiT's reference does).
        interp: The filter that resized the tokenizer's view (``lanczos`` for BEiT's dVAE,
            ``bicubic`` for BEiT v2's VQ-KD, which sees the model's own view).
        recipe: The name of the recipe these settings come from.
    """

    views: int = 10
    seed: int = 0
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    jitter: float = 0.4
    target_jitter: bool = True
    interp: str = "lanczos"
    recipe: str = "beit"

    def __post_init__(self):
        if self.interp not in ("lanczos", "bicubic", "bilinear"):
            raise BeitDataError(f"interp must be lanczos, bicubic or bilinear, got {self.interp}")
        if self.views < 1:
            raise BeitDataError(f"`views` must be at least 1, got {self.views}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise BeitDataError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise BeitDataError(f"ratio must satisfy 0 < min <= max, got {self.ratio}")
        if not 0 <= self.flip <= 1 or not 0 <= self.jitter < 1:
            raise BeitDataError("flip must be in [0,1] and jitter in [0,1)")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["scale"], d["ratio"] = list(self.scale), list(self.ratio)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ViewRecipe:
        """The recipe ``as_dict`` gives (a token file's ``views``); one without ``interp`` or
        ``recipe`` (written before BEiT v2) gets BEiT's Lanczos recipe, their defaults."""
        return cls(**{**d, "scale": tuple(d["scale"]), "ratio": tuple(d["ratio"])})


@dataclass(frozen=True)
class View:
    """A crop window in decoded-image pixels, a flip bit and jitter factors."""

    x: int
    y: int
    w: int
    h: int
    flip: bool
    brightness: float
    contrast: float
    saturation: float
    fallback: bool = False


def _window(rng: np.random.Generator, width: int, height: int, scale, ratio) -> tuple[int, int, int, int, bool]:
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y = int(rng.integers(0, height - h + 1))
            x = int(rng.integers(0, width - w + 1))
            return x, y, w, h, False
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h, True


def sample_view(recipe: ViewRecipe, key: str, view: int, width: int, height: int) -> View:
    """View ``view`` of the image ``key`` of size ``width`` x ``height``."""
    if width < 1 or height < 1:
        raise BeitDataError(f"image size must be positive, got {width}x{height}")
    rng = stable_rng(recipe.seed, key, view, width, height)
    x, y, w, h, fallback = _window(rng, width, height, recipe.scale, recipe.ratio)
    flip = bool(rng.random() < recipe.flip)
    lo, hi = 1 - recipe.jitter, 1 + recipe.jitter
    b, c, s = (float(rng.uniform(lo, hi)) for _ in range(3))
    if not recipe.target_jitter:
        b = c = s = 1.0
    return View(x, y, w, h, flip, b, c, s, fallback)


def sample_views(recipe: ViewRecipe, key: str, width: int, height: int) -> list[View]:
    """All ``recipe.views`` views of one image."""
    return [sample_view(recipe, key, v, width, height) for v in range(recipe.views)]


# ---- a view's geometry --------------------------------------------------------------------------


def row_view(row: Mapping) -> View:
    """The view a token row stores (its window, flip and jitter columns): the inverse of
    ``beit_data.tokens.view_rows``."""
    return View(row["x"], row["y"], row["w"], row["h"], row["flip"], row["brightness"], row["contrast"],
                row["saturation"])


def roi(views: Sequence[View]) -> np.ndarray:
    """DALI's ``roi`` input for one image's views: (V, 4) float32 rows of each window's corners
    x0, y0, x1, y1 (the far edges excluded)."""
    return np.array([[v.x, v.y, v.x + v.w, v.y + v.h] for v in views], np.float32)


def outside_image(x, y, w, h, width, height):
    """Which windows are not inside their image (ints or numpy arrays, element-wise): a negative
    corner, an empty side, or a far edge past the image's."""
    return (x < 0) | (y < 0) | (w < 1) | (h < 1) | (x + w > width) | (y + h > height)


def centre_view(width: int, height: int, fraction: float) -> View:
    """The centred square window whose side is ``fraction`` of the image's shorter side (at
    least a pixel), unflipped and without jitter."""
    side = max(1, round(min(width, height) * fraction))
    return View((width - side) // 2, (height - side) // 2, side, side, False, 1.0, 1.0, 1.0)
