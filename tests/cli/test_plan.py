"""``beit-data plan`` is the stream's order: on class folders, across ranks, and on resume."""

import json

import numpy as np
import pytest
from helpers import cached, invoke, run_cli
from PIL import Image

from pipelines.plan import PlanConfig, run_plan

CLASSES, PER_CLASS = 4, 12


@pytest.fixture(scope="module")
def class_folders(tiny_tokenizer):
    """4 classes x 12 images written as shards of 6, shuffled and class-sorted, both tokenized
    (built once, ``cached``)."""
    from pipelines.shards import ShardsConfig, run_shards
    from pipelines.tokenize_shards import TokenizeConfig, run_tokenize

    def build(root):
        rng = np.random.default_rng(0)
        for c in range(CLASSES):
            (root / "tree" / f"class{c}").mkdir(parents=True)
            for i in range(PER_CLASS):
                pixels = rng.integers(0, 256, (120, 128, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / "tree" / f"class{c}" / f"{i}.jpg", quality=80)
        for name, shuffle in (("shuffled", True), ("sorted", False)):
            run_shards(ShardsConfig(min_size=0, sources=[root / "tree"], out=root / name / "shards", maxcount=6,
                                    shuffle=shuffle, progress=False))
            run_tokenize(TokenizeConfig(shards=str(root / name / "shards"), tokenizer=str(tiny_tokenizer),
                                        out=str(root / name / "tokens"), views=2, batch_size=16, device="cpu",
                                        progress=False))

    root = cached("class_folders", build, tiny_tokenizer)
    return {name: root / name for name in ("shuffled", "sorted")}


def labels(shards) -> dict[str, int]:
    from beit_data.shards import expand_shards, iter_samples

    return {s.key: int(s.members["cls"]) for shard in expand_shards(str(shards)) for s in iter_samples(shard)}


def plan(folder, **kwargs):
    return list(run_plan(PlanConfig.from_flat(shards=str(folder / "shards"), tokens=str(folder / "tokens"), **kwargs)))


def test_shuffled_shards_mix_classes_as_a_uniform_shuffle(class_folders):
    batch = 8
    expectation = CLASSES * (1 - (1 - 1 / CLASSES) ** batch)  # 3.6 of 4
    distinct = {}
    for name, folder in class_folders.items():
        label = labels(folder / "shards")
        batches = plan(folder, batch_size=batch, world_size=2, epochs=4, partitions=2, mix_shards=2)
        distinct[name] = np.mean([len({label[k] for k in b.keys}) for b in batches])
    assert abs(distinct["shuffled"] - expectation) < 0.4, distinct
    assert distinct["sorted"] < 2.5, distinct  # a rank's partition reads 2 class-sorted shards: 1 or 2 classes


@pytest.mark.parametrize("world_size", [2, 3])
def test_each_key_once_per_epoch_ranks_disjoint_and_epochs_differ(class_folders, world_size):
    folder = class_folders["shuffled"]
    batches = plan(folder, batch_size=4, world_size=world_size, epochs=2)
    steps = {(b.epoch, b.rank) for b in batches}
    assert len({len([b for b in batches if (b.epoch, b.rank) == k]) for k in steps}) == 1  # equal steps
    for epoch in (0, 1):
        keys = [k for b in batches if b.epoch == epoch for k in b.keys]
        assert len(keys) == len(set(keys))  # at most once each, and no key on two ranks
    first = [b.keys for b in batches if b.epoch == 0]
    second = [b.keys for b in batches if b.epoch == 1]
    assert first != second


def test_the_plan_is_what_the_stream_delivers(class_folders):
    from beit_data.stream import StreamConfig, TrainStream
    from beit_data.views import stable_rng

    folder = class_folders["shuffled"]
    planned = plan(folder, batch_size=4, world_size=2, epochs=2)
    for rank in range(2):
        stream = TrainStream(StreamConfig(shards=str(folder / "shards"), tokens=str(folder / "tokens"), batch_size=4,
                                          num_threads=1), rank=rank, world_size=2)
        mine = [b for b in planned if b.rank == rank]
        it = stream.batches()
        delivered = [next(it) for _ in mine]
        it.close()
        assert [(b.epoch, b.step, b.keys) for b in delivered] == [(p.epoch, p.step, p.keys) for p in mine]
        assert all(v == stable_rng(0, "view", p.epoch, k).integers(2) for p in mine for k, v in zip(p.keys, p.views))


def test_cli_prints_text_and_json(class_folders):
    folder = class_folders["shuffled"]
    args = ["plan", "--shards", str(folder / "shards"), "--tokens", str(folder / "tokens"), "--batch-size", "4",
            "--world-size", "2", "--steps", "2"]
    result = run_cli(*args, "--json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["epoch"], r["step"], r["rank"]) for r in rows] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]
    assert rows == [b.as_dict() for b in plan(folder, batch_size=4, world_size=2, steps=2)]
    text = run_cli(*args, "--rank", "1")
    assert text.returncode == 0 and len(text.stdout.splitlines()) == 2
    key, view = text.stdout.split()[6].split("/")
    assert text.stdout.startswith("epoch 0  rank 1  step 0  ") and key == rows[1]["keys"][0]
    bad = run_cli(*args, "--rank", "2")
    assert bad.returncode != 0 and "--rank must be in [0, 2), got 2" in bad.stderr
    # 48 images in global batches of 40: one step an epoch, and the plan says what that leaves out.
    wide = invoke("plan", "--shards", folder / "shards", "--tokens", folder / "tokens", "--batch-size", "20",
                  "--world-size", "2", "--steps", "1")
    assert wide.exit_code == 0 and wide.stderr.startswith("plan: each epoch leaves out 8 of 48 tokenized images "
                                                          "(16.7%): an epoch is 1 global steps of 40 images")


def test_resume_reads_no_byte_before_its_position(class_folders):
    from beit_data.replay import OUTPUTS, ReplaySource, StreamConfig
    from beit_data.shard_index import read_index
    from beit_data.shards import expand_shards

    folder = class_folders["shuffled"]
    source = ReplaySource.open(StreamConfig(shards=str(folder / "shards"), tokens=str(folder / "tokens"),
                                            batch_size=4, mix_shards=4))
    sizes = {s.key: s.members["jpg"].size for shard in expand_shards(str(folder / "shards"))
             for s in read_index(shard)}
    steps = source.steps_per_epoch(0)
    assert steps == 12
    for step in (0, 5, steps - 1):
        resumed = source.at(0, step)
        batch = dict(zip(OUTPUTS, next(iter(resumed))))
        keys = [k.tobytes().decode() for k in batch["key"]]
        assert keys == next(source.at(0, step).plan()).keys
        # Only this batch's images were read (the next window may be loading, but reads nothing yet).
        assert resumed.bytes_read == sum(sizes[k] for k in keys)


def test_shards_without_an_index_read_the_same_batches(class_folders, tmp_path):
    import shutil

    import torch

    from beit_data.stream import StreamConfig, TrainStream

    folder = class_folders["shuffled"]
    shutil.copytree(folder / "shards", tmp_path / "shards", ignore=shutil.ignore_patterns("*.idx"))
    assert not list((tmp_path / "shards").glob("*.idx"))
    batches = []
    for shards in (folder / "shards", tmp_path / "shards"):
        it = TrainStream(StreamConfig(shards=str(shards), tokens=str(folder / "tokens"), batch_size=4,
                                      num_threads=1)).batches()
        batches.append(next(it))
        it.close()
    assert batches[0].keys == batches[1].keys and torch.equal(batches[0].images, batches[1].images)


def test_a_shard_with_no_tokenized_image_and_too_many_ranks(tmp_path, tiny_tokenizer):
    from helpers import jpeg_bytes, write_tar

    from beit_common import BeitDataError
    from beit_data.stream import StreamConfig, TrainStream
    from pipelines.tokenize_shards import TokenizeConfig, run_tokenize

    (tmp_path / "s").mkdir()
    write_tar(tmp_path / "s" / "a.tar", [("a0.jpg", b""), ("a1.jpg", jpeg_bytes((60, 50)))])  # both rejected
    write_tar(tmp_path / "s" / "b.tar", [(f"b{i}.jpg", jpeg_bytes((150, 130), seed=i)) for i in range(5)])
    run_tokenize(TokenizeConfig(shards=str(tmp_path / "s"), tokenizer=str(tiny_tokenizer), out=str(tmp_path / "t"),
                                views=1, device="cpu", progress=False))
    folder = tmp_path
    shards, tokens = str(folder / "s"), str(folder / "t")
    planned = list(run_plan(PlanConfig.from_flat(shards=shards, tokens=tokens, batch_size=2, epochs=2)))
    assert [len(b.keys) for b in planned] == [2, 2, 2, 2]
    it = TrainStream(StreamConfig(shards=shards, tokens=tokens, batch_size=2, num_threads=1)).batches()
    assert next(it).keys == planned[0].keys
    it.close()
    with pytest.raises(BeitDataError, match=r"the shards hold 5 tokenized images, fewer than one global batch of 6"):
        list(run_plan(PlanConfig.from_flat(shards=shards, tokens=tokens, batch_size=2, world_size=3)))


def test_a_global_step_holds_the_same_images_and_views_on_any_number_of_ranks(class_folders):
    """``plan --global-batch``: the ranks only split each global step; the union of their batches
    (and the view of each image) is the same on 1, 2 and 3 ranks, and on 1 rank with
    accumulation, whose steps hold all their micro-batches."""
    folder = class_folders["shuffled"]
    steps = {}
    for ranks, accum in ((1, 1), (2, 1), (3, 1), (1, 3), (2, 3)):
        batches = plan(folder, global_batch=6, world_size=ranks, grad_accum=accum, epochs=2, partitions=2,
                       mix_shards=2)
        by_step: dict = {}
        for b in batches:
            assert len(b.keys) == 6 // ranks  # the rank's share of the step: all its micro-batches
            by_step.setdefault((b.epoch, b.step), []).append((b.rank, list(zip(b.keys, b.views))))
        steps[ranks, accum] = {pos: [kv for _, part in sorted(parts) for kv in part] for pos, parts in by_step.items()}
    first = steps[1, 1]
    assert len(first) == 2 * (CLASSES * PER_CLASS // 6)
    for shape, found in steps.items():
        assert found == first, shape  # the same images, views and order within the step
    result = invoke("plan", "--shards", folder / "shards", "--tokens", folder / "tokens", "--global-batch", "6",
                    "--world-size", "4", "--partitions", "2", "--mix-shards", "2")
    assert result.exit_code == 1 and "a --global-batch of 6 does not split over 4 ranks x --grad-accum 1" in \
        result.stderr
