"""The stream at shapes no other test chose: batches that span windows, shards and epochs, windows
of one sample, batches larger than a window, empty shards, resumes anywhere; local, HTTP and pipe:."""

from __future__ import annotations

from itertools import islice

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import tokenize_folder, write_shards
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from beit_data.replay import OUTPUTS, ReplaySource, StreamConfig

# Shards 0-3 hold 20 images each, 4-27 two each; the rest are uneven, one of them (31) all
# rejected by tokenize; some have a .idx and some do not.
SIZES = [20] * 4 + [2] * 24 + [1, 3, 7, 2, 5, 1, 4, 6, 9, 1, 6]
CORRUPT = (31,)
INDEXED = (0, 2, *range(4, 16), 28, 30, 32, 33, 35, 38)


@pytest.fixture(scope="module")
def odd(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("odd")
    shards = write_shards(root / "shards", SIZES, indexed=INDEXED, corrupt=CORRUPT)
    return shards, tokenize_folder(shards, root / "tokens", tiny_tokenizer)


def spec(shards, which) -> str:
    names = [f"{s:06d}" for s in which]
    return str(shards / (f"s-{names[0]}.tar" if len(names) == 1 else f"s-{{{','.join(names)}}}.tar"))


def stored_rows(tokens) -> dict[tuple[str, int], dict]:
    return {(r["key"], r["view"]): r for p in sorted(tokens.glob("*.parquet")) for r in pq.read_table(p).to_pylist()}


def read_batches(source: ReplaySource, count: int) -> list[dict]:
    """The first ``count`` batches the source yields, as DALI's worker would take them."""
    it = iter(source)
    batches = [dict(zip(OUTPUTS, next(it))) for _ in range(count)]
    it.close()
    return batches


def check_against_plan(source: ReplaySource, batches: list[dict], rows: dict) -> None:
    """Each batch holds the planned keys, and each key the stored row of its planned view."""
    planned = source.plan()
    for batch in batches:
        plan = next(planned)
        keys = [k.tobytes().decode() for k in batch["key"]]
        assert keys == plan.keys
        for key, view, tokens, roi, flip in zip(keys, plan.views, batch["tokens"], batch["roi"], batch["flips"]):
            row = rows[(key, view)]
            assert tokens.tolist() == row["tokens"] and flip[0] == row["flip"]
            assert roi[0].tolist() == [row["x"], row["y"], row["x"] + row["w"], row["y"] + row["h"]]
    planned.close()


@pytest.mark.parametrize("which, mix_shards, batch_size, location", [
    (range(4), 1, 8, "local"), (range(4, 28), 16, 5, "local"), (range(4), 1, 8, "pipe"), (range(4), 1, 8, "http")])
def test_a_batch_spanning_two_windows_reads_both(odd, which, mix_shards, batch_size, location):
    """Shards of 20 with batch 8: batch 2 holds the last 4 samples of one window and the first 4 of
    the next. The first window's shard must stay open until that batch is read. (So must a window
    of 16 shards of 2 with batch 5, at its 7th batch.)"""
    shards, tokens = odd
    if location == "http":
        from helpers.object_store import serve_folder

        server = serve_folder(shards)
        where = spec(shards, which).replace(str(shards), f"http://127.0.0.1:{server.server_address[1]}")
    else:
        server, where = None, spec(shards, which)
    if location == "pipe":
        where = f"pipe:cat {where}"
    try:
        source = ReplaySource.open(StreamConfig(shards=where, tokens=str(tokens), batch_size=batch_size,
                                                mix_shards=mix_shards))
        steps = source.steps_per_epoch(0)
        batches = read_batches(source, steps + 2)  # the whole epoch and into the next
        check_against_plan(source, batches, stored_rows(tokens))
        keys = [k.tobytes().decode() for b in batches[:steps] for k in b["key"]]
        assert len(keys) == len(set(keys)) == steps * batch_size
    finally:
        if server is not None:
            server.shutdown()


def test_the_trainer_stream_crosses_window_boundaries(odd):
    from beit_data.stream import TrainStream

    shards, tokens = odd
    stream = TrainStream(StreamConfig(shards=spec(shards, range(4)), tokens=str(tokens), batch_size=8,
                                      mix_shards=1, num_threads=1))
    it = stream.batches()
    seen = [next(it) for _ in range(4)]  # steps 2 spans windows 0 and 1
    it.close()
    rows = stored_rows(tokens)
    planned = stream.source.plan()
    for batch in seen:
        plan = next(planned)
        assert batch.keys == plan.keys
        assert batch.tokens.tolist() == [rows[(k, v)]["tokens"] for k, v in zip(plan.keys, plan.views)]
        assert np.isfinite(batch.images.float().numpy()).all() and batch.images.shape[0] == 8


def token_keys(tokens, shards: list[str]) -> list[list[str]]:
    """Each shard's keys in its token file's order: sample ``i`` of a shard is its ``i``-th key."""
    from beit_common import Location
    from beit_data.tokens import token_path

    return [sorted(set(pq.read_table(token_path(Location(tokens), s), columns=["key"]).column("key").to_pylist()))
            for s in shards]


@st.composite
def stream_shapes(draw):
    """A subset of the shards (one of them up to all), a per-rank batch, ranks, partitions, a
    window size, which rank reads, and where it starts."""
    which = draw(st.lists(st.integers(0, len(SIZES) - 1), min_size=1, max_size=len(SIZES), unique=True))
    return dict(which=sorted(which), batch_size=draw(st.integers(1, 12)), world_size=draw(st.integers(1, 4)),
                partitions=draw(st.integers(1, 10)), mix_shards=draw(st.integers(1, 6)),
                rank=draw(st.integers(0, 3)), epoch=draw(st.integers(0, 1)), step=draw(st.integers(0, 20)))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream_shapes())
@example(dict(which=list(range(28, 39)), batch_size=12, world_size=1, partitions=1, mix_shards=1, rank=0, epoch=0,
              step=0))  # a batch larger than any window, windows of one sample (shards 28 and 33)
@example(dict(which=[0, 1], batch_size=7, world_size=2, partitions=3, mix_shards=1, rank=1, epoch=1, step=1))
@example(dict(which=[30], batch_size=1, world_size=1, partitions=2, mix_shards=1, rank=0, epoch=0, step=6))
def test_the_stream_reads_what_the_order_and_the_plan_say_at_any_shape(odd, shape):
    from helpers.order import rank_batches

    shards, tokens = odd
    total = sum(SIZES[s] for s in shape["which"] if s not in CORRUPT)
    world_size = shape["world_size"]
    if total < shape["batch_size"] * world_size:
        return  # fewer images than one global batch: refused (tests/cli/test_plan.py)
    cfg = StreamConfig(shards=spec(shards, shape["which"]), tokens=str(tokens), batch_size=shape["batch_size"],
                       partitions=shape["partitions"], mix_shards=shape["mix_shards"])
    rank = shape["rank"] % world_size
    source = ReplaySource.open(cfg, world_size=world_size).for_rank(rank)
    steps = source.steps_per_epoch(0)
    start = (shape["epoch"], shape["step"] % steps)
    count = min(steps + 2, 6)  # into the next epoch where the epoch is short
    source = source.at(*start)
    keys_of = token_keys(tokens, source.shards)
    order = [[keys_of[s][i] for s, i in b] for _, _, b in
             islice(rank_batches(source.images_per_shard, source.spec, world_size=world_size, rank=rank,
                                 start=start), count)]
    batches = read_batches(source, count)
    assert [[k.tobytes().decode() for k in b["key"]] for b in batches] == order
    check_against_plan(source, batches, stored_rows(tokens))
