"""The training order on its own, over random shapes: every sample at most once per epoch, ranks
disjoint, equal steps, what is left out, the same global steps on any number of ranks, resume
anywhere (on the same number of ranks or another), and the order of runs from before partitions."""

from __future__ import annotations

import re
from dataclasses import fields
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
from helpers.order import rank_batches
from hypothesis import given, settings
from hypothesis import strategies as st

from beit_common import BeitDataError
from beit_data import order
from beit_data.old_orders import dealt_layout, partitions_for
from beit_data.order import OrderSpec, check_steps, epoch_layout, left_out_note, rank_slices
from beit_data.stream_config import StreamConfig
from beit_data.views import stable_rng

SETTINGS = settings(max_examples=150, deadline=None)


@st.composite
def shapes(draw, *, dealt: bool = False):
    """Shards of uneven sizes (empty ones too), a global batch and a world size that divides it,
    partitions from 1 to more than the ranks, windows from 1 to more than the shards."""
    counts = draw(st.lists(st.integers(0, 25), min_size=1, max_size=24))
    world_size = draw(st.integers(1, 8))
    per_rank = draw(st.integers(1, 6))
    spec = OrderSpec(seed=draw(st.integers(0, 3)), global_batch=per_rank * world_size,
                     partitions=world_size if dealt else draw(st.integers(1, 12)),
                     mix_shards=draw(st.integers(1, len(counts) + 2)), sequential=draw(st.booleans()),
                     **({"layout": dealt_layout} if dealt else {}))
    return counts, spec, world_size


def epoch_of(counts, spec, world_size, epoch) -> list[list[list[tuple[int, int]]]]:
    """``[rank][step]`` -> the (shard, sample) pairs of that rank's batch, for one epoch."""
    steps = epoch_layout(counts, spec, epoch).steps
    return [[b for _, _, b in islice(rank_batches(counts, spec, world_size=world_size, rank=r, start=(epoch, 0)),
                                     steps)] for r in range(world_size)]


def check_epoch(counts, spec, world_size, epoch) -> list[list[tuple[int, int]]]:
    """The epoch's global steps, after checking its invariants."""
    layout = epoch_layout(counts, spec, epoch)
    ranks = epoch_of(counts, spec, world_size, epoch)
    per_rank = spec.global_batch // world_size
    assert all(len(batches) == layout.steps for batches in ranks)  # every rank takes the same steps
    assert all(len(b) == per_rank for batches in ranks for b in batches)
    seen = [pair for batches in ranks for b in batches for pair in b]
    assert len(seen) == len(set(seen)) == layout.used  # at most once, ranks disjoint
    assert all(0 <= i < counts[s] for s, i in seen)
    return [[pair for r in range(world_size) for pair in ranks[r][step]] for step in range(layout.steps)]


@SETTINGS
@given(shapes(), st.integers(0, 2))
def test_each_epoch_reads_samples_at_most_once_on_equal_steps_and_leaves_out_less_than_a_batch(shape, epoch):
    counts, spec, world_size = shape
    layout = epoch_layout(counts, spec, epoch)
    assert layout.steps == sum(counts) // spec.global_batch
    assert 0 <= layout.left_out < spec.global_batch  # as the README states
    if layout.steps:
        check_epoch(counts, spec, world_size, epoch)


@SETTINGS
@given(shapes(), st.integers(0, 1), st.data())
def test_a_step_holds_the_same_samples_on_any_number_of_ranks(shape, epoch, data):
    counts, spec, world_size = shape
    if not epoch_layout(counts, spec, epoch).steps:
        return
    other = data.draw(st.sampled_from([w for w in range(1, 9) if spec.global_batch % w == 0]))
    assert check_epoch(counts, spec, world_size, epoch) == check_epoch(counts, spec, other, epoch)


@SETTINGS
@given(shapes(), st.data())
def test_resuming_anywhere_gives_the_rest_of_the_sequence(shape, data):
    counts, spec, world_size = shape
    steps = epoch_layout(counts, spec, 0).steps
    if not steps:
        return
    rank = data.draw(st.integers(0, world_size - 1))
    total = data.draw(st.integers(1, 3 * steps))  # up to three epochs
    straight = list(islice(rank_batches(counts, spec, world_size=world_size, rank=rank), total))
    at = data.draw(st.integers(0, total - 1))
    epoch, step, _ = straight[at]
    resumed = list(islice(rank_batches(counts, spec, world_size=world_size, rank=rank, start=(epoch, step)),
                          total - at))
    assert resumed == straight[at:]


def global_steps(counts, spec, world_size: int, start: tuple[int, int], steps: int) -> list:
    """``(epoch, step, pairs)`` of each global step from ``start``: the ranks' batches in rank order."""
    ranks = [islice(rank_batches(counts, spec, world_size=world_size, rank=r, start=start), steps)
             for r in range(world_size)]
    return [(parts[0][0], parts[0][1], [pair for _, _, b in parts for pair in b]) for parts in zip(*ranks)]


@SETTINGS
@given(shapes(), st.data())
def test_a_resume_on_another_number_of_ranks_continues_the_same_global_steps(shape, data):
    """Stopped anywhere on one number of ranks and resumed on another that splits the global batch:
    every remaining global step holds the samples, in order, of the uninterrupted run."""
    counts, spec, world_size = shape
    steps = epoch_layout(counts, spec, 0).steps
    if not steps:
        return
    other = data.draw(st.sampled_from([w for w in range(1, 9) if spec.global_batch % w == 0]))
    total = data.draw(st.integers(1, 3 * steps))  # up to three epochs
    straight = global_steps(counts, spec, world_size, (0, 0), total)
    at = data.draw(st.integers(0, total - 1))
    epoch, step, _ = straight[at]
    assert global_steps(counts, spec, other, (epoch, step), total - at) == straight[at:]


@SETTINGS
@given(shapes(dealt=True), st.integers(0, 2), st.data())
def test_runs_from_before_partitions_keep_their_order(shape, epoch, data):
    """``dealt_layout`` (order version 1) is the order every run had before partitions, sample for sample."""
    counts, spec, world_size = shape
    per_rank = spec.global_batch // world_size
    steps = epoch_layout(counts, spec, epoch).steps
    assert steps == min(sum(counts[i] for i in order_before(counts, spec, epoch, r)[0]) for r in range(world_size)) \
        // per_rank
    if not steps:
        return
    check_epoch(counts, spec, world_size, epoch)
    rank = data.draw(st.integers(0, world_size - 1))
    got = [pair for _, _, b in islice(rank_batches(counts, spec, world_size=world_size, rank=rank,
                                                   start=(epoch, 0)), steps) for pair in b]
    assert got == order_before(counts, spec, epoch, rank)[1][:steps * per_rank]


def order_before(counts, spec, epoch, rank) -> tuple[list[int], list[tuple[int, int]]]:
    """The order as it was written before partitions: a rank's shards, and its samples in order."""
    world_size = spec.partitions
    mine = [int(i) for i in stable_rng(spec.seed, "shards", epoch).permutation(len(counts))[rank::world_size]]
    size = 1 if spec.sequential else spec.mix_shards
    pairs = []
    for w, first in enumerate(range(0, len(mine), size)):
        shards = mine[first:first + size]
        shard_of = np.repeat(np.arange(len(shards)), [counts[i] for i in shards])
        sample_of = np.concatenate([np.arange(counts[i]) for i in shards])
        if not spec.sequential:
            perm = stable_rng(spec.seed, "mix", epoch, rank, w).permutation(len(shard_of))
            shard_of, sample_of = shard_of[perm], sample_of[perm]
        pairs += [(shards[a], int(b)) for a, b in zip(shard_of, sample_of)]
    return mine, pairs


def test_ranks_read_whole_partitions_where_they_divide_them():
    spec = OrderSpec(seed=0, global_batch=64, partitions=8)
    assert rank_slices(spec, 4, 1) == [(2, 0, 8), (3, 0, 8)]
    assert rank_slices(spec, 16, 3) == [(1, 4, 8)]
    assert rank_slices(spec, 1, 0) == [(p, 0, 8) for p in range(8)]
    assert rank_slices(OrderSpec(seed=0, global_batch=6, partitions=4), 3, 1) == [(1, 0, 2)]  # shares 2, 2, 1, 1
    with pytest.raises(BeitDataError, match="global batch of 64 does not split over 3 ranks"):
        rank_slices(spec, 3, 0)
    with pytest.raises(BeitDataError, match="resumes on 2 ranks only, not 4"):
        partitions_for(StreamConfig(shards="s", tokens="t", batch_size=2, partitions=2, order_version=1), 4)


def test_each_epoch_has_its_own_order_and_windows_interleave_their_shards():
    counts = [30] * 12
    spec = OrderSpec(seed=0, global_batch=16, partitions=1, mix_shards=4)
    first, second = (check_epoch(counts, spec, 1, e) for e in (0, 1))
    assert sorted(map(sorted, first)) != sorted(map(sorted, second))
    assert check_epoch(counts, spec, 1, 0) == first  # and it is the same every time
    assert len({s for s, _ in first[0]}) >= 3  # several shards in one batch, not one after another
    assert len({s for b in first[:7] for s, _ in b}) == 4  # the first window holds 4 shards (120 samples)
    # The shards themselves come in another order: the first window of the next epoch holds others.
    assert {s for b in first[:7] for s, _ in b} != {s for b in second[:7] for s, _ in b}


def class_of(counts, classes, shuffled):
    """Class of (shard, sample) for keys written class by class, or in a random order."""
    listing = np.repeat(np.arange(classes), sum(counts) // classes)
    if shuffled:
        listing = listing[np.random.default_rng(7).permutation(len(listing))]
    starts = np.cumsum([0] + counts[:-1])
    return lambda shard, sample: listing[starts[shard] + sample]


@pytest.mark.parametrize("world_size", [1, 2])
def test_distinct_classes_per_batch_match_a_uniform_shuffle(world_size):
    classes, batch = 20, 20
    counts = [50] * 200  # 500 batches: the mean is known to about 0.5%
    expectation = classes * (1 - (1 - 1 / classes) ** batch)  # 12.83
    spec = OrderSpec(seed=0, global_batch=batch * world_size, partitions=2, mix_shards=4)
    # Class-sorted shards (10 a class): a batch sees the classes of the 2 x 4 shards of its windows.
    for shuffled, low, high in ((True, 0.97, 1.03), (False, 0.0, 0.65)):
        label = class_of(counts, classes, shuffled)
        ranks = epoch_of(counts, spec, world_size, 0)
        distinct = [len({label(s, i) for s, i in b}) for batches in ranks for b in batches]
        assert low * expectation <= np.mean(distinct) <= high * expectation, (shuffled, np.mean(distinct))


def test_an_epoch_that_leaves_out_more_than_a_few_percent_says_why():
    spec = OrderSpec(seed=0, global_batch=2048)  # 256 a rank on 8 ranks
    note = left_out_note(epoch_layout([500] * 10, spec, 0), spec)
    assert note == ("each epoch leaves out 904 of 5,000 tokenized images (18.1%): an epoch is 2 global steps of "
                    "2,048 images, and the rest are fewer than one more step (the next epoch leaves out others); a "
                    "smaller batch leaves out fewer")
    assert left_out_note(epoch_layout([1000] * 1281, spec, 0), spec) is None  # 1,177 of 1,281,000: 0.09%


def test_an_old_order_says_why_in_its_own_words():
    """The messages of version 1's layout, where its ranks' shards decide the steps."""
    spec = OrderSpec(seed=0, global_batch=4, partitions=2, layout=dealt_layout)
    assert left_out_note(epoch_layout([9, 4, 5, 2], spec, 0), spec) == (  # ranks of 13 and 7: 3 steps
        "each epoch leaves out 8 of 20 tokenized images (40.0%): every rank takes as many steps as the rank with the "
        "fewest images can fill (shards dealt to ranks)")
    assert left_out_note(epoch_layout([9, 4, 5, 2], OrderSpec(seed=0, global_batch=4), 0), spec) is None
    spec = OrderSpec(seed=0, global_batch=8, partitions=2, layout=dealt_layout)
    with pytest.raises(BeitDataError, match=r"^epoch 1 has fewer tokenized images on some rank than one batch \(7 in "
                                            r"all over 2 ranks\); lower `batch_size`$"):
        check_steps(epoch_layout([3, 4], spec, 1), spec, 1)
    with pytest.raises(BeitDataError, match="a global batch of 8 does not split over 3 ranks"):
        epoch_layout([10], OrderSpec(seed=0, global_batch=8, partitions=3, layout=dealt_layout), 0)


def test_the_order_knows_no_order_version():
    """Old orders live in ``beit_data.old_orders``, chosen by the version; the order has no branch for them."""
    assert not re.search(r"dealt|shared_draws|order_version", Path(order.__file__).read_text())
    assert [f.name for f in fields(OrderSpec)] == ["seed", "global_batch", "partitions", "mix_shards", "sequential",
                                                   "layout"]
