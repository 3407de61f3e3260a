"""The settings of the training stream: what it reads and how it orders it.

Kept apart from the stream (and light: no numpy, torch or DALI) so that the stages' configs and
the command line can hold one without importing what the stream needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from beit_common import BeitDataError, Location, resolve_locations

__all__ = ["StreamConfig", "MIX_SHARDS", "PARTITIONS", "TARGETS", "ORDER_VERSION", "IMAGENET_MEAN", "IMAGENET_STD",
           "check_normalisation"]

ORDER_VERSION = 3  # the order of every new run; runs from before keep theirs (``beit_data.old_orders``)
MIX_SHARDS = 16  # pieces a partition reads at once, by default
TARGETS = ("stored", "online")
PARTITIONS = 8  # partitions of each epoch, by default; a rank reads whole ones on 1, 2, 4 or 8 ranks
# The model input's per-channel normalisation by default, in [0,1] pixel units: ImageNet's, as
# timm's IMAGENET_DEFAULT_MEAN/STD (unilm's --imagenet_default_mean_and_std); every run before
# --mean/--std used them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_normalisation(mean, std) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``mean`` and ``std`` as tuples of 3 floats (a config file or ``config.json`` gives lists).

    Raises:
        BeitDataError: Unless the means are 3 numbers in [0, 1] and the stds 3 positive ones.
    """
    def three(name: str, given, ok, what: str) -> tuple[float, ...]:
        try:
            values = tuple(float(v) for v in given)
        except (TypeError, ValueError):
            values = ()
        if len(values) != 3 or not all(ok(v) for v in values):
            raise BeitDataError(f"`{name}` must be 3 {what}, one per RGB channel, got {given!r}")
        return values

    return (three("mean", mean, lambda v: 0 <= v <= 1, "numbers in [0, 1]"),
            three("std", std, lambda v: 0 < v < math.inf, "positive numbers"))


@dataclass(frozen=True, kw_only=True)
class StreamConfig:
    """What the training stream reads and how it orders it (see ``beit_data.order``).

    Attributes:
        batch_size: Samples per rank per micro-batch; the global batch of a step is that times
            the world size times ``grad_accum``.
        grad_accum: Micro-batches per step: each rank's share of a global step comes as
            ``grad_accum`` batches of ``batch_size``. The order is a function of the global
            batch alone, so 8 ranks and 1 rank with ``grad_accum`` 8 see the same steps.
        partitions: Partitions of each epoch. A rank reads whole partitions when the world
            size divides them, and reads the windows of every partition it takes a part of.
        mix_shards: Shards a partition reads at once; their samples are permuted together.
            Memory per partition read grows with it (one token row and one offset per sample
            of a window, up to three windows at a time: the one being read, the next one and
            the one loading); reads are random within those shards.
        order_version: The order's version: ``ORDER_VERSION`` for a new run; a resumed run
            keeps the one it started with, which its checkpoint records (``beit_data.old_orders``).
        targets: ``stored``: the views and tokens of ``tokens`` (the default). ``online``: a
            fresh view of every image each epoch, tokenized in the loop by ``tokenizer`` (the
            reference recipe, for comparison; see ``beit_data.online``).
        mean, std: The per-channel normalisation of the model's input, in [0,1] pixel units
            (the tokenizer's own input is not normalised by them: it takes [0,1] pixels).
    """

    shards: str
    tokens: Location | None = None  # a string is held as a Location (``resolve_locations``)
    targets: str = "stored"
    tokenizer: str | None = None
    batch_size: int = 256
    grad_accum: int = 1
    seed: int = 0
    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    num_masked: int = 75
    min_block: int = 16
    partitions: int = PARTITIONS
    mix_shards: int = MIX_SHARDS
    order_version: int = ORDER_VERSION
    skip_missing: bool = False
    num_threads: int = 4
    # Control experiment only: pair every image with another image's tokens.
    shuffle_targets: bool = False

    def __post_init__(self):
        resolve_locations(self, "tokens")
        mean, std = check_normalisation(self.mean, self.std)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        if min(self.batch_size, self.grad_accum, self.mix_shards, self.partitions) < 1:
            raise BeitDataError("`batch_size`, `grad_accum`, `mix_shards` and `partitions` must be at least 1")
        if not 1 <= self.order_version <= ORDER_VERSION:
            raise BeitDataError(f"`order_version` must be 1 to {ORDER_VERSION}, got {self.order_version}")
        if self.targets not in TARGETS:
            raise BeitDataError(f"`targets` must be one of {', '.join(TARGETS)}, got {self.targets}")
        if self.online:
            if self.tokens is not None or self.tokenizer is None:
                raise BeitDataError("`targets` online tokenizes fresh views in the loop: give `tokenizer` (the file "
                                    "tokenize would use) and no `tokens`")
            if self.shuffle_targets or self.skip_missing:
                raise BeitDataError("`shuffle_targets` and `skip_missing` are for stored tokens, not `targets` online")
        elif self.tokens is None or self.tokenizer is not None:
            raise BeitDataError("training on stored targets needs `tokens` (the folder beit-data tokenize wrote); "
                                "`tokenizer` is for `targets` online")

    @property
    def online(self) -> bool:
        """Whether the targets are tokenized in the loop rather than read from ``tokens``."""
        return self.targets == "online"

    def global_batch(self, world_size: int) -> int:
        """Samples per global step over ``world_size`` ranks."""
        return self.batch_size * world_size * self.grad_accum
