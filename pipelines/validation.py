"""A pretrain run's quality checks: its held-out figures and k-NN probe on a schedule.

What they compute is ``pipelines.evaluation``'s (the probe command scores with the same code);
this module decides when (step 0, every ``val_every`` / ``probe_every`` steps, the last step),
on which ranks, and where the figures go.
"""

from __future__ import annotations

from datetime import timedelta

import torch

from pipelines.class_maps import check_class_maps
from pipelines.evaluation import check_held_out_shards, check_holdout, check_layers, evaluate, knn, labeled_features

__all__ = ["QualityChecks"]


class QualityChecks:
    """A run's held-out evaluation and k-NN probe, at step 0, every ``val_every`` /
    ``probe_every`` steps and at the last step; both log to JSONL and TensorBoard.

    Every rank evaluates its share of the held-out set, decoded once at the start. The probe
    runs on rank 0 alone, decoding its sets each time, the others waiting at a CPU barrier.
    ``first`` and ``last`` are this invocation's first and last held-out figures.
    """

    def __init__(self, cfg, stream, dist, device: torch.device, depth: int):
        """``cfg``: pretrain's ``eval`` section; the seed, masking and threads are the stream's."""
        self.cfg, self.stream_cfg, self.dist, self.device = cfg, stream.cfg, dist, device
        if cfg.probe_every:
            self.probe_layers = check_layers(cfg.probe_layers, depth, "probe_layers")  # refused before the run
        self.holdout = None
        if cfg.val_shards:
            from beit_data.holdout import load_holdout

            check_held_out_shards(cfg.val_shards, cfg.val_tokens)  # as training checks its own, before decoding
            self.holdout = load_holdout(cfg.val_shards, cfg.val_tokens, count=cfg.val_images, seed=stream.cfg.seed,
                                        meta=stream.meta, image_size=stream.cfg.image_size,
                                        num_masked=stream.cfg.num_masked, min_block=stream.cfg.min_block,
                                        rank=dist.rank, world_size=dist.world_size, device=device,
                                        mean=stream.cfg.mean, std=stream.cfg.std)
            check_holdout(self.holdout, stream.source)
        self.group = None
        if cfg.probe_every and dist.world_size > 1:  # the others wait on the CPU, without a GPU timeout
            self.group = torch.distributed.new_group(backend="gloo", timeout=timedelta(hours=6))
        self.first: dict | None = None
        self.last: dict | None = None

    def __call__(self, model: torch.nn.Module, step: int, total: int, logger) -> None:
        """Run what is due at ``step``."""
        cfg = self.cfg
        if self.holdout is not None and (step % cfg.val_every == 0 or step == total):
            figures = evaluate(model, self.holdout, max_masked=self.stream_cfg.num_masked, device=self.device,
                               world_size=self.dist.world_size)
            self.first, self.last = self.first or {"step": step, **figures}, {"step": step, **figures}
            logger.log({"step": step, "event": "val", **figures})
        if cfg.probe_every and (step % cfg.probe_every == 0 or step == total):
            if self.dist.rank == 0:
                logger.log({"step": step, "event": "probe", **self._probe(model)})
            if self.group is not None:
                torch.distributed.barrier(group=self.group)

    def _probe(self, model: torch.nn.Module) -> dict:
        """The k-NN probe at ``probe_layers``; both sets are decoded again each time, batch by batch."""
        layers = self.probe_layers
        (train, train_labels, train_maps), (val, val_labels, val_maps) = (
            labeled_features(model, spec, layers, self.device, num_threads=self.stream_cfg.num_threads,
                             mean=self.stream_cfg.mean, std=self.stream_cfg.std)
            for spec in (self.cfg.probe_train, self.cfg.probe_val))
        check_class_maps(train_maps, val_maps)  # the first probe runs at step 0
        result = knn(train, train_labels, val, val_labels)
        return {"probe_top1": result["top1"], "probe_top5": result["top5"], "probe_k": result["k"]}
