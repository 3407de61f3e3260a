"""The training order on its own: mixing, epochs, disjoint ranks, equal steps and resume."""

import numpy as np
import pytest

from beit_data.order import epoch_windows, rank_shards, steps_per_epoch


def read_order(counts, *, epoch=0, rank=0, world_size=1, mix_shards=4, skip=0, seed=0):
    """(shard, sample) pairs in reading order from sample ``skip`` on."""
    pairs = []
    for window in epoch_windows(counts, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                                mix_shards=mix_shards, skip=skip):
        shards = np.asarray(window.shards)[window.shard_of]
        pairs += list(zip(shards.tolist(), window.sample_of.tolist()))[max(skip - window.start, 0):]
    return pairs


def class_of(counts, classes, shuffled):
    """Class of (shard, sample) for keys written class by class, or in a random order."""
    listing = np.repeat(np.arange(classes), sum(counts) // classes)
    if shuffled:
        listing = listing[np.random.default_rng(7).permutation(len(listing))]
    starts = np.cumsum([0] + counts[:-1])
    return lambda shard, sample: listing[starts[shard] + sample]


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_sample_once_per_epoch_ranks_disjoint_and_equal_steps(world_size):
    counts = [50, 50, 47, 50, 33, 50, 50, 12, 50, 50, 49]
    seen = [read_order(counts, rank=r, world_size=world_size) for r in range(world_size)]
    everything = [p for rank in seen for p in rank]
    assert len(everything) == len(set(everything)) == sum(counts)  # once each, no rank shares one
    assert sorted(everything) == [(s, i) for s, c in enumerate(counts) for i in range(c)]
    steps = steps_per_epoch(counts, seed=0, epoch=0, world_size=world_size, batch_size=16)
    assert steps == min(len(r) for r in seen) // 16 and steps >= 1
    for r in range(world_size):  # a rank reads exactly its shards
        assert {s for s, _ in seen[r]} == set(rank_shards(len(counts), seed=0, epoch=0, rank=r,
                                                          world_size=world_size))


def test_each_epoch_has_its_own_order():
    counts = [40] * 8
    first, second = read_order(counts, epoch=0), read_order(counts, epoch=1)
    assert sorted(first) == sorted(second) and first != second
    assert read_order(counts, epoch=0) == first  # and it is the same every time


def test_windows_interleave_their_shards_and_resume_skips_the_rest():
    counts = [30] * 12
    order = read_order(counts, mix_shards=4)
    first_batch = order[:16]
    assert len({s for s, _ in first_batch}) >= 3  # several shards in one batch, not one after another
    assert len({s for s, _ in order[:120]}) == 4  # the first window holds 4 shards
    for skip in (0, 17, 119, 120, 121, 300):
        assert read_order(counts, mix_shards=4, skip=skip) == order[skip:]
    # Resuming in the last window permutes only that window: the windows before are not built.
    assert [w.index for w in epoch_windows(counts, seed=0, epoch=0, rank=0, world_size=1, mix_shards=4,
                                           skip=250)] == [2]


def test_distinct_classes_per_batch_match_a_uniform_shuffle():
    classes, batch = 20, 20
    counts = [50] * 40
    expectation = classes * (1 - (1 - 1 / classes) ** batch)  # 12.83
    for shuffled, low, high in ((True, 0.95, 1.05), (False, 0.0, 0.5)):
        label = class_of(counts, classes, shuffled)
        distinct = []
        for rank in range(2):
            order = read_order(counts, rank=rank, world_size=2, mix_shards=8)
            for b in range(len(order) // batch):
                distinct.append(len({label(s, i) for s, i in order[b * batch:(b + 1) * batch]}))
        assert low * expectation <= np.mean(distinct) <= high * expectation, (shuffled, np.mean(distinct))
