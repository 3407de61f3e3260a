"""``beit-data shards`` at its edges (issue 33): overlapping sources, held-out requests larger
than a class, ``--overwrite`` that keeps the earlier run until the new one is complete, damaged
Parquet and a full disk in one line with nothing half-written, folders that mix class folders
and top-level images, and tokenize's refusal of a folder an interrupted run left."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import hf_parquet, invoke, jpeg_bytes, make_tree, samples
from hypothesis import given, settings
from hypothesis import strategies as st

from beit_common import BeitDataError, Location, folder_lock
from beit_data.shards import check_finished_folders, expand_shards
from pipelines import shards as shards_module
from pipelines.shard_sources import held_out
from pipelines.shards import ShardsConfig, run_shards


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every entry of ``folder`` (hidden ones too) with its bytes: what a failed run must not change."""
    return {p.name: p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(folder.iterdir())}


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr.strip()


def earlier_run(tmp_path: Path, **options) -> tuple[Path, dict[str, bytes]]:
    """A complete earlier run in ``tmp_path/out`` (3 shards of a 3 x 4 tree) and what it holds."""
    out = tmp_path / "out"
    run_shards(ShardsConfig(min_size=0,
                            sources=[make_tree(tmp_path / "old", 3, 4)], out=out, maxcount=5, progress=False,
                            **options))
    return out, snapshot(out)


# -- item 3: overlapping sources, held-out requests larger than a class ----------------------------------------------

def overlap_case(tmp_path: Path, kind: str) -> tuple[list[str], str]:
    """Sources that reach one file twice, and the file the refusal must name."""
    tree = make_tree(tmp_path / "cls", 2, 3)
    first = tree / "c0" / "0.jpg"
    if kind == "folder and folder/":  # the reproduction: every image twice
        return [str(tree), f"{tree}/"], "c0/0.jpg"
    if kind == "folder and a list naming a file in it":
        (tmp_path / "list.txt").write_text(f"{tree / 'c1' / '2.jpg'}\n")
        return [str(tree), str(tmp_path / "list.txt")], "c1/2.jpg"
    if kind == "folder and a link to it":
        (tmp_path / "link").symlink_to(tree, target_is_directory=True)
        return [str(tree), str(tmp_path / "link")], "c0/0.jpg"
    if kind == "a list naming one file by two spellings":
        (tmp_path / "list.txt").write_text(f"cls/c0/0.jpg\n{tmp_path}/cls/c1/../c0/0.jpg\n")
        return [str(tmp_path / "list.txt")], "c0/0.jpg"
    if kind == "a hard link beside its file":
        flat = tmp_path / "flat"
        flat.mkdir()
        os.link(first, flat / "same.jpg")
        (flat / "other.jpg").write_bytes(jpeg_bytes(seed=99))
        return [str(tree), str(flat)], "same.jpg"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["folder and folder/", "folder and a list naming a file in it",
                                  "folder and a link to it", "a list naming one file by two spellings",
                                  "a hard link beside its file"])
def test_sources_that_reach_one_file_twice_are_refused_in_one_line(tmp_path, kind):
    sources, named = overlap_case(tmp_path, kind)
    result = invoke("shards", "--min-size", "0", *sources, "--out", tmp_path / "out", "--holdout-per-class", "1")
    error = one_line_error(result)
    assert " is listed twice: as " in error and "the sources overlap: give each image once" in error, error
    assert error.split(" is listed twice")[0].endswith(named), error
    assert not (tmp_path / "out").exists() and not (tmp_path / "out-holdout").exists()


def test_the_overlap_reproduction_counts_every_twice_listed_file(tmp_path):
    tree = make_tree(tmp_path / "cls", 3, 2)
    error = one_line_error(invoke("shards", "--min-size", "0", tree, f"{tree}/", "--out", tmp_path / "o"))
    assert error == (f"Error: {tree}/c0/0.jpg is listed twice: as c0/0.jpg of source {tree} and as c0/0.jpg of source "
                     f"{tree}/ (6 files are); the sources overlap: give each image once")
    # Sources that do not overlap are written whole. Two files that hold the same bytes are two
    # files (make_tree draws the same pixels for c0/0.jpg of both trees): the rule is about files.
    other = make_tree(tmp_path / "more", 1, 5)
    result = run_shards(ShardsConfig(min_size=0, sources=[tree, other], out=tmp_path / "both", progress=False))
    assert result.images == 11 and not result.rejects
    assert len({s.image for s in samples(tmp_path / "both")}) == 6


def test_a_parquet_file_named_twice_is_refused(tmp_path):
    (tmp_path / "pq").mkdir()
    hf_parquet(tmp_path / "pq" / "a.parquet", rows=4)
    error = one_line_error(invoke("shards", "--min-size", "0",
                                  tmp_path / "pq", tmp_path / "pq" / "a.parquet", "--out", tmp_path / "o"))
    assert error.startswith(f"Error: {tmp_path / 'pq' / 'a.parquet'} is named twice by the sources ")
    assert error.endswith("the sources overlap: give each file once") and not (tmp_path / "o").exists()


def test_a_held_out_request_larger_than_half_a_class_is_capped_with_a_warning(tmp_path):
    # The reproduction: 100 a class from classes of 10 held out 27 and trained on 3, in silence.
    tree = make_tree(tmp_path / "cls", 3, 10)
    result = invoke("shards", "--min-size", "0", tree, "--out", tmp_path / "t", "--holdout-per-class", "100", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == (
        "shards: warning: --holdout-per-class 100 would leave 3 of 3 classes with fewer training than held-out "
        "images (such as c0, which has 10): held out half of each of those, rounded down (15 images instead of "
        "300), 15 in all")
    assert "images 15, shards 1, rejects 0, shuffled True, holdout_images 15, holdout_shards 1" in result.stdout
    train = [json.loads(s.members["json"]) for s in samples(tmp_path / "t")]
    held = [json.loads(s.members["json"]) for s in samples(tmp_path / "t-holdout")]
    for c in ("c0", "c1", "c2"):
        assert sum(m["class"] == c for m in train) == sum(m["class"] == c for m in held) == 5
    assert not {m["source"] for m in train} & {m["source"] for m in held}
    # A request every class can give is taken as it is, without a word.
    quiet = invoke("shards", "--min-size", "0", tree, "--out", tmp_path / "u", "--holdout-per-class", "5", "--quiet")
    assert quiet.exit_code == 0 and quiet.stderr == "" and "holdout_images 15" in quiet.stdout


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=7),
       per_class=st.one_of(st.integers(1, 60).map(float), st.floats(0.01, 0.99)), seed=st.integers(0, 2**31))
def test_no_class_gives_more_held_out_images_than_it_keeps(sizes, per_class, seed):
    labels = [f"k{i}" for i, n in enumerate(sizes) for _ in range(n)]
    chosen, warning = held_out(labels, per_class, seed)
    capped = 0
    for i, n in enumerate(sizes):
        held = sum(labels[j] == f"k{i}" for j in chosen)
        want = int(per_class) if per_class >= 1 else max(1, round(per_class * n))
        assert held <= n - held  # training keeps at least as many as are held out
        assert held == min(want, n // 2)
        capped += held < want
    assert (warning is None) == (capped == 0)
    if warning:
        assert f" would leave {capped} of {len(sizes)} classes with fewer training than held-out images" in warning
        assert warning.endswith(f", {len(chosen)} in all")
    assert held_out(labels, per_class, seed) == (chosen, warning)  # drawn from the seed alone


# -- item 5: --overwrite replaces the earlier run only once the new one is complete ----------------------------------

def test_overwrite_with_a_bad_holdout_out_keeps_the_earlier_shards(tmp_path):
    # The reproduction: the earlier shards were deleted, then the command refused (5 files to 0).
    out, before = earlier_run(tmp_path)
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "notes.txt").write_text("mine")
    tree = make_tree(tmp_path / "new", 2, 3)
    error = one_line_error(invoke("shards", "--min-size", "0",
                                  tree, "--out", out, "--overwrite", "--holdout-per-class", "1",
                                  "--holdout-out", tmp_path / "val"))
    assert error == (f"Error: {tmp_path / 'val'} holds notes.txt, which no shards run wrote; --overwrite replaces "
                     "shards and their reports only: choose another folder")
    assert snapshot(out) == before and len(before) == 9
    assert snapshot(tmp_path / "val") == {"notes.txt": b"mine"}
    # A held-out folder that is a file: refused before the earlier run is touched.
    (tmp_path / "file").write_text("x")
    result = invoke("shards", "--min-size", "0",
                    tree, "--out", out, "--overwrite", "--holdout-per-class", "1", "--holdout-out",
                    tmp_path / "file")
    assert result.exit_code == 2 and f"Directory '{tmp_path / 'file'}' is a file" in result.stderr
    assert snapshot(out) == before
    # A held-out folder inside the earlier run: refused, and the earlier run kept.
    error = one_line_error(invoke("shards", "--min-size", "0",
                                  tree, "--out", out, "--overwrite", "--holdout-per-class", "1",
                                  "--holdout-out", out / "val"))
    assert "--holdout-out" in error and "is in --out" in error and snapshot(out) == before


def test_a_run_whose_every_file_is_rejected_keeps_the_earlier_run(tmp_path):
    out, before = earlier_run(tmp_path)
    (tmp_path / "bad").mkdir()
    for name in ("x.jpg", "y.png"):
        (tmp_path / "bad" / name).write_bytes(b"not an image")
    error = one_line_error(invoke("shards", "--min-size", "0",
                                  tmp_path / "bad", "--out", out, "--overwrite", "--no-shuffle", "--quiet"))
    assert error == (f"Error: no image was written: all 2 files were rejected (first: {tmp_path / 'bad' / 'x.jpg'}: "
                     f"not a decodable image); the earlier shards in {out} are kept; write into an empty folder for "
                     "every reason in rejects.json")
    assert snapshot(out) == before


class Interrupted(BaseException):
    """What a Ctrl-C raises in the middle of a run (a ``BaseException``, like ``KeyboardInterrupt``)."""


@pytest.mark.parametrize("fail_at_item", [0, 4, 11])
def test_a_run_interrupted_while_writing_leaves_each_folder_as_it_was(tmp_path, monkeypatch, fail_at_item):
    out, before = earlier_run(tmp_path)
    real = shards_module.read_image
    calls = []

    def read_image(*args):
        calls.append(1)
        if len(calls) > fail_at_item:
            raise Interrupted
        return real(*args)

    monkeypatch.setattr(shards_module, "read_image", read_image)
    tree = make_tree(tmp_path / "new", 3, 4)
    for target, overwrite in ((out, True), (tmp_path / "fresh" / "deep", False)):
        calls.clear()
        with pytest.raises(Interrupted):
            run_shards(ShardsConfig(min_size=0,
                                    sources=[tree], out=target, maxcount=3, overwrite=overwrite, progress=False,
                                    holdout_per_class=1, holdout_out=tmp_path / "held"))
    assert snapshot(out) == before  # no work folder left either
    assert not (tmp_path / "fresh").exists() and not (tmp_path / "held").exists()


def test_a_swap_that_fails_half_way_is_rolled_back(tmp_path, monkeypatch):
    out, before = earlier_run(tmp_path)
    (tmp_path / "held").mkdir()
    run_shards(ShardsConfig(min_size=0,
                            sources=[make_tree(tmp_path / "h", 2, 2)], out=tmp_path / "held", progress=False))
    held_before = snapshot(tmp_path / "held")
    real, renames = os.rename, []

    def rename(source, target):
        renames.append(Path(target).name)
        if len(renames) == 16 + 3:  # the training set is swapped in (9 aside, 7 in); the held-out one fails
            raise OSError(errno.EIO, "Input/output error")
        real(source, target)

    monkeypatch.setattr(os, "rename", rename)
    error = pytest.raises(BeitDataError, run_shards, ShardsConfig(
        min_size=0, sources=[make_tree(tmp_path / "new", 2, 6)], out=out, maxcount=4, overwrite=True,
        holdout_per_class=2, holdout_out=tmp_path / "held", progress=False)).value
    assert str(error) == (f"cannot move the new shards into {tmp_path / 'held'}: Input/output error; it holds what it "
                          "held before")
    assert snapshot(out) == before and snapshot(tmp_path / "held") == held_before


def test_a_killed_runs_work_folder_is_cleared_and_a_live_one_refused(tmp_path):
    out, before = earlier_run(tmp_path)
    stale = out / ".beit-data-shards-4242"
    (stale / "earlier").mkdir(parents=True)
    (stale / "shard-000000.tar").write_bytes(b"half")
    tree = make_tree(tmp_path / "new", 1, 2)
    with folder_lock(stale, "beit-data shards"):  # a run that is still writing into the folder
        with pytest.raises(BeitDataError, match=r"\.beit-data-shards-4242 is in use by another beit-data run "
                                                r"\(beit-data shards, pid \d+ on "):
            run_shards(ShardsConfig(min_size=0, sources=[tree], out=out, overwrite=True, progress=False))
    assert {n: b for n, b in snapshot(out).items() if not n.startswith(".")} == before
    # Once that run is gone its folder is left-over work, not an earlier run: no --overwrite is needed.
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".beit-data-shards-4243").mkdir()
    result = run_shards(ShardsConfig(min_size=0, sources=[tree], out=tmp_path / "empty", progress=False))
    assert result.images == 2 and sorted(p.name for p in (tmp_path / "empty").iterdir()) == [
        "classes.json", "rejects.json", "shard-000000.idx", "shard-000000.tar", "shards.json"]


def test_every_moment_of_the_swap_is_a_whole_set_or_refused_by_tokenize(tmp_path, monkeypatch):
    out, _ = earlier_run(tmp_path, prefix="old")
    real, moments = os.rename, []

    def refused(tars: list[str]) -> bool:
        try:
            check_finished_folders([Location(out / t) for t in tars])
        except BeitDataError as exc:
            return "did not finish" in str(exc)
        return False

    def rename(source, target):
        real(source, target)
        tars = sorted(n for n in os.listdir(out) if n.endswith(".tar"))
        report = json.loads((out / "shards.json").read_text()) if (out / "shards.json").exists() else None
        moments.append((tars, report, refused(tars)))

    monkeypatch.setattr(os, "rename", rename)
    run_shards(ShardsConfig(min_size=0,
                            sources=[make_tree(tmp_path / "new", 2, 5)], out=out, maxcount=4, overwrite=True,
                            prefix="new", progress=False))
    assert len(moments) == 9 + 9  # the earlier run's 9 files aside, then the new run's 9 in
    for tars, report, was_refused in moments:
        if report is not None:  # a whole set: the one its shards.json lists, and no other shard
            assert tars == report["shards"] and not was_refused
        else:  # part of a set, refused; or no shard at all, which tokenize finds nothing in
            assert was_refused or not tars
    assert sum(report is None and bool(tars) for tars, report, _ in moments) >= 9
    assert [p.name for p in expand_shards(str(out))] == ["new-000000.tar", "new-000001.tar", "new-000002.tar"]


# -- item 10: damaged Parquet and a full disk: one line naming the file, nothing half-written -----------------------

def damaged_parquet(tmp_path: Path, how: str) -> Path:
    hf_parquet(tmp_path / "a.parquet", rows=20)
    data = bytearray((tmp_path / "a.parquet").read_bytes())
    if how == "truncated":
        data = data[: len(data) * 2 // 3]
    else:  # a corrupt page header in the third row group: found only when that group is read
        offset = pq.ParquetFile(tmp_path / "a.parquet").metadata.row_group(2).column(0).data_page_offset
        data[offset:offset + 16] = b"\xff" * 16
    path = tmp_path / f"{how}.parquet"
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("how, message", [
    ("truncated", "(footer): Parquet magic bytes not found in footer"),
    ("corrupt", "(row group 2): Couldn't deserialize thrift"),
])
@pytest.mark.parametrize("earlier", [False, True])
def test_damaged_parquet_is_one_line_naming_the_file_and_leaves_the_folder_as_it_was(tmp_path, how, message,
                                                                                    earlier):
    source = damaged_parquet(tmp_path, how)
    out, before = earlier_run(tmp_path) if earlier else (tmp_path / "out", None)
    error = one_line_error(invoke("shards", "--min-size", "0",
                                  source, "--out", out, "--maxcount", "2", "--no-shuffle", "--quiet",
                                  *(["--overwrite"] if earlier else [])))
    assert error.startswith(f"Error: {source} {message}"), error
    assert error.endswith("; the file is damaged or incomplete (a cut download?): fetch it again")
    if earlier:
        assert snapshot(out) == before
    else:
        assert not out.exists()


class FullDisk:
    """A shard file on a disk that fills after ``room`` bytes (an ``OSError`` ENOSPC, as a real one)."""

    def __init__(self, path: str, room: int):
        self.file, self.room = open(path, "wb"), room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def flush(self):
        self.file.flush()

    def tell(self) -> int:
        return self.file.tell()

    def close(self):
        self.file.close()


@pytest.mark.parametrize("shard, room", [(0, 0), (1, 3000), (4, 0), (9, 100)])  # shard 9, the last, fails closing
@pytest.mark.parametrize("earlier", [False, True])
def test_a_full_disk_while_writing_a_shard_names_it_and_leaves_nothing_half_written(tmp_path, monkeypatch, shard,
                                                                                   room, earlier):
    out, before = earlier_run(tmp_path) if earlier else (tmp_path / "out", None)
    opened = []

    def opener(path):
        opened.append(path)
        return FullDisk(path, room if len(opened) == shard + 1 else 10**9)

    monkeypatch.setattr(shards_module, "_open_shard", opener)
    tree = make_tree(tmp_path / "new", 4, 10)  # 16x16 JPEGs, about 700 bytes each with their members
    result = invoke("shards", "--min-size", "0",
                    tree, "--out", out, "--maxcount", "4", "--quiet", *(["--overwrite"] if earlier else []))
    assert one_line_error(result) == f"Error: cannot write {out / f'shard-{shard:06d}.tar'}: No space left on device"
    assert len(opened) == shard + 1
    if earlier:
        assert snapshot(out) == before
    else:
        assert not out.exists()


@pytest.mark.parametrize("file", ["shard-000001.idx", "rejects.json", "shards.json"])
def test_a_full_disk_while_writing_an_index_or_a_report_names_it(tmp_path, monkeypatch, file):
    out, before = earlier_run(tmp_path)
    real = Path.write_text

    def write_text(self, text, *args, **kwargs):
        if self.name.startswith(f".{file}.tmp-"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    result = invoke("shards", "--min-size", "0",
                    make_tree(tmp_path / "new", 2, 5), "--out", out, "--maxcount", "4", "--overwrite",
                    "--quiet")
    assert one_line_error(result) == f"Error: cannot write {out / file}: No space left on device"
    assert snapshot(out) == before


def test_tokenize_refuses_a_folder_an_interrupted_shards_run_left(tmp_path):
    out, _ = earlier_run(tmp_path)
    (out / "shards.json").unlink()  # what a run stopped between its first and its last file leaves
    error = one_line_error(invoke("tokenize", "--shards", out, "--tokenizer", tmp_path / "dvae.pt", "--out",
                                  tmp_path / "tokens"))
    assert error == (f"Error: {out} has the rejects.json of a beit-data shards run but no shards.json: that run did "
                     "not finish, and its shards may be part of the set; run beit-data shards into it again with "
                     "--overwrite")
    assert not (tmp_path / "tokens").exists()
    # The fix the message names makes the folder whole again.
    assert invoke("shards", "--min-size", "0",
                  tmp_path / "old", "--out", out, "--maxcount", "5", "--overwrite").exit_code == 0
    check_finished_folders(expand_shards(str(out)))
    # Shards no `shards` run wrote (no reports at all: img2dataset, hand-made tars) are read as they are.
    (out / "rejects.json").unlink()
    (out / "shards.json").unlink()
    check_finished_folders(expand_shards(str(out)))


# -- item 11: a folder with images at its top and in sub-folders ---------------------------------------------------

def folder_layout(root: Path, files: list[str]) -> Path:
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(jpeg_bytes((16, 16), seed=len(name)) if not name.endswith(".txt") else b"notes")
    return root


@pytest.mark.parametrize("files, nested", [
    (["a.jpg", "b.jpg", "cat/c.jpg"], "cat"),  # the reproduction: cat/ was skipped in silence
    (["top.png", "docs/readme.txt", "z/deep/er/x.webp"], "z"),
    (["a.JPEG", "b/c.jpg", "d/e.jpg"], "b"),
])
def test_images_at_the_top_and_in_sub_folders_are_refused_in_one_line(tmp_path, files, nested):
    src = folder_layout(tmp_path / "src", files)
    error = one_line_error(invoke("shards", "--min-size", "0", src, "--out", tmp_path / "out"))
    top = sorted(f for f in files if "/" not in f)[0]
    assert error == (f"Error: {src} holds images at its top (such as {top}) and in sub-folders (such as {nested}/): "
                     "class folders and images without a class cannot be mixed; move the top images into a class "
                     "folder, or list every path in a text file to write them all without classes")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("files, classes, images", [
    (["a.jpg", "b.jpg", "notes/todo.txt", ".thumbs/a.jpg"], [], 2),  # sub-folders without images: a flat folder
    (["README.txt", "cat/1.jpg", "dog/2.jpg", "dog/3.jpg"], ["cat", "dog"], 3),  # a tree; the notes are no image
])
def test_folders_of_one_layout_are_read_whole(tmp_path, files, classes, images):
    src = folder_layout(tmp_path / "src", files)
    result = run_shards(ShardsConfig(min_size=0, sources=[src], out=tmp_path / "out", progress=False))
    assert result.classes == classes and result.images == images
    assert result.rejects == []  # what is not an image in a sub-folder, or beside class folders, is not listed


def test_shards_rejects_images_under_min_size_and_the_held_out_count_still_holds(tmp_path):
    """By default an image whose shorter side is under 112 pixels (what tokenize would set aside
    with the DALL-E tokenizer) is a reject of `shards`, and a held-out image so rejected is
    replaced by the next of its class: every class gives the held-out count asked for."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(2):
        for i in range(8):
            side = 64 if i % 3 == 0 else 120  # a third of each class is too small
            pixels = rng.integers(0, 255, (side, side + 10, 3), dtype=np.uint8)
            (tmp_path / "tree" / f"c{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(tmp_path / "tree" / f"c{c}" / f"{i}.jpg")
    result = invoke("shards", tmp_path / "tree", "--out", tmp_path / "out", "--holdout-per-class", "2", "--quiet")
    assert result.exit_code == 0, result.output
    rejects = json.loads((tmp_path / "out" / "rejects.json").read_text()) + json.loads(
        (tmp_path / "out-holdout" / "rejects.json").read_text())
    assert len(rejects) == 6 and all("shorter side is 64 px, under --min-size 112" in r["reason"] for r in rejects)
    held = json.loads((tmp_path / "out-holdout" / "shards.json").read_text())
    written = json.loads((tmp_path / "out" / "shards.json").read_text())
    assert held["images"] == 4 and written["images"] == 6  # of the 5 large images a class, 2 held out, 3 kept
    kept_all = invoke("shards", "--min-size", "0", tmp_path / "tree", "--out", tmp_path / "all", "--quiet")
    assert kept_all.exit_code == 0 and json.loads((tmp_path / "all" / "shards.json").read_text())["images"] == 16
