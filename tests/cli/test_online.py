"""Online targets: a fresh view of every image each epoch, tokenized in the loop."""

import json
import shutil

import pytest
import torch
from helpers import TINY, invoke, losses, online_stream, write_shards

from beit_common import BeitDataError, Location
from pipelines.pretrain import PretrainConfig, run_pretrain


def test_online_tokens_are_the_tokenizers_ids_of_each_samples_view_of_its_epoch(sample_shards, tiny_tokenizer):
    """Each sample's tokens are the tokenizer's ids of its (seed, epoch, key) view, to the bit; so
    are its model pixels; the next epoch draws another view of the same image; and a stream
    started at any step gives that step's batch exactly."""
    from beit_data.dali_views import DaliViews, ViewSpec
    from beit_data.images import probe_image
    from beit_data.online import online_view
    from beit_data.shards import expand_shards, iter_samples
    from beit_model.tokenizer import load_tokenizer

    stream, recipe = online_stream(sample_shards, tiny_tokenizer)
    tokenizer = load_tokenizer(tiny_tokenizer)
    images = {s.key: s.image for shard in expand_shards(str(sample_shards)) for s in iter_samples(shard)}
    assert stream.steps_per_epoch(0) == 14 // 3
    target = DaliViews(ViewSpec(size=112, interp="lanczos", jitter=True), batch_size=1)
    model = DaliViews(stream.spec, batch_size=1)
    assert not stream.spec.roi_decode  # one whole decode serves both views
    it = stream.batches()
    batches = [next(it) for _ in range(6)]  # crosses the end of epoch 0 (4 steps)
    assert [(b.epoch, b.step) for b in batches] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    windows = {}
    for b in batches:
        assert b.tokens.dtype == torch.int64 and b.tokens.shape == (3, 196) and not b.tokens.is_inference()
        for j, key in enumerate(b.keys):
            info = probe_image(images[key])
            view = online_view(recipe, b.epoch, key, info.width, info.height)
            windows.setdefault(key, []).append((view.x, view.y, view.w, view.h))
            ids = tokenizer.ids(target([images[key]], [[view]])[:, 0]).flatten(1)[0]
            assert torch.equal(b.tokens[j], ids), key
            assert torch.equal(b.images[j], model([images[key]], [[view]])[0, 0]), key
    twice = [w for w in windows.values() if len(w) == 2]
    assert twice and all(a != b for a, b in twice)  # a fresh view each epoch
    again, _ = online_stream(sample_shards, tiny_tokenizer)  # a restart anywhere sees the same batch
    b = next(again.batches(1, 1))
    assert (b.epoch, b.step, b.keys) == (1, 1, batches[5].keys)
    assert torch.equal(b.images, batches[5].images) and torch.equal(b.tokens, batches[5].tokens)
    assert torch.equal(b.mask, batches[5].mask)


def test_online_and_stored_arms_of_any_v_see_the_same_samples_and_masks(sample_shards, sample_tokens,
                                                                        tiny_tokenizer, tmp_path):
    """An ablation's arms differ by their views alone: online targets and stored ones, with 4
    views or 1, give each step the same keys and each key the same mask, across the epoch's end."""
    from helpers import tokenize_folder

    from beit_data.stream import StreamConfig, TrainStream

    def stored(tokens):
        return TrainStream(StreamConfig(shards=str(sample_shards), tokens=str(tokens), batch_size=3, num_threads=1))

    arms = [online_stream(sample_shards, tiny_tokenizer)[0], stored(sample_tokens),
            stored(tokenize_folder(sample_shards, tmp_path / "one-view", tiny_tokenizer, views=1))]
    runs = [[next(it) for _ in range(6)] for it in (arm.batches() for arm in arms)]
    for batches in zip(*runs):
        assert len({(b.epoch, b.step, tuple(b.keys)) for b in batches}) == 1
        assert all(torch.equal(b.mask, batches[0].mask) for b in batches)
    assert runs[0][0].mask.sum() > 0 and not torch.equal(runs[0][0].mask, runs[0][4].mask)


def test_an_online_stream_without_its_tokenizer_is_refused(sample_shards):
    from beit_data.stream import StreamConfig, TrainStream

    cfg = StreamConfig(shards=str(sample_shards), targets="online", tokenizer="dvae.pt", batch_size=3)
    with pytest.raises(BeitDataError, match="^online targets are tokenized in the loop: give TrainStream the token"):
        TrainStream(cfg)


def test_pretrain_with_online_targets_resumes_bitwise_and_refuses_another_tokenizer(
        sample_shards, tiny_tokenizer, tmp_path):
    from beit_model.dvae import CONFIGS, save_checkpoint

    common = dict(shards=str(sample_shards), targets="online", tokenizer=str(tiny_tokenizer), steps=4,
                  checkpoint_every=100, **TINY)
    straight = run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "straight"), **common))
    run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "resumed"), stop_after=2, **common))
    torch.manual_seed(1)  # the same architecture with other weights: another tokenizer
    save_checkpoint(tmp_path / "other.pt", CONFIGS["tiny"], *CONFIGS["tiny"].build())
    with pytest.raises(BeitDataError, match=r"^`tokenizer` holds other data than the run being resumed"):
        run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "resumed"), resume=True,
                                              **{**common, "tokenizer": str(tmp_path / "other.pt")}))
    second = run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "resumed"), resume=True, **common))
    assert straight.steps == second.steps == 4
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")  # bitwise
    config = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert config["targets"] == "online" and config["tokens"] is None and config["recipe"] == "beit"


@pytest.mark.parametrize("args, message", [
    (["--targets", "online"], "--targets online tokenizes fresh views in the loop: give --tokenizer"),
    (["--targets", "online", "--tokenizer", "TOK", "--tokens", "TOKENS"], "and no --tokens"),
    ([], "training on stored targets needs --tokens"),
    (["--tokens", "TOKENS", "--tokenizer", "TOK"], "--tokenizer is for --targets online"),
    (["--targets", "online", "--tokenizer", "MISSING"], "tokenizer file not found: "),
])
def test_targets_and_their_inputs_are_refused_in_one_line(sample_shards, sample_tokens, tiny_tokenizer, tmp_path,
                                                          args, message):
    swap = {"TOK": str(tiny_tokenizer), "TOKENS": str(sample_tokens), "MISSING": str(tmp_path / "dvae.pt")}
    result = invoke("pretrain", "--shards", sample_shards, "--out", tmp_path / "run", *[swap.get(a, a) for a in args])
    assert result.exit_code != 0 and message in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_online_targets_name_an_image_that_cannot_be_decoded(tiny_tokenizer, tmp_path):
    shards = write_shards(tmp_path / "shards", [4, 4], image_size=32, corrupt=(1,))
    common = dict(shards=str(shards), targets="online", tokenizer=str(tiny_tokenizer), steps=4, **{**TINY,
                                                                                                  "batch_size": 8})
    with pytest.raises(BeitDataError, match=r"s-000001.tar: sample k0001\d{3}: not a decodable image; online "
                                            r"targets need every image to decode"):
        run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "run"), **common))


def test_online_targets_refuse_held_out_images_that_training_reads(sample_shards, sample_tokens, tiny_tokenizer,
                                                                    tmp_path):
    """The held-out check reads the training keys from the shards' indexes, as there are no token files."""
    common = dict(shards=str(sample_shards), targets="online", tokenizer=str(tiny_tokenizer), steps=2,
                  val_shards=str(sample_shards / "sample-000001.tar"), val_tokens=str(sample_tokens), val_images=2,
                  **TINY)
    with pytest.raises(BeitDataError, match=r"validation shard .*sample-000001.tar is also a training shard"):
        run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "run"), **common))
    copy = tmp_path / "val" / "held-000000.tar"  # the same images under another shard name
    for folder in ("val", "val-tokens"):
        (tmp_path / folder).mkdir()
    shutil.copy(sample_shards / "sample-000001.tar", copy)
    shutil.copy(sample_tokens / "sample-000001.parquet", tmp_path / "val-tokens" / "held-000000.parquet")
    with pytest.raises(BeitDataError, match=r"validation sample held-000000.tar:\S+ is also a training sample"):
        run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "run"), **{
            **common, "val_shards": str(copy), "val_tokens": str(tmp_path / "val-tokens")}))


def png(damaged: bool = False, side: int | None = None) -> bytes:
    """A 32-pixel PNG; ``damaged``: its pixel data zeroed in part (the header still reads);
    ``side``: its header claims that size instead (its checksum mended)."""
    import io
    import zlib

    import numpy as np
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)).save(out, "PNG")
    data = bytearray(out.getvalue())
    if damaged:
        at = data.index(b"IDAT") + 40
        data[at:at + 100] = bytes(100)
    if side:
        data[16:24] = side.to_bytes(4, "big") * 2
        data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


@pytest.mark.parametrize("image, message", [
    (png(damaged=True), r"^sample k12 \(epoch 0, step \d\): DALI could not decode its image; online targets need "
                        "every image to decode"),
    (png(side=20_000), r"s-1.tar: sample k12: 20000x20000 is 400,000,000 pixels, over the limit of [\d,]+ that "
                       r"guards against decompression bombs; pretrain decodes images up to that size: resize it"),
])
def test_online_targets_name_an_image_they_cannot_use_in_one_line(tiny_tokenizer, tmp_path, image, message):
    """A PNG whose header reads but whose pixel data is damaged fails in DALI's decoder, mid-epoch;
    one too large fails the header check. Either way the error is one line naming the sample."""
    from helpers import jpeg_bytes, write_tar

    from beit_data.shard_index import write_index

    (tmp_path / "shards").mkdir()
    for s in range(3):
        members = [(f"k{s}{i}.png", image) if (s, i) == (1, 2)
                   else (f"k{s}{i}.jpg", jpeg_bytes((32, 32), seed=10 * s + i)) for i in range(5)]
        write_index(Location(write_tar(tmp_path / "shards" / f"s-{s}.tar", members)))
    common = dict(shards=str(tmp_path / "shards"), targets="online", tokenizer=str(tiny_tokenizer), steps=7, **{
        **TINY, "batch_size": 2})
    with pytest.raises(BeitDataError, match=message) as info:
        run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "run"), **common))
    assert "\n" not in str(info.value) and "--max-pixels" not in str(info.value)
