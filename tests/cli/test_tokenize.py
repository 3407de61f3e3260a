import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from helpers import jpeg_bytes, run_cli, write_tar
from PIL import Image

from beit_common import BeitDataError, Location
from beit_data.shards import iter_samples
from beit_data.tokens import read_meta
from beit_data.views import ViewRecipe, sample_view
from beit_model.tokenizer import load_tokenizer
from pipelines.tokenize_shards import TokenizeConfig, run_tokenize


def rows_of(folder):
    return {p.name: pq.read_table(p).to_pylist() for p in sorted(folder.glob("*.parquet"))}


def test_rows_sorted_with_geometry_metadata_and_summary(sample_tokens, sample_shards, tiny_tokenizer):
    files = sorted(sample_tokens.glob("*.parquet"))
    assert [f.name for f in files] == ["sample-000000.parquet", "sample-000001.parquet"]
    table = pq.read_table(files[0])
    assert table.num_rows == 8 * 4
    assert table.schema.field("tokens").type == pa.list_(pa.int16(), 196)
    rows = table.to_pylist()
    assert [(r["key"], r["view"]) for r in rows] == sorted((f"{k:09d}", v) for k in range(8) for v in range(4))
    recipe = ViewRecipe(views=4, seed=0)
    for r in rows[:8]:
        v = sample_view(recipe, r["key"], r["view"], r["width"], r["height"])
        assert (r["x"], r["y"], r["w"], r["h"], r["flip"]) == (v.x, v.y, v.w, v.h, v.flip)
        assert r["brightness"] == pytest.approx(v.brightness, rel=1e-6)
        assert 0 <= min(r["tokens"]) and max(r["tokens"]) < 512
    meta = read_meta(files[0]).as_footer()  # the footer's JSON
    tok = load_tokenizer(tiny_tokenizer)
    assert meta["tokenizer"] == {"kind": "dvae", "name": "dvae", "fingerprint": tok.fingerprint, "vocab": 512,
                                 "input_size": 112, "grid": 14}
    assert meta["views"]["views"] == 4 and meta["views"]["scale"] == [0.08, 1.0] and meta["views"]["target_jitter"]
    assert meta["source"] == "sample-000000.tar" and meta["rejects"] == []
    assert "lanczos" in meta["decoder"]["resize"] and "EXIF" in meta["decoder"]["exif"]
    summary = json.loads((sample_tokens / "summary.json").read_text())
    assert (summary["images"], summary["views"], summary["rejects"]) == (14, 56, 0)


def test_tokens_match_a_pil_reference_of_the_stored_view(sample_tokens, sample_shards, tiny_tokenizer):
    import torchvision.transforms.functional as TF

    tok = load_tokenizer(tiny_tokenizer)
    rows = pq.read_table(sample_tokens / "sample-000000.parquet").to_pylist()
    images = {s.key: s.image for s in iter_samples(sample_shards / "sample-000000.tar")}
    agree = []
    for r in rows[::3]:
        im = Image.open(io.BytesIO(images[r["key"]])).convert("RGB")
        crop = im.crop((r["x"], r["y"], r["x"] + r["w"], r["y"] + r["h"])).resize((112, 112), Image.LANCZOS)
        t = torch.from_numpy(np.asarray(crop, np.float32) / 255).permute(2, 0, 1)
        t = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(t, r["brightness"]), r["contrast"]),
                                 r["saturation"])
        if r["flip"]:
            t = TF.hflip(t)
        ref = tok.encode(t.clamp(0, 1)[None]).flatten()
        agree.append((ref.numpy() == np.array(r["tokens"])).mean())
    # Resize filters differ slightly between PIL and DALI; a wrong window or flip agrees far less.
    assert np.mean(agree) > 0.9


def test_rerun_skips_refuses_other_recipe_and_overwrites(sample_shards, tiny_tokenizer, tmp_path):
    cfg = dict(shards=str(sample_shards), tokenizer=str(tiny_tokenizer), out=str(tmp_path), views=2,
               device="cpu", progress=False)
    first = run_tokenize(TokenizeConfig(**cfg))
    seed_0 = (tmp_path / "sample-000001.parquet").read_bytes()
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.parquet")}
    again = run_tokenize(TokenizeConfig(**cfg))
    assert (first.images, again.images, again.skipped) == (14, 0, 2)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.parquet")} == mtimes
    result = run_cli("tokenize", "--shards", str(sample_shards), "--tokenizer", str(tiny_tokenizer),
                     "--out", str(tmp_path), "--views", "2", "--seed", "5", "--device", "cpu", "--quiet")
    assert result.returncode != 0
    assert "different tokenizers or recipes" in result.stderr and "views.seed: 0 != 5" in result.stderr
    assert "--overwrite" in result.stderr and "Traceback" not in result.stderr
    over = run_tokenize(TokenizeConfig(**{**cfg, "seed": 5, "overwrite": True}))
    assert over.images == 14 and read_meta(tmp_path / "sample-000000.parquet").views.seed == 5
    # An --overwrite run killed after its first file, run again: what it rewrote is kept.
    (tmp_path / "sample-000001.parquet").write_bytes(seed_0)
    kept = (tmp_path / "sample-000000.parquet").stat().st_mtime_ns
    rerun = run_tokenize(TokenizeConfig(**{**cfg, "seed": 5, "overwrite": True}))
    assert (rerun.images, rerun.skipped) == (6, 1)
    assert (tmp_path / "sample-000000.parquet").stat().st_mtime_ns == kept
    assert read_meta(tmp_path / "sample-000001.parquet").views.seed == 5


def test_bad_samples_become_rejects_and_good_ones_are_kept(tmp_path, tiny_tokenizer):
    good = jpeg_bytes((160, 130), seed=1)
    members = [("a.jpg", good), ("b.jpg", b""), ("c.jpg", good[: len(good) // 2]), ("d.txt", b"no image"),
               ("e.jpg", jpeg_bytes((60, 200), seed=2)), ("f.jpg", jpeg_bytes((150, 120), seed=3)),
               ("g.jpg", jpeg_bytes((200, 180), seed=4))]
    path = write_tar(tmp_path / "bad.tar", members)
    data = path.read_bytes()
    cut_at = data.index(jpeg_bytes((200, 180), seed=4)) + 50
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "bad.tar").write_bytes(data[:cut_at])
    result = run_cli("tokenize", "--shards", str(tmp_path / "shards"), "--tokenizer", str(tiny_tokenizer),
                     "--out", str(tmp_path / "tok"), "--views", "2", "--device", "cpu", "--quiet")
    assert result.returncode == 0, result.stderr
    table = pq.read_table(tmp_path / "tok" / "bad.parquet")
    assert sorted(set(table.column("key").to_pylist())) == ["a", "f"]
    reasons = dict(read_meta(tmp_path / "tok" / "bad.parquet").rejects)
    assert set(reasons) == {"b", "c", "d", "e", "g"}
    assert "empty" in reasons["b"] and "truncated" in reasons["c"] and "no image member" in reasons["d"]
    assert "too small" in reasons["e"] and "cut off" in reasons["g"]
    summary = json.loads((tmp_path / "tok" / "summary.json").read_text())
    assert (summary["images"], summary["rejects"]) == (2, 5)
    strict = run_cli("tokenize", "--shards", str(tmp_path / "shards"), "--tokenizer", str(tiny_tokenizer),
                     "--out", str(tmp_path / "tok2"), "--views", "2", "--device", "cpu", "--quiet", "--strict")
    assert strict.returncode != 0 and "5 samples were rejected" in strict.stderr
    # A strict failure leaves nothing a rerun would take as finished: the rerun fails again.
    assert not (tmp_path / "tok2" / "bad.parquet").exists()
    again = run_cli("tokenize", "--shards", str(tmp_path / "shards"), "--tokenizer", str(tiny_tokenizer),
                    "--out", str(tmp_path / "tok2"), "--views", "2", "--device", "cpu", "--quiet", "--strict")
    assert again.returncode != 0 and "5 samples were rejected" in again.stderr


def test_every_sample_of_a_duplicate_key_is_rejected(tmp_path, tiny_tokenizer):
    """Two images under one key: which one the key means cannot be known, so neither is trained on."""
    from beit_data.stream import StreamConfig, TrainStream

    (tmp_path / "s").mkdir()
    write_tar(tmp_path / "s" / "dup.tar", [
        ("a.jpg", jpeg_bytes((160, 130), seed=1)), ("b.jpg", jpeg_bytes((150, 120), seed=2)),
        ("a.jpg", jpeg_bytes((240, 200), seed=3)),  # a again, another size, not next to the first
        ("c.jpg", jpeg_bytes((150, 150), seed=4)), ("c.jpg", jpeg_bytes((150, 150), seed=5)),  # c twice in a row
        ("d.jpg", jpeg_bytes((170, 130), seed=6)), ("d.cls", b"1")])
    summary = run_tokenize(TokenizeConfig(shards=str(tmp_path / "s"), tokenizer=str(tiny_tokenizer),
                                          out=str(tmp_path / "t"), views=2, device="cpu", progress=False))
    assert sorted(set(pq.read_table(tmp_path / "t" / "dup.parquet").column("key").to_pylist())) == ["b", "d"]
    rejects = [(r["key"], r["reason"]) for r in summary.rejects]
    assert sorted(k for k, _ in rejects) == ["a", "a", "c", "c"] and summary.images == 2
    assert all(reason == "duplicate key: 2 samples of the shard have it, and a key must name one image"
               for _, reason in rejects)
    stream = TrainStream(StreamConfig(shards=str(tmp_path / "s"), tokens=str(tmp_path / "t"), batch_size=2,
                                      num_threads=1))
    it = stream.batches()
    assert sorted(next(it).keys) == ["b", "d"]
    it.close()
    # A token file that lists a key twice (an older beit-data wrote such files) is refused by every reader.
    table = pq.read_table(tmp_path / "t" / "dup.parquet")
    doubled = pa.concat_tables([table, table.slice(0, 2)]).sort_by([("key", "ascending"), ("view", "ascending")])
    pq.write_table(doubled.replace_schema_metadata(table.schema.metadata), tmp_path / "t" / "dup.parquet")
    with pytest.raises(BeitDataError, match=r"dup.parquet does not hold 2 rows for each key, each key once"):
        next(TrainStream(StreamConfig(shards=str(tmp_path / "s"), tokens=str(tmp_path / "t"), batch_size=2,
                                      num_threads=1)).batches())
    from beit_data.summary import summarise

    assert any("dup.parquet does not hold 2 rows for each key, each key once (6 rows for 2 keys)" in e
               for e in summarise(Location(tmp_path / "t"))["errors"])


def test_cli_errors(tmp_path, sample_shards, tiny_tokenizer):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [
        (["--tokenizer", str(tmp_path / "none.pt"), "--shards", str(sample_shards), "--out", str(tmp_path / "o")],
         "tokenizer file not found"),
        (["--tokenizer", str(tiny_tokenizer), "--shards", str(tmp_path / "x-*.tar"), "--out", str(tmp_path / "o")],
         "matches no .tar files"),
        (["--tokenizer", str(tiny_tokenizer), "--shards", str(sample_shards), "--out", str(blocker / "o")],
         "cannot write to output folder"),
    ]
    for args, message in cases:
        result = run_cli("tokenize", *args, "--device", "cpu", "--quiet")
        assert result.returncode != 0
        assert message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_stale_or_damaged_token_files_are_refused_with_overwrite(sample_shards, tiny_tokenizer, tmp_path):
    import shutil

    from helpers import reordered_copy

    shutil.copytree(sample_shards, tmp_path / "s")
    cfg = dict(shards=str(tmp_path / "s"), tokenizer=str(tiny_tokenizer), out=str(tmp_path / "t"), views=1,
               device="cpu", progress=False)
    first = run_tokenize(TokenizeConfig(**cfg))
    summary = (tmp_path / "t" / "summary.json").read_text()
    again = run_tokenize(TokenizeConfig(**cfg))  # every shard done: the summary of the real work stays
    assert again.skipped == 2 and again.images == 0 and first.images == 14
    assert (tmp_path / "t" / "summary.json").read_text() == summary
    reordered_copy(sample_shards / "sample-000001.tar", tmp_path / "s" / "sample-000001.tar", index=True)
    result = run_cli("tokenize", *[f"--{k.replace('_', '-')}={v}" for k, v in cfg.items() if k != "progress"],
                     "--quiet")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "sample-000001.tar has changed since it was tokenized (its members differ)" in result.stderr
    assert "--overwrite" in result.stderr
    done = tmp_path / "t" / "sample-000000.parquet"
    done.write_bytes(done.read_bytes()[: done.stat().st_size // 2])
    with pytest.raises(BeitDataError, match=r"sample-000000.parquet is not a readable Parquet file.*; pass "
                                            r"`overwrite` to replace it$"):
        run_tokenize(TokenizeConfig(**cfg))
    redone = run_tokenize(TokenizeConfig(**cfg, overwrite=True))
    assert redone.images == 14


def test_a_second_run_into_a_busy_folder_is_refused(sample_shards, tiny_tokenizer, tmp_path):
    from beit_common import folder_lock

    (tmp_path / "t").mkdir()
    with folder_lock(tmp_path / "t", "beit-data tokenize"):
        result = run_cli("tokenize", "--shards", str(sample_shards), "--tokenizer", str(tiny_tokenizer), "--out",
                         str(tmp_path / "t"), "--device", "cpu", "--quiet")
    assert result.returncode == 1 and "is in use by another beit-data run (beit-data tokenize, pid" in result.stderr
    assert not list((tmp_path / "t").glob("*.parquet"))


def test_min_size_keeps_small_images_when_asked(tmp_path, tiny_tokenizer):
    (tmp_path / "s").mkdir()
    write_tar(tmp_path / "s" / "a.tar", [("big.jpg", jpeg_bytes((160, 130), seed=1)),
                                         ("small.jpg", jpeg_bytes((64, 48), seed=2))])
    cfg = dict(shards=str(tmp_path / "s"), tokenizer=str(tiny_tokenizer), views=2, device="cpu", progress=False)
    default = run_tokenize(TokenizeConfig(out=str(tmp_path / "d"), **cfg))
    assert default.images == 1 and "image too small: 64x48" in default.rejects[0]["reason"]
    kept = run_tokenize(TokenizeConfig(out=str(tmp_path / "k"), min_size=0, **cfg))
    assert kept.images == 2 and kept.rejects == []
    table = pq.read_table(tmp_path / "k" / "a.parquet").to_pylist()
    small = [r for r in table if r["key"] == "small"]
    assert len(small) == 2 and all(r["w"] <= 64 and r["h"] <= 48 for r in small)
    assert read_meta(tmp_path / "k" / "a.parquet").min_size == 0
    assert read_meta(tmp_path / "d" / "a.parquet").min_size == 112


def test_a_compiled_tokenizer_writes_the_same_tokens(sample_shards, tiny_tokenizer, tmp_path):
    """One shard of 6 images in batches of 4: the short last batch is padded, so one compiled shape serves."""
    cfg = dict(shards=str(sample_shards / "sample-000001.tar"), tokenizer=str(tiny_tokenizer), views=1, batch_size=4,
               device="cpu", progress=False)
    run_tokenize(TokenizeConfig(out=str(tmp_path / "eager"), **cfg))
    run_tokenize(TokenizeConfig(out=str(tmp_path / "compiled"), compile=True, **cfg))
    eager, compiled = (pq.read_table(tmp_path / name / "sample-000001.parquet") for name in ("eager", "compiled"))
    assert eager.num_rows == 6 and eager.equals(compiled)


def test_two_shards_with_one_name_are_refused_before_any_work(sample_shards, tiny_tokenizer, tmp_path):
    import shutil

    from beit_data.replay import ReplaySource, StreamConfig

    for part in ("a", "b"):
        shutil.copytree(sample_shards, tmp_path / part)
    spec = str(tmp_path / "{a,b}" / "sample-000000.tar")
    message = (rf"shards {tmp_path}/a/sample-000000.tar and {tmp_path}/b/sample-000000.tar have one name, so both "
               r"would have the token file sample-000000.parquet; give each shard a name of its own$")
    with pytest.raises(BeitDataError, match=message):
        run_tokenize(TokenizeConfig(shards=spec, tokenizer=str(tiny_tokenizer), out=str(tmp_path / "t"), views=1,
                                    device="cpu", progress=False))
    assert not (tmp_path / "t").exists()
    with pytest.raises(BeitDataError, match=message):
        ReplaySource.open(StreamConfig(shards=spec, tokens=str(tmp_path), batch_size=1))


def test_more_views_over_a_folder_add_the_missing_views_only(sample_shards, sample_tokens, tiny_tokenizer, tmp_path):
    """``--views 4`` over files made with ``--views 2`` computes views 2 and 3 only and keeps the
    old rows as they are: the files equal a fresh ``--views 4`` run's. A file grown already is
    skipped, so a killed growth resumes."""
    import shutil

    from pipelines.tokenize_shards import TokenizeConfig, run_tokenize

    out = tmp_path / "tokens"
    common = dict(shards=str(sample_shards), tokenizer=str(tiny_tokenizer), out=str(out), batch_size=8,
                  device="cpu", progress=False)
    run_tokenize(TokenizeConfig(views=2, **common))
    names = sorted(p.name for p in out.glob("*.parquet"))
    before = {n: pq.read_table(out / n) for n in names}
    shutil.copy(sample_tokens / names[0], out / names[0])  # grown before a kill: done
    result = run_tokenize(TokenizeConfig(views=4, **common))
    assert (result.skipped, result.views) == (1, 2 * result.images)  # only the views the other file lacked
    for name in names:
        grown, fresh = pq.read_table(out / name), pq.read_table(sample_tokens / name)
        assert grown.equals(fresh) and grown.schema.metadata == fresh.schema.metadata, name
        old = before[name].replace_schema_metadata(None)
        kept = grown.filter(pc.less(grown.column("view"), 2)).replace_schema_metadata(None)
        assert kept.equals(old), name  # bit for bit
    # Fewer views than a folder holds is another recipe: refused, as before.
    with pytest.raises(BeitDataError, match="different tokenizers or recipes: views.views: 4 != 3"):
        run_tokenize(TokenizeConfig(views=3, **common))
