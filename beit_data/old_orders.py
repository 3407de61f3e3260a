"""The orders kept for runs that earlier versions started, so that they resume exactly.

A run's order has a version, which its checkpoint records (``order_version`` among its
settings; for checkpoints from before, ``order_version`` derives it from the settings they
carry, ``dealt`` and ``shared_draws``):

- version 1: shards dealt whole to the ranks (``dealt_layout``: the partitions are the ranks),
  and one generator per ``(seed, epoch, key)`` that picked a stored sample's view, then drew
  its fresh jitter and its mask (``SharedDraws``);
- version 2: partitions, with those shared draws;
- version 3 (``ORDER_VERSION``, every new run): partitions, and each draw from a generator of
  its own (``Draws``), so that a mask never depends on the views or the jitter setting.

The stream asks this module, by its settings' ``order_version``, for its epochs' layout
(``layout_for``), its partitions (``partitions_for``) and its draws (``draws_for``); the
order itself (``beit_data.order``) knows no version.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from beit_common import BeitDataError
from beit_data.masking import mask_rng
from beit_data.order import Layout, LayoutFn, OrderSpec, Piece, partition_layout
from beit_data.stream_config import ORDER_VERSION, StreamConfig
from beit_data.views import stable_rng

__all__ = ["ORDER_VERSION", "Draws", "SharedDraws", "DealtLayout", "dealt_layout", "deals_to_ranks", "shares_draws",
           "layout_for", "draws_for", "partitions_for", "order_version", "order_settings", "kept_order"]


def deals_to_ranks(version: int) -> bool:
    """Whether an order deals its shards whole to the ranks, and so is read on them only."""
    return version == 1


def shares_draws(version: int) -> bool:
    """Whether an order's stored samples draw their view, fresh jitter and mask from one generator."""
    return version < 3


@dataclass(frozen=True)
class DealtLayout(Layout):
    """An epoch of version 1: shard ``i`` of the epoch's permutation goes whole to rank ``i % W``
    (the partitions are the W ranks), each rank gives ``G / W`` samples to every step, and the
    epoch has as many steps as the rank with the fewest samples can fill."""

    def too_few(self, spec: OrderSpec, epoch: int) -> str:
        return (f"epoch {epoch} has fewer tokenized images on some rank than one batch "
                f"({self.samples} in all over {spec.partitions} ranks); lower `batch_size`")

    def why_left_out(self, spec: OrderSpec) -> str:
        return "every rank takes as many steps as the rank with the fewest images can fill (shards dealt to ranks)"


@lru_cache(maxsize=64)
def dealt_layout(counts: tuple[int, ...], spec: OrderSpec, epoch: int) -> DealtLayout:
    """The steps and the ranks' shards of ``epoch`` in version 1 (``spec.partitions`` ranks).

    Raises:
        BeitDataError: If the global batch does not split over the ranks.
    """
    ranks = spec.partitions
    if spec.global_batch % ranks:
        raise BeitDataError(f"a global batch of {spec.global_batch} does not split over {ranks} ranks")
    order = stable_rng(spec.seed, "shards", epoch).permutation(len(counts))
    # Empty shards stay in: they take a place in a window, as they always did.
    dealt = tuple(tuple(Piece(int(s), 0, counts[s]) for s in order[r::ranks]) for r in range(ranks))
    steps = min(sum(p.hi for p in part) for part in dealt) // (spec.global_batch // ranks)
    return DealtLayout(steps, dealt, sum(counts), steps * spec.global_batch)


def layout_for(version: int) -> LayoutFn:
    """How an order of ``version`` lays out its epochs (``OrderSpec.layout``)."""
    return dealt_layout if deals_to_ranks(version) else partition_layout


class Draws:
    """Where a stored sample's random choices come from: its view, its fresh jitter (tokens made
    with ``--no-target-jitter``) and its mask, each from a generator of ``(seed, epoch, key)`` of
    its own."""

    def __init__(self, seed: int):
        self.seed = seed

    def view_rng(self, epoch: int, key: str) -> np.random.Generator:
        return stable_rng(self.seed, "view", epoch, key)

    def mask_rng(self, epoch: int, key: str, views: int) -> np.random.Generator:
        return mask_rng(self.seed, epoch, key)

    def jitter_rng(self, epoch: int, key: str, mask: np.random.Generator) -> np.random.Generator:
        """The generator of fresh jitter, drawn before the mask (from ``mask`` when they share one)."""
        return stable_rng(self.seed, "jitter", epoch, key)


class SharedDraws(Draws):
    """The draws of versions 1 and 2 (stored targets): one generator picked the view, then drew the
    fresh jitter and the mask."""

    def view_rng(self, epoch: int, key: str) -> np.random.Generator:
        return mask_rng(self.seed, epoch, key)

    def mask_rng(self, epoch: int, key: str, views: int) -> np.random.Generator:
        rng = mask_rng(self.seed, epoch, key)
        rng.integers(views)  # the view was picked by this generator, first
        return rng

    def jitter_rng(self, epoch: int, key: str, mask: np.random.Generator) -> np.random.Generator:
        return mask


def draws_for(cfg: StreamConfig) -> Draws:
    """The draws of a stream's order version (online targets draw only their masks, alike in all)."""
    return SharedDraws(cfg.seed) if shares_draws(cfg.order_version) else Draws(cfg.seed)


def partitions_for(cfg: StreamConfig, world_size: int) -> int:
    """The partitions of a stream's order. Version 1 deals its shards to the ranks it started on,
    which its settings record as its ``partitions``: it is read on that many ranks only.

    Raises:
        BeitDataError: For a version 1 order on another number of ranks.
    """
    if deals_to_ranks(cfg.order_version) and world_size != cfg.partitions:
        raise BeitDataError(f"this run's order deals shards to {cfg.partitions} ranks; it resumes on "
                            f"{cfg.partitions} ranks only, not {world_size}")
    return cfg.partitions


def order_version(settings: dict) -> int:
    """The order version of a run whose checkpoint records none, from the settings it records
    (completed for runs from before a setting existed: ``CheckpointMeta.settings``)."""
    if settings["dealt"]:
        return 1
    return 2 if settings["shared_draws"] and settings["targets"] == "stored" else ORDER_VERSION


def order_settings(version: int, targets: str) -> dict:
    """The settings that said an order before its version was recorded, as a run's
    ``config.json`` still shows them: ``dealt`` and ``shared_draws`` (stored targets only)."""
    return {"dealt": deals_to_ranks(version), "shared_draws": shares_draws(version) and targets == "stored"}


def kept_order(settings: dict) -> dict:
    """The stream settings that give a saved run (its checkpoint's settings, ``order_version``
    among them) its order again: its version, and for version 1 the ranks it deals to."""
    version = settings["order_version"]
    return {"order_version": version, **({"partitions": settings["partitions"]} if deals_to_ranks(version) else {})}
