import json
from pathlib import Path

import pytest
from helpers import class_tree, jpeg_bytes, make_tree, run_cli, write_tar

from beit_common import BeitDataError, Location
from beit_data.sample import sample_images
from beit_data.shard_index import read_index
from beit_data.shards import expand_shards, iter_samples, split_key
from pipelines.shards import ShardsConfig, class_map_digest, collect_images, run_shards


def written(shards) -> list:
    """Every sample of the shards, in write order."""
    return [s for shard in shards for s in iter_samples(shard)]


def sources_of(samples) -> list[str]:
    return [json.loads(s.members["json"])["source"] for s in samples]


def classes_of(samples) -> list[str]:
    return [json.loads(s.members["json"])["class"] for s in samples]


def test_round_trip_bytes_unchanged(sample_shards):
    shards = expand_shards(str(sample_shards))
    assert [p.name for p in shards] == ["sample-000000.tar", "sample-000001.tar"]
    samples = written(shards)
    originals = {str(p): p.read_bytes() for p in sample_images()}
    assert [s.key for s in samples] == [f"{i:09d}" for i in range(len(originals))]
    # The fixture's shards are shuffled: each sample's .json member says which file it holds.
    assert sorted(sources_of(samples)) == sorted(originals)
    assert [s.image for s in samples] == [originals[src] for src in sources_of(samples)]
    assert all(s.image_ext == "jpg" for s in samples)


def test_dali_cpu_reader_reads_shards_with_idx(sample_shards):
    from nvidia.dali import fn, pipeline_def

    shards = expand_shards(str(sample_shards))
    expected = [(s.key, s.image) for shard in shards for s in iter_samples(shard)]

    @pipeline_def(batch_size=len(expected), num_threads=1, device_id=None)
    def reader():
        image = fn.readers.webdataset(
            paths=[str(p) for p in shards], index_paths=[str(p.sibling(".idx")) for p in shards],
            ext=["jpg;jpeg;png;webp"], missing_component_behavior="error",
        )
        return image, fn.get_property(image, key="source_info")

    pipe = reader()
    pipe.build()
    images, infos = pipe.run()
    got = []
    for i in range(len(expected)):
        member = bytes(infos.at(i)).decode().rsplit(":", 1)[1]
        got.append((split_key(member)[0], bytes(images.at(i))))
    assert got == expected


def test_brace_glob_and_directory_specs(sample_shards):
    by_brace = expand_shards(f"{sample_shards}/sample-{{000000..000001}}.tar")
    by_glob = expand_shards(f"{sample_shards}/sample-*.tar")
    by_dir = expand_shards(str(sample_shards))
    assert by_brace == by_glob == by_dir
    assert len(by_brace) == 2
    with pytest.raises(BeitDataError, match="shard not found"):
        expand_shards(f"{sample_shards}/sample-{{000000..000002}}.tar")
    with pytest.raises(BeitDataError, match="matches no .tar"):
        expand_shards(f"{sample_shards}/nothing-*.tar")


def test_bad_files_become_rejects_and_the_rest_is_written(tmp_path):
    src = tmp_path / "images"
    src.mkdir()
    good = jpeg_bytes(seed=1)
    (src / "a_good.jpg").write_bytes(good)
    (src / "b_empty.jpg").write_bytes(b"")
    (src / "c_truncated.jpg").write_bytes(good[: len(good) // 2])
    (src / "d_good.png").write_bytes(jpeg_bytes(seed=2))  # a JPEG named .png keeps its JPEG type
    (src / "e_notes.txt").write_text("not an image")
    result = run_shards(ShardsConfig(min_size=0, sources=[src], out=tmp_path / "out", shuffle=False, progress=False))
    assert result.images == 2
    reasons = {Path(r.key).name: r.reason for r in result.rejects}
    assert set(reasons) == {"b_empty.jpg", "c_truncated.jpg", "e_notes.txt"}
    assert "empty" in reasons["b_empty.jpg"]
    assert "truncated" in reasons["c_truncated.jpg"]
    assert "not a decodable image" in reasons["e_notes.txt"]
    samples = list(iter_samples(result.shards[0]))
    assert [s.image for s in samples] == [good, jpeg_bytes(seed=2)]
    assert [s.image_ext for s in samples] == ["jpg", "jpg"]
    on_disk = json.loads((tmp_path / "out" / "rejects.json").read_text())
    assert {Path(r["path"]).name for r in on_disk} == set(reasons)


def test_image_folder_tree_writes_cls_and_classes_json(tmp_path):
    for cls, seeds in {"dog": [1, 2], "cat": [3]}.items():
        (tmp_path / "tree" / cls).mkdir(parents=True)
        for s in seeds:
            (tmp_path / "tree" / cls / f"{s}.jpg").write_bytes(jpeg_bytes(seed=s))
    result = run_shards(ShardsConfig(min_size=0, sources=[tmp_path / "tree"], out=tmp_path / "out", maxcount=2,
                                     shuffle=False, progress=False))
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == ["cat", "dog"]
    samples = [s for shard in result.shards for s in iter_samples(shard)]
    assert [s.members["cls"] for s in samples] == [b"0", b"1", b"1"]
    assert len(result.shards) == 2
    assert all(p.with_suffix(".idx").exists() for p in result.shards)


def test_default_order_is_a_seeded_permutation_not_class_sorted(tmp_path):
    tree = make_tree(tmp_path / "tree")
    listing = [item.source for item in collect_images(Location(tree))]

    def order(seed: int | None, out: str) -> list[str]:
        extra = {} if seed is None else {"seed": seed}
        return sources_of(written(run_shards(ShardsConfig(min_size=0, sources=[tree], out=tmp_path / out, maxcount=7,
                                                          progress=False, **extra)).shards))

    default = order(None, "default")
    assert sorted(default) == sorted(listing) and len(default) == 24
    assert default != listing
    classes = [src.split("/")[0] for src in default]
    assert classes != sorted(classes)
    assert order(0, "again") == default
    assert order(1, "other") != default


def test_no_shuffle_keeps_the_listing_order(tmp_path):
    tree = make_tree(tmp_path / "tree")
    result = run_shards(ShardsConfig(min_size=0,
                                     sources=[tree], out=tmp_path / "out", shuffle=False, seed=5, progress=False))
    samples = written(result.shards)
    assert sources_of(samples) == [item.source for item in collect_images(Location(tree))]
    assert classes_of(samples) == sorted(classes_of(samples))
    assert result.summary()["shuffled"] is False


def test_keys_count_up_in_write_order_across_shards(tmp_path):
    result = run_shards(ShardsConfig(min_size=0,
                                     sources=[make_tree(tmp_path / "tree")], out=tmp_path / "out", maxcount=5,
                                     progress=False))
    per_shard = [[s.key for s in iter_samples(shard)] for shard in result.shards]
    assert [len(keys) for keys in per_shard] == [5, 5, 5, 5, 4]
    assert [k for keys in per_shard for k in keys] == [f"{i:09d}" for i in range(24)]


def test_json_member_traces_each_key_to_its_file_and_class(tmp_path):
    tree = make_tree(tmp_path / "tree", classes=3, per_class=2)
    result = run_shards(ShardsConfig(min_size=0, sources=[tree], out=tmp_path / "out", progress=False))
    classes = json.loads((tmp_path / "out" / "classes.json").read_text())
    for sample in written(result.shards):
        meta = json.loads(sample.members["json"])
        assert set(meta) == {"source", "class", "class_map"}
        assert meta["class_map"] == json.loads((tmp_path / "out" / "shards.json").read_text())["class_map"]
        assert meta["source"] == f"{meta['class']}/{Path(meta['source']).name}"  # relative to the tree
        assert sample.image == (tree / meta["source"]).read_bytes()
        assert classes[int(sample.members["cls"])] == meta["class"]


def test_json_member_of_a_list_source_is_the_path_as_listed(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(jpeg_bytes(seed=1))
    absolute = tmp_path / "b.jpg"
    absolute.write_bytes(jpeg_bytes(seed=2))
    listing = tmp_path / "list.txt"
    listing.write_text(f"imgs/a.jpg\n\n{absolute}\n")
    result = run_shards(ShardsConfig(min_size=0,
                                     sources=[listing], out=tmp_path / "out", shuffle=False, progress=False))
    samples = written(result.shards)
    assert [json.loads(s.members["json"]) for s in samples] == [{"source": "imgs/a.jpg"}, {"source": str(absolute)}]
    assert [s.image for s in samples] == [jpeg_bytes(seed=1), jpeg_bytes(seed=2)]
    assert all("cls" not in s.members for s in samples)


def test_shards_json_records_the_order_and_reports_are_atomic(tmp_path):
    out = tmp_path / "out"
    result = run_shards(ShardsConfig(min_size=0, sources=[make_tree(tmp_path / "tree")], out=out, maxcount=10, seed=3,
                                     progress=False))
    assert json.loads((out / "shards.json").read_text()) == {
        "shuffle": True, "seed": 3, "images": 24,
        "shards": ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"],
        "classes": ["c0", "c1", "c2", "c3"], "class_map": class_map_digest(["c0", "c1", "c2", "c3"]),
    }
    assert [p.name for p in result.shards] == json.loads((out / "shards.json").read_text())["shards"]
    assert result.summary() == {"images": 24, "shards": 3, "rejects": 0, "shuffled": True}
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("shard-")) == [
        "classes.json", "rejects.json", "shards.json"]  # no temporary files left behind


def test_cli_shards_shuffles_by_default_and_no_shuffle_keeps_order(tmp_path):
    tree = make_tree(tmp_path / "tree")
    listing = [item.source for item in collect_images(Location(tree))]
    plain = run_cli("shards", "--min-size", "0", str(tree), "--out", str(tmp_path / "plain"), "--no-shuffle",
                    "--quiet")
    assert plain.returncode == 0, plain.stderr
    assert "images 24, shards 1, rejects 0, shuffled False" in plain.stdout
    assert sources_of(written(expand_shards(str(tmp_path / "plain")))) == listing
    default = run_cli("shards", "--min-size", "0", str(tree), "--out", str(tmp_path / "default"), "--quiet")
    assert default.returncode == 0, default.stderr
    assert "shuffled True" in default.stdout
    shuffled = sources_of(written(expand_shards(str(tmp_path / "default"))))
    assert shuffled == sources_of(written(run_shards(ShardsConfig(
        sources=[tree], out=tmp_path / "api", min_size=0, progress=False)).shards))
    assert shuffled != listing
    assert json.loads((tmp_path / "default" / "shards.json").read_text())["seed"] == 0
    seeded = run_cli("shards", "--min-size", "0",
                     str(tree), "--out", str(tmp_path / "seeded"), "--seed", "9", "--quiet")
    assert seeded.returncode == 0, seeded.stderr
    assert json.loads((tmp_path / "seeded" / "shards.json").read_text())["seed"] == 9


def test_img2dataset_layout_reads_unchanged(tmp_path):
    folder = tmp_path / "img2dataset"
    folder.mkdir()
    members = []
    for i in range(3):
        key = f"00000{i:04d}"
        members += [(f"{key}.jpg", jpeg_bytes(seed=i)), (f"{key}.txt", b"a caption"),
                    (f"{key}.json", json.dumps({"key": key}).encode())]
    write_tar(folder / "00000.tar", members)
    (folder / "00000.parquet").write_bytes(b"PAR1")
    (folder / "00000_stats.json").write_text("{}")
    shards = expand_shards(str(folder))
    assert shards == [str(folder / "00000.tar")]
    samples = list(iter_samples(shards[0]))
    assert [s.key for s in samples] == ["000000000", "000000001", "000000002"]
    assert all(set(s.members) == {"jpg", "txt", "json"} for s in samples)


def test_missing_image_member_and_cut_tar_are_rejects(tmp_path):
    good = jpeg_bytes(seed=5)
    path = write_tar(tmp_path / "x.tar", [("a.jpg", good), ("b.txt", b"caption only"),
                                          ("c.jpg", good), ("d.jpg", good * 3)])
    data = path.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: data.index(good * 3) + 100])
    rejects = []
    assert [s.key for s in iter_samples(path, rejects)] == ["a", "c", "d"]
    assert [(r.key, "no image member" in r.reason) for r in rejects] == [("b", True)]
    rejects = []
    assert [s.key for s in iter_samples(cut, rejects)] == ["a", "c"]
    assert [r.key for r in rejects] == ["b", "d"]
    assert "cut off" in rejects[-1].reason


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    missing = run_cli("shards", "--min-size", "0", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert missing.returncode != 0
    assert "image source not found" in missing.stderr
    assert "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    blocker = tmp_path / "file"
    blocker.write_text("x")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(jpeg_bytes())
    unwritable = run_cli("shards", "--min-size", "0", str(tmp_path / "imgs"), "--out", str(blocker / "sub"))
    assert unwritable.returncode != 0
    assert "cannot write to output folder" in unwritable.stderr
    assert "Traceback" not in unwritable.stderr
    assert len(unwritable.stderr.strip().splitlines()) == 1


def test_cli_help_and_version():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "shards" in result.stdout and "sample" in result.stdout
    assert run_cli("-h").stdout == result.stdout
    version = run_cli("--version")
    assert version.returncode == 0 and "beit-data, version 0.1.0" in version.stdout


def test_cli_sample_writes_shards(tmp_path):
    result = run_cli("sample", "--out", str(tmp_path / "s"))
    assert result.returncode == 0, result.stderr
    assert "images 14, shards 2, rejects 0" in result.stdout
    assert sorted(p.name for p in (tmp_path / "s").glob("*.idx")) == ["sample-000000.idx", "sample-000001.idx"]


def test_one_index_from_idx_files_or_tar_headers(sample_shards, tmp_path):
    from beit_data.shard_index import index_count, index_path, read_index, scan_index

    for shard in sorted(map(Location, sample_shards.glob("*.tar"))):
        from_idx = read_index(shard)
        assert from_idx == scan_index(shard)  # the .idx says what the headers say
        assert index_count(shard) == len(from_idx)
        data = shard.path.read_bytes()
        for sample, read in zip(from_idx, iter_samples(shard)):
            offset, size, name = sample.members[sample.image_ext]
            assert sample.key == read.key and data[offset:offset + size] == read.image
            assert name == f"{sample.key}.{sample.image_ext}"
    bare = tmp_path / sample_shards.name
    bare.mkdir()
    shard = Location(bare / "x.tar")
    shard.path.write_bytes((sample_shards / "sample-000000.tar").read_bytes())
    assert not Path(index_path(shard)).exists() and index_count(shard) is None
    assert read_index(shard) == read_index(Location(sample_shards / "sample-000000.tar"))


def test_every_reader_counts_the_same_members(tmp_path):
    from beit_data.shard_index import read_index, write_index

    image = jpeg_bytes(seed=1)
    shard = Location(write_tar(tmp_path / "m.tar", [("__meta__.json", b"{}"), (".hidden.jpg", image), ("a.jpg", image),
                                                    ("a.cls", b"3"), ("dir/b.JPG", image), ("dir/.c.jpg", image)]))
    read = [(s.key, sorted(s.members)) for s in iter_samples(shard)]
    assert read == [("a", ["cls", "jpg"]), ("dir/b", ["jpg"])]
    assert [(s.key, sorted(s.members)) for s in read_index(shard)] == read  # tar headers
    write_index(shard)
    assert [(s.key, sorted(s.members)) for s in read_index(shard)] == read  # the .idx
    assert read_index(shard)[1].members["jpg"].name == "dir/b.JPG"


def test_a_damaged_index_is_a_clear_error(sample_shards, tmp_path):
    from beit_data.shard_index import read_index

    shard = Location(tmp_path / "x.tar")
    shard.path.write_bytes((sample_shards / "sample-000000.tar").read_bytes())
    (tmp_path / "x.idx").write_text("v1.2 9\njpg 512 10\n")
    with pytest.raises(BeitDataError, match=r"x.idx is not a DALI index"):
        read_index(shard)


def test_an_index_with_meta_members_follows_the_member_rule(tmp_path):
    import tarfile

    from beit_data.shard_index import read_index, scan_index

    shard = Location(write_tar(tmp_path / "m.tar", [("__meta__.json", b"{}"), ("a.jpg", jpeg_bytes(seed=1))]))
    with tarfile.open(shard) as tar:
        meta, a = tar.getmembers()
    # As an indexer that lists every member writes it.
    (tmp_path / "m.idx").write_text(f"v1.2 2\njson {meta.offset_data} {meta.size} __meta__.json\n"
                                    f"jpg {a.offset_data} {a.size} a.jpg\n")
    assert read_index(shard) == scan_index(shard) and [s.key for s in read_index(shard)] == ["a"]


def test_a_class_map_is_recorded_and_reused_so_ids_mean_the_same_classes(tmp_path):
    train = run_shards(ShardsConfig(min_size=0, sources=[class_tree(tmp_path / "train", {"cat": 2, "dog": 2})],
                                    out=tmp_path / "train_shards", progress=False))
    recorded = json.loads((tmp_path / "train_shards" / "shards.json").read_text())
    assert recorded["classes"] == train.classes == ["cat", "dog"] and len(recorded["class_map"]) == 16
    # Alone, a set with a class the training set lacks numbers the classes its own way ...
    alone = run_shards(ShardsConfig(min_size=0, sources=[class_tree(tmp_path / "val", {"ant": 1, "dog": 1})],
                                    out=tmp_path / "val_alone", progress=False))
    assert alone.classes == ["ant", "dog"]
    # ... with the training set's map, an id means the same class, and a class it lacks is refused.
    (tmp_path / "val" / "ant").rename(tmp_path / "ant")
    reused = run_shards(ShardsConfig(min_size=0, sources=[tmp_path / "val"], out=tmp_path / "val_shards",
                                     classes=tmp_path / "train_shards" / "shards.json", progress=False))
    assert reused.classes == ["cat", "dog"]
    sample = written(reused.shards)[0]
    assert sample.members["cls"] == b"1" and json.loads(sample.members["json"])["class_map"] == recorded["class_map"]
    (tmp_path / "ant").rename(tmp_path / "val" / "ant")
    with pytest.raises(BeitDataError, match=r"class ant is not in the class map .*classes.json \(1 such\)"):
        run_shards(ShardsConfig(min_size=0, sources=[tmp_path / "val"], out=tmp_path / "v2",
                                classes=tmp_path / "train_shards" / "classes.json", progress=False))
    (tmp_path / "bad.json").write_text('{"seed": 0}')
    with pytest.raises(BeitDataError, match="bad.json holds no class map"):
        run_shards(ShardsConfig(min_size=0,
                                sources=[tmp_path / "val"], out=tmp_path / "v3", classes=tmp_path / "bad.json",
                                progress=False))


def test_a_folder_holding_an_earlier_run_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    run_shards(ShardsConfig(min_size=0, sources=[make_tree(tmp_path / "big")], out=out, maxcount=3, progress=False))
    assert len(expand_shards(str(out))) == 8
    small = class_tree(tmp_path / "small", {"a": 2})
    with pytest.raises(BeitDataError, match=r"out is not empty \(19 files, such as classes.json\): every --shards "
                                            r".* would read what is there too; pass `overwrite`"):
        run_shards(ShardsConfig(min_size=0, sources=[small], out=out, progress=False))
    assert len(expand_shards(str(out))) == 8  # nothing was lost
    run_shards(ShardsConfig(min_size=0, sources=[small], out=out, overwrite=True, progress=False))
    assert [p.name for p in expand_shards(str(out))] == json.loads((out / "shards.json").read_text())["shards"] \
        == ["shard-000000.tar"]
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "rejects.json", "shard-000000.idx",
                                                     "shard-000000.tar", "shards.json"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(BeitDataError, match="holds notes.txt, which no shards run wrote"):
        run_shards(ShardsConfig(min_size=0, sources=[small], out=out, overwrite=True, progress=False))
    assert (out / "notes.txt").read_text() == "mine" and (out / "shard-000000.tar").exists()


def test_a_source_whose_files_are_all_rejected_leaves_no_shard_and_writes_why(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "src" / "b.jpg").symlink_to(tmp_path / "gone.jpg")  # a link to nothing is listed, and rejected
    with pytest.raises(BeitDataError, match=r"no image was written: all 2 files were rejected \(first: .*a.jpg: "
                                            r"not a decodable image\); every reason is in .*rejects.json$"):
        run_shards(ShardsConfig(min_size=0, sources=[tmp_path / "src"], out=tmp_path / "out", progress=False))
    assert not list((tmp_path / "out").glob("*.tar")) and not list((tmp_path / "out").glob(".*"))
    reasons = {Path(r["path"]).name: r["reason"] for r in json.loads((tmp_path / "out" / "rejects.json").read_text())}
    assert reasons == {"a.jpg": "not a decodable image", "b.jpg": f"broken symbolic link to {tmp_path / 'gone.jpg'}"}


def test_huge_images_are_rejected_as_decompression_bombs_unless_max_pixels_allows(tmp_path):
    from PIL import Image

    (tmp_path / "src").mkdir()
    Image.new("1", (14000, 14000)).save(tmp_path / "src" / "huge.png")
    (tmp_path / "src" / "small.jpg").write_bytes(jpeg_bytes((32, 32)))
    result = run_shards(ShardsConfig(min_size=0, sources=[tmp_path / "src"], out=tmp_path / "a", progress=False))
    assert result.images == 1 and [r.reason for r in result.rejects] == [
        "14000x14000 is 196,000,000 pixels, over the limit of 178,956,970 that guards against decompression bombs; "
        "raise it with --max-pixels"]
    assert run_shards(ShardsConfig(min_size=0, sources=[tmp_path / "src"], out=tmp_path / "b", max_pixels=200_000_000,
                                   progress=False)).images == 2


@pytest.mark.parametrize("command", ["shards", "sample"])
def test_outputs_shards_cannot_be_written_to_are_refused_in_one_line(tmp_path, command):
    from helpers import invoke

    source = [] if command == "sample" else [str(make_tree(tmp_path / "tree", classes=1, per_class=1))]
    for out, message in (("s3://bucket/shards", "shards is written to a local path only"),
                         ("pipe:cat > x.tar", "shards is not written through a pipe: command")):
        result = invoke(command, *source, "--out", out)
        assert result.exit_code == 1 and message in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and result.exception.__class__ is SystemExit
    assert not (tmp_path / "s3:").exists() and not list(tmp_path.glob("pipe*"))


def test_index_refuses_member_names_an_index_cannot_hold(tmp_path):
    from helpers import invoke

    shard = write_tar(tmp_path / "s.tar", [("my photo.jpg", jpeg_bytes()), ("b.jpg", jpeg_bytes(seed=2))])
    result = invoke("index", "--shards", str(shard), "--quiet")
    assert result.exit_code == 1 and not (tmp_path / "s.idx").exists()
    assert result.stderr.strip() == (f"Error: {shard}: member 'my photo.jpg' has white space in its name, which a DALI "
                                     "index cannot hold; rename the members (beit-data reads the shard from its tar "
                                     "headers meanwhile)")
    assert [s.key for s in read_index(Location(shard))] == ["my photo", "b"]
