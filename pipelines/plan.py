"""``beit-data plan``: what training will see, batch by batch, without decoding an image.

The plan walks the training stream's own order (``ReplaySource.plan``), so the keys of step
``s`` of rank ``r`` are exactly those the stream delivers there. Users audit a run with it
("which images did step 41,000 see?") and check the mixing before spending GPU hours.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import Iterator

from beit_data.order import left_out_note
from beit_data.replay import PlannedBatch, ReplaySource
from pipelines.config import PlanConfig

__all__ = ["PlanConfig", "Plan", "run_plan", "format_batch"]


@dataclass
class Plan:
    """The batches of a plan (iterate it), and a note on the images each epoch leaves out."""

    cfg: PlanConfig
    source: ReplaySource
    note: str | None

    def __iter__(self) -> Iterator[PlannedBatch]:
        """Epochs ``start_epoch`` .. ``start_epoch + epochs - 1``, ordered by epoch, step, rank."""
        cfg, source = self.cfg, self.source
        ranks = [cfg.rank] if cfg.rank is not None else range(cfg.world_size)
        for epoch in range(cfg.start_epoch, cfg.start_epoch + cfg.epochs):
            steps = source.check_epoch(epoch)
            if cfg.steps is not None:
                steps = min(steps, cfg.steps)
            plans = [islice(source.for_rank(r).at(epoch, 0).plan(), steps) for r in ranks]
            for batches in zip(*plans):
                yield from batches


def run_plan(cfg: PlanConfig) -> Plan:
    """The plan of ``cfg``'s epochs: the shards and token files are opened and checked now, the
    batches are walked as the plan is iterated."""
    source = ReplaySource.open(cfg.data, world_size=cfg.world_size)
    return Plan(cfg, source, left_out_note(source.layout(cfg.start_epoch), source.spec))


def format_batch(batch: PlannedBatch) -> str:
    """``epoch 0  rank 0  step 0  000000012/3 000000007/1 ...`` (key/view)."""
    items = " ".join(f"{k}/{v}" for k, v in zip(batch.keys, batch.views))
    return f"epoch {batch.epoch}  rank {batch.rank}  step {batch.step}  {items}"
