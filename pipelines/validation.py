"""Held-out masked-token figures during pretraining: loss, top-1 and top-5 accuracy, perplexity.

Every evaluation sees the same images, views and masks (``beit_data.holdout``), with the model
in eval mode (no dropout, no drop path) and no random draw, so it never changes the training
trajectory. Under torchrun each rank evaluates its share and the sums are reduced, so the
figures equal a one-process evaluation up to the order of the float additions. For BEiT v2
models the figures are the main head's (the last block's).
"""

from __future__ import annotations

import math
from datetime import timedelta

import torch
import torch.nn.functional as F

from beit_common import BeitDataError, Location, storage
from beit_data.holdout import Holdout
from beit_data.replay import pair_token_files
from beit_data.shard_index import read_images, stale_index
from beit_data.shard_rows import image_members, table_keys
from beit_data.tokens import WINDOW_COLUMNS, check_rows, read_table
from beit_model.beit_mim import BeitMIM, masked_positions
from pipelines.runtime import autocast

__all__ = ["evaluate", "check_held_out_shards", "check_holdout", "EVAL_BATCH"]

EVAL_BATCH = 64


@torch.no_grad()
def evaluate(model: torch.nn.Module, holdout: Holdout, *, max_masked: int, device: torch.device,
             world_size: int = 1) -> dict:
    """The held-out figures, reduced over the ranks: ``val_loss``, ``val_top1``, ``val_top5``,
    ``val_perplexity``, ``val_images``, and ``val_majority``: the share of the most common code
    in the held-out targets, the top-1 of a model that always predicts it (its baseline)."""
    was_training = model.training
    model.eval()
    # loss sum, top-1 hits, top-5 hits, masked patches: summed in float64 on every rank
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    codes = torch.zeros(model.vocab_size, dtype=torch.float64, device=device)  # how often each code is a target
    for i in range(0, len(holdout.images), EVAL_BATCH):
        images, tokens, mask = (t[i:i + EVAL_BATCH] for t in (holdout.images, holdout.tokens, holdout.mask))
        positions, real = masked_positions(mask, max_masked)
        with autocast(device):  # BeitMIM's forward: a BEiT v2 model's main head, without the extra one
            logits = BeitMIM.forward(model, images.float(), mask, positions).float()  # (B, K, vocab)
        targets = tokens.gather(1, positions)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
        hits = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == targets.unsqueeze(-1)  # (B, K, 5)
        sums += torch.stack([loss[real].sum(), hits[..., 0][real].sum(), hits.any(-1)[real].sum(),
                             real.sum()]).double()
        codes += torch.bincount(targets[real], minlength=len(codes)).double()
    if world_size > 1:
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(codes)
    model.train(was_training)
    loss_sum, top1, top5, count = sums.tolist()
    mean = loss_sum / max(count, 1)
    return {"val_loss": mean, "val_top1": top1 / max(count, 1), "val_top5": top5 / max(count, 1),
            "val_perplexity": math.exp(mean), "val_images": holdout.total,
            "val_majority": codes.max().item() / max(count, 1)}


def check_held_out_shards(spec: str, tokens: str) -> None:
    """Refuse held-out shards and token files as the training stream refuses its own, before an
    image is decoded: what it checks before its first step (``pair_token_files``: a token file
    for each shard, one recipe, sound footers, shard sizes) and what it checks as it loads a
    shard (each key once with its views, ids and windows sound, every member as the token file
    recorded it: ``table_keys``, ``check_rows``, ``image_members``). The held-out set is small,
    so each shard gets all of it at once, and its ``.idx`` is compared with every tar header
    (``stale_index``), where training compares a few.

    Raises:
        BeitDataError: Naming the shard (or the token file and row) that training would refuse.
    """
    shards, paths, footers, _ = pair_token_files(spec, tokens, held_out=True)

    def check(shard: Location, path: Location, meta: dict) -> None:
        table = read_table(path, columns=list(WINDOW_COLUMNS))
        keys = table_keys(table, meta["views"]["views"], path)
        check_rows(table, meta, path)
        stale = stale_index(shard)  # every member against the tar headers, where training reads a few
        if stale is not None:
            raise stale
        image_members(shard, keys, token_file=path, fingerprint=meta.get("shard"), etag=None)

    storage.map_concurrently(lambda s: check(s[0], s[1], s[2][0]), list(zip(shards, paths, footers)))


def check_holdout(holdout: Holdout, source) -> None:
    """Refuse validation images that training reads.

    A validation shard may not be a training shard. Keys repeat across shards written by
    separate ``beit-data shards`` runs (each counts from 000000000), so a validation key that
    training also reads (``source``, the training stream's) is only refused when the two
    samples' images are the same bytes; only those images are read.

    Raises:
        BeitDataError: Naming the first shard or key that training also reads.
    """
    train = {Location(p).identity() for p in source.shards}
    for shard in holdout.shards:
        if Location(shard).identity() in train:
            raise BeitDataError(f"validation shard {shard} is also a training shard: the figures would not be "
                                "held out; give `val_shards` that training does not read")
    wanted = {k for _, k in holdout.chosen}
    for index, shard in enumerate(source.shards):
        shared = wanted.intersection(source.shard_keys(index))
        if not shared:
            continue
        mine = read_images([(shard, k) for k in sorted(shared)])
        theirs = read_images([(s, k) for s, k in holdout.chosen if k in shared])
        for (s, key), data in theirs.items():
            if mine.get((shard, key)) == data:
                raise BeitDataError(f"validation sample {Location(s).name}:{key} is also a training sample "
                                    f"(in {shard}): hold the validation images out of the training shards")


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
            from pipelines.probe import check_layers

            self.probe_layers = check_layers(cfg.probe_layers, depth, "probe_layers")  # refused before the run
        self.holdout = None
        if cfg.val_shards:
            from beit_data.holdout import load_holdout

            check_held_out_shards(cfg.val_shards, cfg.val_tokens)  # as training checks its own, before decoding
            self.holdout = load_holdout(cfg.val_shards, cfg.val_tokens, count=cfg.val_images, seed=stream.cfg.seed,
                                        meta=stream.meta, image_size=stream.cfg.image_size,
                                        num_masked=stream.cfg.num_masked, min_block=stream.cfg.min_block,
                                        rank=dist.rank, world_size=dist.world_size, device=device)
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
        from pipelines.probe import check_class_maps, knn, labeled_features

        layers = self.probe_layers
        (train, train_labels, train_maps), (val, val_labels, val_maps) = (
            labeled_features(model, spec, layers, self.device, num_threads=self.stream_cfg.num_threads)
            for spec in (self.cfg.probe_train, self.cfg.probe_val))
        check_class_maps(train_maps, val_maps)  # the first probe runs at step 0
        result = knn(train, train_labels, val, val_labels)
        return {"probe_top1": result["top1"], "probe_top5": result["top5"], "probe_k": result["k"]}
