"""``beit-data shards`` from Parquet image datasets (the Hugging Face and img2dataset layouts),
and held-out sets by class."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import HF_NAMES, hf_parquet, invoke, jpeg_bytes, make_tree, samples

from beit_common import BeitDataError
from beit_data.shards import expand_shards
from pipelines.shards import ShardsConfig, run_shards


def test_hugging_face_parquet_becomes_labeled_shards_with_row_provenance(tmp_path):
    data = hf_parquet(tmp_path / "train-00000.parquet", rows=10, corrupt=(4,))
    result = invoke("shards", "--min-size", "0",
                    tmp_path / "train-00000.parquet", "--out", tmp_path / "out", "--maxcount", "4",
                    "--quiet")
    assert result.exit_code == 0, result.output
    assert "rejected train-00000.parquet:4: " in result.stderr
    written = samples(tmp_path / "out")
    assert len(written) == 9 and len(expand_shards(str(tmp_path / "out"))) == 3
    for s in written:
        meta = json.loads(s.members["json"])
        name, row = meta["source"].split(":")
        image, label = data[int(row)]
        assert name == "train-00000.parquet" and s.image == image and int(s.members["cls"]) == label
        assert meta["class"] == HF_NAMES[label]
    assert {s.image_ext for s in written} == {"jpg", "png", "webp"}
    report = json.loads((tmp_path / "out" / "shards.json").read_text())
    assert report["classes"] == HF_NAMES and report["images"] == 9
    rejects = json.loads((tmp_path / "out" / "rejects.json").read_text())
    assert [r["path"] for r in rejects] == ["train-00000.parquet:4"]
    # Shuffled: every row but the reject once, in an order other than the file's, the same every time.
    rows = [int(json.loads(s.members["json"])["source"].split(":")[1]) for s in written]
    assert sorted(rows) == [0, 1, 2, 3, 5, 6, 7, 8, 9] and rows != sorted(rows)
    again = run_shards(ShardsConfig(min_size=0, sources=[str(tmp_path / "train-00000.parquet")], out=tmp_path / "again",
                                    maxcount=4, progress=False))
    assert [json.loads(s.members["json"])["source"] for s in samples(tmp_path / "again")] == \
        [json.loads(s.members["json"])["source"] for s in written] and again.images == 9


def test_img2dataset_parquet_folders_and_globs_and_named_columns(tmp_path):
    folder = tmp_path / "i2d"
    folder.mkdir()
    for part in range(2):
        table = pa.table({"jpg": [jpeg_bytes((16, 12), seed=10 * part + i) for i in range(3)],
                          "url": [f"http://x/{part}/{i}" for i in range(3)], "key": [f"{part}{i}" for i in range(3)]})
        pq.write_table(table, folder / f"{part:05d}.parquet", row_group_size=2)
    for source in (folder, str(folder / "*.parquet")):
        out = tmp_path / f"out{len(str(source))}"
        result = run_shards(ShardsConfig(min_size=0, sources=[str(source)], out=out, shuffle=False, progress=False))
        written = samples(out)
        assert result.images == 6 and result.classes == [] and all("cls" not in s.members for s in written)
        assert [json.loads(s.members["json"])["source"] for s in written] == \
            [f"{p:05d}.parquet:{i}" for p in range(2) for i in range(3)]
    with pytest.raises(BeitDataError, match=r"00000.parquet has no column 'photo' \(`image_column`\); its columns: "
                                            r"jpg, url, key"):
        run_shards(ShardsConfig(min_size=0,
                                sources=[str(folder)], out=tmp_path / "x", image_column="photo", progress=False))
    # A label column by another name, with ids and no class names: the ids stay the dataset's.
    pq.write_table(pa.table({"img": [jpeg_bytes((16, 12), seed=i) for i in range(4)], "y": [2, 0, 2, 1]}),
                   tmp_path / "ids.parquet")
    result = run_shards(ShardsConfig(min_size=0,
                                     sources=[str(tmp_path / "ids.parquet")], out=tmp_path / "ids", shuffle=False,
                                     label_column="y", progress=False))
    assert result.classes == ["0", "1", "2"] and [int(s.members["cls"]) for s in samples(tmp_path / "ids")] == \
        [2, 0, 2, 1]


def test_a_parquet_file_is_never_taken_for_a_list_of_paths(tmp_path):
    hf_parquet(tmp_path / "data.bin", rows=2)  # Parquet under another name
    result = invoke("shards", "--min-size", "0", tmp_path / "data.bin", "--out", tmp_path / "out")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip() == f"Error: {tmp_path / 'data.bin'} is neither a text list of image paths nor a " \
        "Parquet file"
    (tmp_path / "folder").mkdir()
    hf_parquet(tmp_path / "folder" / "a.parquet", rows=2)
    assert invoke("shards", "--min-size", "0", tmp_path / "folder", "--out", tmp_path / "f", "--quiet").exit_code == 0
    assert len(samples(tmp_path / "f")) == 2
    mixed = invoke("shards", "--min-size", "0",
                   tmp_path / "folder", make_tree(tmp_path / "tree", 2, 2), "--out", tmp_path / "m")
    assert mixed.exit_code == 1 and "mix Parquet with image files" in mixed.stderr


@pytest.mark.parametrize("per_class, expected", [("2", 2), ("0.5", 3)])
def test_a_held_out_set_by_class_is_disjoint_and_shares_the_class_map(tmp_path, per_class, expected):
    tree = make_tree(tmp_path / "tree", classes=4, per_class=6)
    result = invoke("shards", "--min-size", "0",
                    tree, "--out", tmp_path / "train", "--holdout-per-class", per_class, "--quiet")
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp_path / 'train'} and {tmp_path / 'train-holdout'}" in result.stdout
    train, held = samples(tmp_path / "train"), samples(tmp_path / "train-holdout")
    by_class = {}
    for s in held:
        by_class.setdefault(json.loads(s.members["json"])["class"], []).append(s)
    assert sorted(by_class) == ["c0", "c1", "c2", "c3"] and all(len(v) == expected for v in by_class.values())
    assert len(train) == 24 - 4 * expected
    sources = [json.loads(s.members["json"])["source"] for s in train + held]
    assert len(set(sources)) == 24  # disjoint, and together every image
    assert len({s.key for s in train + held}) == 24  # a key names one image of the run
    reports = [json.loads((tmp_path / n / "shards.json").read_text()) for n in ("train", "train-holdout")]
    assert reports[0]["class_map"] == reports[1]["class_map"] and reports[1]["classes"] == ["c0", "c1", "c2", "c3"]
    assert all(p.name.startswith("holdout-") for p in expand_shards(str(tmp_path / "train-holdout")))
    # The same seed picks the same images; no class folders, no held-out set.
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(jpeg_bytes())
    flat = invoke("shards", "--min-size", "0", tmp_path / "flat", "--out", tmp_path / "f", "--holdout-per-class", "1")
    assert flat.exit_code == 1 and "--holdout-per-class needs labeled images" in flat.stderr


def test_a_held_out_set_from_parquet_rows(tmp_path):
    hf_parquet(tmp_path / "a.parquet", rows=12)
    result = run_shards(ShardsConfig(min_size=0,
                                     sources=[str(tmp_path / "a.parquet")], out=tmp_path / "t", holdout_per_class=1,
                                     holdout_out=tmp_path / "v", progress=False))
    held = samples(tmp_path / "v")
    assert result.holdout.images == 3 and sorted(int(s.members["cls"]) for s in held) == [0, 1, 2]
    assert result.images == 9


def test_labels_that_are_not_class_ids_and_a_held_out_folder_inside_out_are_refused(tmp_path):
    pq.write_table(pa.table({"image": [jpeg_bytes()], "label": ["cat"]}), tmp_path / "names.parquet")
    result = invoke("shards", "--min-size", "0", tmp_path / "names.parquet", "--out", tmp_path / "a")
    assert result.exit_code == 1 and result.stderr.strip() == (
        f"Error: {tmp_path / 'names.parquet'}: the label column 'label' holds string, not class ids (integers); name "
        "the class-id column with --label-column")
    tree = make_tree(tmp_path / "tree", 2, 3)
    inside = invoke("shards", "--min-size", "0",
                    tree, "--out", tmp_path / "b", "--holdout-per-class", "1", "--holdout-out",
                    tmp_path / "b" / "val")
    assert inside.exit_code == 1 and "--holdout-out" in inside.stderr and "is in --out" in inside.stderr
    assert not (tmp_path / "b").exists()  # nothing written
