"""The training stream: batches, restarts, stored rows, fresh jitter and its errors."""


import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import reordered_copy, write_tar

from beit_common import BeitDataError


def test_stream_batches_are_the_same_after_a_restart(sample_shards, sample_tokens):
    from beit_data.stream import StreamConfig, TrainStream

    stream = TrainStream(StreamConfig(shards=str(sample_shards), tokens=str(sample_tokens), batch_size=3,
                                      num_threads=1))
    it = stream.batches()
    seq = [next(it) for _ in range(7)]  # crosses the epoch boundary (4 steps per epoch)
    assert [(b.epoch, b.step) for b in seq] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2)]
    again = TrainStream(StreamConfig(shards=str(sample_shards), tokens=str(sample_tokens), batch_size=3,
                                     num_threads=1)).batches(1, 1)
    b = next(again)
    assert (b.epoch, b.step, b.keys) == (1, 1, seq[5].keys)
    assert torch.equal(b.images, seq[5].images) and torch.equal(b.tokens, seq[5].tokens)
    assert torch.equal(b.mask, seq[5].mask)
    assert b.images.shape == (3, 3, 224, 224) and b.tokens.dtype == torch.int64 and b.mask.dtype == torch.bool
    assert b.mask.sum(1).max() <= 75 and b.tokens.shape == (3, 196)
    # A different epoch shuffles shards and picks other views and masks.
    assert seq[0].keys != seq[4].keys or not torch.equal(seq[0].mask, seq[4].mask)


@pytest.mark.parametrize("shared", [False, True])
def test_stream_replays_the_picked_views_tokens_with_the_masks_generator_draw(sample_shards, sample_tokens, shared):
    """The view pick and the mask each have their generator of (seed, epoch, key); a run from
    before that (order version 2, as its checkpoint says) draws both from one, the pick first."""
    from beit_data.masking import BlockMaskGenerator
    from beit_data.stream import StreamConfig, TrainStream
    from beit_data.views import stable_rng

    stream = TrainStream(StreamConfig(shards=str(sample_shards), tokens=str(sample_tokens), batch_size=2,
                                      num_threads=1, order_version=2 if shared else 3))
    b = next(stream.batches(1, 2))
    rows = {(r["key"], r["view"]): r["tokens"] for p in sample_tokens.glob("*.parquet")
            for r in pq.read_table(p).to_pylist()}
    masker = BlockMaskGenerator((14, 14), 75, 16)
    for key, tokens, mask in zip(b.keys, b.tokens, b.mask):
        rng = stable_rng(0, 1, key) if shared else stable_rng(0, "view", 1, key)
        assert tokens.tolist() == rows[(key, int(rng.integers(4)))]
        expected = masker(rng if shared else stable_rng(0, 1, key)).reshape(-1)
        assert np.array_equal(mask.numpy(), expected), key


def test_a_shard_rewritten_since_tokenize_is_refused(sample_shards, sample_tokens, tmp_path):
    import shutil
    import tarfile

    from beit_data.stream import StreamConfig, TrainStream

    def stream(folder):
        return TrainStream(StreamConfig(shards=str(folder), tokens=str(sample_tokens), batch_size=3, num_threads=1))

    (tmp_path / "fewer").mkdir()
    with tarfile.open(sample_shards / "sample-000000.tar") as tar:
        member = tar.getmembers()[0]
        write_tar(tmp_path / "fewer" / "sample-000000.tar", [(member.name, tar.extractfile(member).read())])
    with pytest.raises(BeitDataError, match=r"fewer/sample-000000.tar has changed since it was tokenized "
                                            r"\(51200 bytes, \d+ then\); tokenize it again \(overwrite\)"):
        stream(tmp_path / "fewer")
    # Re-sharded in another order: the same size, so the .idx tells, before anything is read.
    for name in ("sample-000000", "sample-000001"):
        reordered_copy(sample_shards / f"{name}.tar", tmp_path / "idx" / f"{name}.tar", index=True)
    with pytest.raises(BeitDataError, match=r"sample-000000.tar has changed since it was tokenized \(its members"):
        stream(tmp_path / "idx")
    # Without a .idx the tar headers tell, when the shard's window is loaded.
    shutil.copytree(sample_shards, tmp_path / "noidx", ignore=shutil.ignore_patterns("*.idx"))
    reordered_copy(sample_shards / "sample-000001.tar", tmp_path / "noidx" / "sample-000001.tar", index=False)
    batches = stream(tmp_path / "noidx").batches()
    with pytest.raises(BeitDataError, match=r"sample-000001.tar has changed since it was tokenized \(its members"):
        next(batches)


def test_no_target_jitter_tokens_get_fresh_jitter_each_epoch(sample_shards, tiny_tokenizer, tmp_path):
    from dataclasses import replace

    from beit_data.replay import OUTPUTS
    from beit_data.stream import StreamConfig, TrainStream
    from beit_data.tokens import read_meta
    from pipelines.tokenize_shards import TokenizeConfig, run_tokenize

    run_tokenize(TokenizeConfig(shards=str(sample_shards), tokenizer=str(tiny_tokenizer), out=str(tmp_path / "t"),
                                views=2, target_jitter=False, device="cpu", progress=False))
    assert read_meta(tmp_path / "t" / "sample-000000.parquet").views.target_jitter is False
    table = pq.read_table(tmp_path / "t" / "sample-000000.parquet")
    assert set(table.column("brightness").to_pylist()) == {1.0}
    stream = TrainStream(StreamConfig(shards=str(sample_shards), tokens=str(tmp_path / "t"), batch_size=14))

    def jitter_by_key(epoch):  # the source's first batch of the epoch: every image (14 per epoch)
        batch = dict(zip(OUTPUTS, next(iter(replace(stream.source, start=(epoch, 0))))))
        return {k.tobytes().decode(): tuple(j[0]) for k, j in zip(batch["key"], batch["jitter"])}

    epoch0, epoch1 = jitter_by_key(0), jitter_by_key(1)
    assert len(epoch0) == 14 and epoch0.keys() == epoch1.keys()
    for jitter in (*epoch0.values(), *epoch1.values()):
        assert all(0.6 <= f <= 1.4 and f != 1.0 for f in jitter)
    assert all(epoch0[k] != epoch1[k] for k in epoch0)


def test_the_stream_owns_its_position(sample_shards, sample_tokens):
    from beit_data.stream import StreamConfig, TrainStream

    stream = TrainStream(StreamConfig(shards=str(sample_shards), tokens=str(sample_tokens), batch_size=3,
                                      num_threads=1))
    assert stream.position == (0, 0) and stream.steps_per_epoch(0) == 4
    it = stream.batches()
    seen = []
    for _ in range(5):
        batch = next(it)
        seen.append(((batch.epoch, batch.step), stream.position))
    it.close()
    assert seen == [((0, 0), (0, 1)), ((0, 1), (0, 2)), ((0, 2), (0, 3)), ((0, 3), (1, 0)), ((1, 0), (1, 1))]
    stream.seek(1, 1)
    again = stream.batches()
    assert (next(again).epoch, stream.position) == (1, (1, 2))
    again.close()
