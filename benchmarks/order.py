"""How well the training order mixes, at ImageNet scale, on the order alone (nothing is decoded).

1,281,167 keys in 1,000 classes are written into shards of 1,000 samples, either class by
class (``beit-data shards --no-shuffle``) or in the default seeded random order, and read
back in the stream's order (``beit_data.order``) by 8 ranks at batch 256. It reports the
mean number of distinct classes in a batch for both, next to a uniformly random permutation
(about 226), the memory the order takes per rank, and the memory a window of samples holds.

    python -m benchmarks.order [--mix-shards 16] [--epoch 0]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from beit_data.order import MIX_SHARDS, epoch_windows, steps_per_epoch
from benchmarks.common import emit
from pipelines.shards import write_order


def class_labels(keys: int, classes: int) -> np.ndarray:
    """Class of each listed image, class by class (ImageFolder listing order), near-equal sizes."""
    sizes = np.full(classes, keys // classes)
    sizes[: keys % classes] += 1
    return np.repeat(np.arange(classes), sizes)


def rank_sequence(counts: list[int], *, seed: int, epoch: int, rank: int, world_size: int, mix_shards: int,
                  shard_size: int, steps: int, batch_size: int) -> np.ndarray:
    """Write positions of the samples ``rank`` reads in ``epoch``, in reading order, full batches only."""
    parts = []
    for window in epoch_windows(counts, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                                mix_shards=mix_shards):
        shard_ids = np.asarray(window.shards)[window.shard_of]
        parts.append(shard_ids.astype(np.int64) * shard_size + window.sample_of)
    return np.concatenate(parts)[: steps * batch_size]


def distinct_per_batch(labels: np.ndarray, batch_size: int) -> np.ndarray:
    rows = np.sort(labels.reshape(-1, batch_size), axis=1)
    return (np.diff(rows, axis=1) != 0).sum(1) + 1


def mean_distinct(written: np.ndarray, counts: list[int], args) -> tuple[float, float]:
    """Mean distinct classes per batch over every rank's batches, and the seconds it took."""
    start = time.perf_counter()
    steps = steps_per_epoch(counts, seed=args.seed, epoch=args.epoch, world_size=args.ranks,
                            batch_size=args.batch_size)
    found = [distinct_per_batch(written[rank_sequence(counts, seed=args.seed, epoch=args.epoch, rank=r,
                                                      world_size=args.ranks, mix_shards=args.mix_shards,
                                                      shard_size=args.shard_size, steps=steps,
                                                      batch_size=args.batch_size)], args.batch_size)
             for r in range(args.ranks)]
    return float(np.concatenate(found).mean()), time.perf_counter() - start


def order_memory(counts: list[int], args) -> int:
    """Peak bytes Python allocates while one rank walks its whole epoch's order."""
    tracemalloc.start()
    for window in epoch_windows(counts, seed=args.seed, epoch=args.epoch, rank=0, world_size=args.ranks,
                                mix_shards=args.mix_shards):
        del window
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keys", type=int, default=1_281_167)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--mix-shards", type=int, default=MIX_SHARDS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epoch", type=int, default=0)
    args = p.parse_args()
    listed = class_labels(args.keys, args.classes)
    counts = [min(args.shard_size, args.keys - s) for s in range(0, args.keys, args.shard_size)]
    sorted_mean, sorted_s = mean_distinct(listed, counts, args)
    shuffled = listed[np.asarray(write_order(list(range(args.keys)), shuffle=True, seed=args.seed))]
    shuffled_mean, shuffled_s = mean_distinct(shuffled, counts, args)
    uniform = listed[np.random.default_rng(1).permutation(args.keys)][: args.keys // args.batch_size * args.batch_size]
    uniform_mean = float(distinct_per_batch(uniform, args.batch_size).mean())
    p_class = np.bincount(listed) / args.keys
    expected = float((1 - (1 - p_class) ** args.batch_size).sum())
    window_samples = args.mix_shards * args.shard_size
    emit({"benchmark": "order", "keys": args.keys, "classes": args.classes, "shard_size": args.shard_size,
          "shards": len(counts), "ranks": args.ranks, "batch_size": args.batch_size, "mix_shards": args.mix_shards,
          "distinct_classes_per_batch": {"class_sorted_shards": round(sorted_mean, 2),
                                         "shuffled_shards": round(shuffled_mean, 2),
                                         "uniform_permutation": round(uniform_mean, 2),
                                         "uniform_expectation": round(expected, 2)},
          "shuffled_over_uniform": round(shuffled_mean / expected, 4),
          "order_peak_bytes_per_rank": order_memory(counts, args),
          # The stream holds two windows (one loading ahead): per sample one picked token row
          # (196 int16), its view geometry and jitter (~40 bytes) and its key and offset.
          "window_samples": window_samples,
          "window_bytes_estimate": window_samples * (196 * 2 + 40 + 120),
          "seconds_all_ranks": {"class_sorted": round(sorted_s, 2), "shuffled": round(shuffled_s, 2)}})


if __name__ == "__main__":
    main()
