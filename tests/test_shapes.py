"""The stream at shapes no other test chose: batches that span windows, shards and epochs, windows
of one sample, batches larger than a window, empty shards, resumes anywhere; local, HTTP and pipe:."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from beit_data.replay import OUTPUTS, ReplaySource, StreamConfig
from tests.conftest import tokenize_folder, write_shards

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
    return str(shards / f"s-{{{','.join(f'{s:06d}' for s in which)}}}.tar")


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
        from tests.object_store import serve_folder

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
