"""The order alone, as a rank's stream reads it: for tests that check the order without a stream."""

from __future__ import annotations

from typing import Iterator, Sequence

from beit_data.order import OrderSpec, check_steps, epoch_layout, partition_spans, rank_slices, steps_from, take_batches


def rank_batches(counts: Sequence[int], spec: OrderSpec, *, world_size: int, rank: int,
                 start: tuple[int, int] = (0, 0)) -> Iterator[tuple[int, int, list[tuple[int, int]]]]:
    """``(epoch, step, [(shard, sample), ...])`` of each step of ``rank`` from ``start`` on,
    forever: the order alone, as the stream reads it."""
    slices = rank_slices(spec, world_size, rank)

    def samples(p: int) -> Iterator[tuple[int, int]]:
        for _, window, lo, hi in partition_spans(counts, spec, p, start):
            for j in range(lo, hi):
                yield window.shards[window.shard_of[j]], int(window.sample_of[j])

    positions = steps_from(start, lambda e: check_steps(epoch_layout(counts, spec, e), spec, e))
    streams = {p: samples(p) for p, _, _ in slices}
    for (epoch, step), batch in zip(positions, take_batches(streams, slices, spec.shares)):
        yield epoch, step, batch
