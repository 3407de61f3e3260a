"""What the training order costs at ImageNet scale, on the order alone (nothing is decoded).

1,281,167 keys in 1,000 classes are written into shards of 1,000 samples, either class by
class (``beit-data shards --no-shuffle``) or in the default seeded random order, and read back
in the stream's order (``beit_data.order``) at the paper's global batch of 2,048, by 8 and by
64 ranks. For each it reports:

- mixing: the mean number of distinct classes in a rank's batch, for both kinds of shards,
  next to the expectation for a uniformly random batch of the same size;
- memory per rank: the samples of the windows a rank holds at once (per partition it reads:
  the window being read, the next one and the one loading), in samples and in bytes;
- reads per rank and epoch: token files loaded (a rank loads every window of each partition
  it reads a part of), and their bytes, next to the image bytes the rank reads.

    python -m benchmarks.order [--ranks 8 64] [--partitions 8] [--mix-shards 16] [--epoch 0]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from beit_data.order import MIX_SHARDS, PARTITIONS, OrderSpec, epoch_layout, partition_windows, rank_slices
from benchmarks.common import emit
from pipelines.shards import write_order

SAMPLE_BYTES = 196 * 2 + 40 + 120  # a held sample: its picked token row, view geometry and jitter, key and offset
ROW_BYTES = 196 * 2 + 60  # a token file row (one view), as stored before compression
IMAGE_BYTES = 110_000  # an ImageNet JPEG, on average


def class_labels(keys: int, classes: int) -> np.ndarray:
    """Class of each listed image, class by class (ImageFolder listing order), near-equal sizes."""
    sizes = np.full(classes, keys // classes)
    sizes[: keys % classes] += 1
    return np.repeat(np.arange(classes), sizes)


def partition_sequence(layout, spec: OrderSpec, epoch: int, p: int, shard_size: int) -> np.ndarray:
    """Write positions of partition ``p``'s samples in reading order."""
    parts = [np.asarray(w.shards, np.int64)[w.shard_of] * shard_size + w.sample_of
             for w in partition_windows(layout, spec, epoch, p)]
    return np.concatenate(parts)[: layout.steps * spec.shares[p]]


def rank_batches(sequences: list[np.ndarray], spec: OrderSpec, world_size: int, rank: int) -> np.ndarray:
    """(steps, G / W) write positions of the samples ``rank`` reads."""
    parts = [sequences[p].reshape(-1, spec.shares[p])[:, lo:hi] for p, lo, hi in rank_slices(spec, world_size, rank)]
    return np.concatenate(parts, axis=1)


def distinct_per_batch(labels: np.ndarray) -> np.ndarray:
    rows = np.sort(labels, axis=1)
    return (np.diff(rows, axis=1) != 0).sum(1) + 1


def held_samples(layout, spec: OrderSpec, epoch: int, partitions: list[int]) -> int:
    """The most samples a rank holds at once: three consecutive windows of each partition it reads."""
    total = 0
    for p in partitions:
        sizes = [len(w) for w in partition_windows(layout, spec, epoch, p)]
        total += max(sum(sizes[i:i + 3]) for i in range(len(sizes)))
    return total


def ranks_report(written: dict[str, np.ndarray], counts: list[int], args, world_size: int) -> dict:
    spec = OrderSpec(seed=args.seed, global_batch=args.global_batch, partitions=args.partitions,
                     mix_shards=args.mix_shards)
    layout = epoch_layout(counts, spec, args.epoch)
    start = time.perf_counter()
    sequences = [partition_sequence(layout, spec, args.epoch, p, args.shard_size) for p in range(len(spec.shares))]
    per_rank = args.global_batch // world_size
    p_class = np.bincount(written["class_sorted"]) / len(written["class_sorted"])
    report = {"ranks": world_size, "batch_per_rank": per_rank,
              "uniform_expectation": round(float((1 - (1 - p_class) ** per_rank).sum()), 2)}
    for name, labels in written.items():
        found = [distinct_per_batch(labels[rank_batches(sequences, spec, world_size, r)]) for r in range(world_size)]
        report[f"distinct_classes_{name}"] = round(float(np.concatenate(found).mean()), 2)
    report["shuffled_over_uniform"] = round(report["distinct_classes_shuffled"] / report["uniform_expectation"], 4)
    rank0 = [p for p, _, _ in rank_slices(spec, world_size, 0)]
    held = held_samples(layout, spec, args.epoch, rank0)
    loads = sum(len(w.shards) for p in rank0 for w in partition_windows(layout, spec, args.epoch, p))
    images = layout.steps * per_rank
    report.update({"partitions_read": len(rank0), "held_samples": held, "held_mb": round(held * SAMPLE_BYTES / 1e6, 1),
                   "token_files_loaded": loads,
                   "token_gb": round(loads * args.shard_size * args.views * ROW_BYTES / 1e9, 2),
                   "image_gb": round(images * IMAGE_BYTES / 1e9, 1),
                   "seconds": round(time.perf_counter() - start, 1)})
    report["token_over_image_bytes"] = round(report["token_gb"] / report["image_gb"], 3)
    return report


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keys", type=int, default=1_281_167)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
    p.add_argument("--global-batch", type=int, default=2048)
    p.add_argument("--partitions", type=int, default=PARTITIONS)
    p.add_argument("--mix-shards", type=int, default=MIX_SHARDS)
    p.add_argument("--views", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epoch", type=int, default=0)
    args = p.parse_args()
    listed = class_labels(args.keys, args.classes)
    counts = [min(args.shard_size, args.keys - s) for s in range(0, args.keys, args.shard_size)]
    # Write position -> class, with every shard padded to shard_size positions.
    pad = lambda labels: np.concatenate([labels, np.zeros(len(counts) * args.shard_size - args.keys, np.int64)])  # noqa: E731
    shuffled = listed[np.asarray(write_order(list(range(args.keys)), shuffle=True, seed=args.seed))]
    written = {"class_sorted": pad(listed), "shuffled": pad(shuffled)}
    layout = epoch_layout(counts, OrderSpec(seed=args.seed, global_batch=args.global_batch,
                                            partitions=args.partitions, mix_shards=args.mix_shards), args.epoch)
    emit({"benchmark": "order", "keys": args.keys, "classes": args.classes, "shard_size": args.shard_size,
          "shards": len(counts), "global_batch": args.global_batch, "partitions": args.partitions,
          "mix_shards": args.mix_shards, "steps": layout.steps, "left_out": layout.left_out,
          "by_ranks": [ranks_report(written, counts, args, w) for w in args.ranks]})


if __name__ == "__main__":
    main()
