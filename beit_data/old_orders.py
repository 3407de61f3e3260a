"""The draws kept for runs that earlier versions started, so that they resume exactly.

A run's order is fixed by its version, which its checkpoint records through two settings
(``order_version``):

- version 1: shards dealt whole to the ranks (``dealt``: the partitions are the ranks; see
  ``beit_data.order``), and one generator per ``(seed, epoch, key)`` that picked a stored
  sample's view, then drew its fresh jitter and its mask (``shared_draws``);
- version 2: partitions, with those shared draws;
- version 3 (``ORDER_VERSION``, every new run): partitions, and each draw from a generator of
  its own (``Draws``), so that a mask never depends on the views or the jitter setting.

The stream asks ``draws_for`` which draws to use and ``partitions_for`` how many partitions its
order has; the order itself deals version 1's shards (``OrderSpec.dealt``).
"""

from __future__ import annotations

import numpy as np

from beit_data.masking import mask_rng
from beit_data.stream_config import StreamConfig
from beit_data.views import stable_rng

__all__ = ["ORDER_VERSION", "Draws", "SharedDraws", "draws_for", "partitions_for", "order_version", "kept_order"]

ORDER_VERSION = 3


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
    """The draws of versions 1 and 2: one generator picked the view, then drew the fresh jitter and
    the mask."""

    def view_rng(self, epoch: int, key: str) -> np.random.Generator:
        return mask_rng(self.seed, epoch, key)

    def mask_rng(self, epoch: int, key: str, views: int) -> np.random.Generator:
        rng = mask_rng(self.seed, epoch, key)
        rng.integers(views)  # the view was picked by this generator, first
        return rng

    def jitter_rng(self, epoch: int, key: str, mask: np.random.Generator) -> np.random.Generator:
        return mask


def draws_for(cfg: StreamConfig) -> Draws:
    """The draws of a stream's order version."""
    return SharedDraws(cfg.seed) if cfg.shared_draws else Draws(cfg.seed)


def partitions_for(cfg: StreamConfig, world_size: int) -> int:
    """The partitions of a stream's order: version 1 deals its shards to its ranks, so they are
    its partitions (``OrderSpec.dealt``)."""
    return world_size if cfg.dealt else cfg.partitions


def order_version(settings: dict) -> int:
    """The order version of a run, from the settings its checkpoint records (completed for runs
    from before a setting existed: ``CheckpointMeta.settings``)."""
    if settings["dealt"]:
        return 1
    return 2 if settings["shared_draws"] and settings["targets"] == "stored" else ORDER_VERSION


def kept_order(settings: dict) -> dict:
    """The stream settings that give a saved run (its checkpoint's settings) its order again;
    none for the current version. Online runs never shared their draws."""
    version = order_version(settings)
    kept = {"dealt": True, "partitions": settings["partitions"]} if version == 1 else {}
    if version < ORDER_VERSION and settings["shared_draws"] and settings["targets"] == "stored":
        kept["shared_draws"] = True
    return kept
