"""Integrity at the data's edges (issue 33): the held-out set checked as training checks its own,
a stale ``.idx`` named with its fix, token files validated when opened, and tar member names
that are not UTF-8."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import invoke, jpeg_bytes, tokenize_folder, write_shards, write_tar
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from beit_common import BeitDataError, Location
from beit_data.replay import ReplaySource, pair_token_files
from beit_data.shard_index import StaleIndex, index_path, scan_index, shard_fingerprint, stale_index, write_index
from beit_data.shards import iter_samples
from beit_data.stream_config import StreamConfig
from beit_data.tokens import build_table, check_rows, decoder_meta, file_meta, read_footer, view_rows, write_tokens
from beit_data.views import View, ViewRecipe

TINY = dict(model="beit_mim_tiny_patch16_224", batch_size=2, warmup_steps=1, lr=1e-3, device="cpu", progress=False,
            num_threads=1, steps=2, checkpoint_every=100)


def one_line(result) -> str:
    """The error of a refused command: one line, no traceback."""
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def source(shards: Path, tokens: Path) -> ReplaySource:
    return ReplaySource.open(StreamConfig(shards=str(shards), tokens=str(tokens), batch_size=2))


# ---- 1. the held-out path ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def held_out(tmp_path_factory, tiny_tokenizer) -> Path:
    """Training shards (one of 4 images, 40 px) and two held-out shards (3 and 4 images), each
    tokenized into a folder of its own with 2 views."""
    root = tmp_path_factory.mktemp("held_out")
    write_shards(root / "train", [4], image_size=40, seed=0)
    write_shards(root / "val", [3, 4], image_size=40, seed=700)
    tokenize_folder(root / "train", root / "train_tokens", tiny_tokenizer)
    tokenize_folder(root / "val", root / "val_tokens", tiny_tokenizer)
    return root


def val_copy(held_out: Path, tmp_path: Path) -> tuple[Path, Path]:
    shutil.copytree(held_out / "val", tmp_path / "val")
    shutil.copytree(held_out / "val_tokens", tmp_path / "val_tokens")
    return tmp_path / "val", tmp_path / "val_tokens"


def rewrite_images(shard: Path, change) -> None:
    """The shard written again under its member names, each image replaced by ``change(image)``."""
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    out = []
    for name, data in members:
        if name.endswith(".jpg"):
            buf = io.BytesIO()
            change(Image.open(io.BytesIO(data)).convert("RGB")).save(buf, format="JPEG")
            data = buf.getvalue()
        out.append((name, data))
    write_tar(shard, out)


def invert(image: Image.Image) -> Image.Image:
    return Image.fromarray(255 - np.asarray(image))


def pretrain_held_out(held_out: Path, val: Path, val_tokens: Path, out: Path):
    return invoke("pretrain", "--shards", held_out / "train", "--tokens", held_out / "train_tokens", "--out", out,
                  "--val-shards", val, "--val-tokens", val_tokens, "--val-images", "4",
                  "--model", "beit_mim_tiny_patch16_224", "--batch-size", "2", "--steps", "1", "--warmup-steps", "1",
                  "--device", "cpu", "--num-threads", "1", "--quiet")


@pytest.mark.parametrize("change, with_index", [
    (invert, True),  # a colour-altered copy: same names, keys and image sizes
    (invert, False),
    (lambda im: im.resize((57, 33)), True),  # other image sizes: a DALI traceback before
    (lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), False),
])
def test_a_held_out_shard_rewritten_since_it_was_tokenized_is_refused_before_step_0(held_out, tmp_path, change,
                                                                                     with_index):
    val, val_tokens = val_copy(held_out, tmp_path)
    rewrite_images(val / "s-000001.tar", change)
    (val / "s-000001.idx").unlink()
    if with_index:
        write_index(Location(val / "s-000001.tar"))
    result = pretrain_held_out(held_out, val, val_tokens, tmp_path / "run")
    line = one_line(result)
    assert f"{val / 's-000001.tar'} has changed since it was tokenized" in line
    assert not (tmp_path / "run").exists()  # refused before the run folder holds a step


def test_every_training_check_applies_to_the_held_out_set(held_out, tmp_path):
    from pipelines.evaluation import check_held_out_shards

    val, val_tokens = val_copy(held_out, tmp_path)
    check_held_out_shards(str(val), Location(val_tokens))  # as tokenized: sound
    # A stale .idx beside a held-out tar written again: the index is named, with its fix.
    old_index = (val / "s-000000.idx").read_bytes()
    rewrite_images(val / "s-000000.tar", lambda im: im.rotate(90))
    assert (val / "s-000000.tar").stat().st_size == (held_out / "val" / "s-000000.tar").stat().st_size
    with pytest.raises(StaleIndex, match=r"s-000000.idx does not list the members of .*s-000000.tar \(the tar was "
                                         r"written again after it was indexed\); rebuild it: beit-data index "
                                         r"--overwrite --shards .*s-000000.tar$"):
        check_held_out_shards(str(val), Location(val_tokens))
    (val / "s-000000.idx").write_bytes(old_index)
    shutil.copy(held_out / "val" / "s-000000.tar", val / "s-000000.tar")
    # A token file of another recipe among the held-out ones (training refuses mixed recipes too).
    other = tmp_path / "other_tokens"
    shutil.copytree(val_tokens, other)
    table = pq.read_table(other / "s-000001.parquet")
    meta = read_footer(other / "s-000001.parquet")[0]
    write_tokens(other / "s-000001.parquet", table.replace_schema_metadata(None),
                 dataclasses.replace(meta, views=dataclasses.replace(meta.views, seed=99)))
    with pytest.raises(BeitDataError, match=r"come from different tokenizers or recipes: views.seed: 99 != 0"):
        check_held_out_shards(str(val), Location(other))
    # A sample taken out of a held-out shard.
    with tarfile.open(val / "s-000001.tar") as tar:
        kept = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if not m.name.startswith("k0001000")]
    write_tar(val / "s-000001.tar", kept)
    (val / "s-000001.idx").unlink()
    with pytest.raises(BeitDataError, match=r"s-000001.tar has changed since it was tokenized"):
        check_held_out_shards(str(val), Location(val_tokens))
    # A held-out shard without a token file.
    (tmp_path / "one").mkdir()
    shutil.copy(val_tokens / "s-000000.parquet", tmp_path / "one")
    with pytest.raises(BeitDataError, match=r"validation shard .*s-000001.tar has no token file .*one/s-000001"
                                            r".parquet; tokenize it into `val_tokens`"):
        check_held_out_shards(str(val), Location(tmp_path / "one"))


def test_a_held_out_token_row_outside_its_image_is_refused_naming_file_and_row(held_out, tmp_path):
    from pipelines.evaluation import check_held_out_shards

    val, val_tokens = val_copy(held_out, tmp_path)
    path = val_tokens / "s-000001.parquet"
    table, meta = pq.read_table(path), read_footer(path)[0]
    x = table.column("x").to_numpy().copy()
    x[5] = table.column("width")[5].as_py()  # the window starts at the image's right edge
    write_tokens(path, table.set_column(table.schema.get_field_index("x"), "x", pa.array(x, pa.int32()))
                 .replace_schema_metadata(None), meta)
    key = table.column("key")[5].as_py()
    with pytest.raises(BeitDataError, match=rf"s-000001.parquet: row 5 \(key {key}, view 1\): crop window x 40 .* "
                                            r"is not inside its 40x40 image"):
        check_held_out_shards(str(val), Location(val_tokens))


# ---- 4. a stale .idx ---------------------------------------------------------------------------------------------

def test_a_stale_index_is_named_with_its_fix_by_tokenize_index_and_pretrain(tmp_path, tiny_tokenizer):
    shards = write_shards(tmp_path / "s", [6, 2], image_size=24, seed=3)
    stale = (shards / "s-000000.idx").read_bytes()
    write_shards(tmp_path / "s", [6], image_size=24, seed=40)  # the tar written again; its .idx replaced...
    (shards / "s-000000.idx").write_bytes(stale)  # ...by the old one, as a copy of the old folder would leave it
    fix = f"beit-data index --overwrite --shards {shards / 's-000000.tar'}"
    assert str(stale_index(Location(shards / "s-000000.tar"))).endswith(f"rebuild it: {fix}")
    # tokenize: refused before the shard's file is written
    result = invoke("tokenize", "--shards", shards, "--tokenizer", tiny_tokenizer, "--out", tmp_path / "t",
                    "--views", "2", "--min-size", "0", "--device", "cpu", "--quiet")
    assert one_line(result).endswith(fix) and not (tmp_path / "t" / "s-000000.parquet").exists()
    # index without --overwrite checks the indexes it keeps
    result = invoke("index", "--shards", shards, "--quiet")
    assert "1 of the shards' indexes no longer list the members" in one_line(result)
    assert f"beit-data index --overwrite --shards '{shards}'" in result.stderr
    # pretrain: token files made from the tar as it is, the stale index back beside it
    result = invoke("index", "--shards", shards, "--overwrite", "--quiet")
    assert result.exit_code == 0 and "indexed 2 of 2 shards" in result.stdout
    tokenize_folder(shards, tmp_path / "t", tiny_tokenizer)
    source(shards, tmp_path / "t")
    fresh = (shards / "s-000000.idx").read_bytes()
    (shards / "s-000000.idx").write_bytes(stale)
    with pytest.raises(StaleIndex, match=rf"s-000000.idx does not list the members of .*rebuild it: {fix}$"):
        source(shards, tmp_path / "t")
    # The advice does not loop: following it is enough.
    assert invoke("index", "--shards", shards / "s-000000.tar", "--overwrite", "--quiet").exit_code == 0
    assert (shards / "s-000000.idx").read_bytes() == fresh
    assert source(shards, tmp_path / "t").images_per_shard == [6, 2]


def test_a_changed_shard_with_a_stale_index_names_the_index_first(tmp_path, tiny_tokenizer):
    shards = write_shards(tmp_path / "s", [4], image_size=24, seed=5)
    tokenize_folder(shards, tmp_path / "t", tiny_tokenizer)
    stale = (shards / "s-000000.idx").read_bytes()
    write_shards(tmp_path / "s", [15], image_size=24, seed=6)  # a size of its own
    (shards / "s-000000.idx").write_bytes(stale)
    with pytest.raises(StaleIndex, match=r"has changed since it was tokenized \(\d+ bytes, \d+ then\), and "
                                         r"s-000000.idx no longer lists its members: run beit-data index --overwrite "
                                         r"--shards .*, then tokenize it again \(overwrite\)"):
        source(shards, tmp_path / "t")
    # tokenize --overwrite would not mend the index: it says so, also with --overwrite
    result = invoke("tokenize", "--shards", shards, "--tokenizer", tiny_tokenizer, "--out", tmp_path / "t",
                    "--views", "2", "--min-size", "0", "--device", "cpu", "--quiet", "--overwrite")
    assert "beit-data index --overwrite" in one_line(result)
    write_index(Location(shards / "s-000000.tar"))
    with pytest.raises(BeitDataError, match=r"has changed since it was tokenized .*tokenize it again") as refused:
        source(shards, tmp_path / "t")
    assert not isinstance(refused.value, StaleIndex)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_cut_tar_is_read_alike_by_its_index_and_a_sequential_read(tmp_path, data):
    """What ``index`` writes for a tar cut anywhere is what tokenize's one read finds, so the
    fingerprints agree and "tokenize it again" cannot loop."""
    sizes = data.draw(st.lists(st.integers(1, 1400), min_size=2, max_size=4), label="member sizes")
    members = [(f"m{i}.{ext}", bytes([i + 1]) * n) for i, n in enumerate(sizes) for ext in ("jpg", "cls")[: 1 + i % 2]]
    whole = write_tar(tmp_path / "whole.tar", members).read_bytes()
    cut = data.draw(st.integers(1, len(whole)), label="cut at")
    shard = Location(tmp_path / "cut.tar")
    shard.path.write_bytes(whole[:cut])
    try:
        scanned = scan_index(shard)
    except BeitDataError:
        scanned = []
    read: list = []
    list(iter_samples(shard, [], read))
    assert shard_fingerprint(shard, scanned) == shard_fingerprint(shard, read)


# ---- 8. token files validated when opened -------------------------------------------------------------------------

TOKENIZER = {"kind": "dvae", "name": "t", "fingerprint": "f" * 16, "vocab": 37, "input_size": 24, "grid": 3}


def token_file(path: Path, images: int = 4, views: int = 2, tokenizer: dict = TOKENIZER, **fields) -> Path:
    """A sound token file of ``images`` 50x30 images (3x3 ids from a vocab of 37), then the
    ``fields`` of row 3 (``x``, ``tokens``...) replaced."""
    rows, rng = [], np.random.default_rng(1)
    for i in range(images):
        vs = [View(int(rng.integers(0, 20)), int(rng.integers(0, 10)), 30, 20, False, 1.0, 1.0, 1.0)
              for _ in range(views)]
        rows += view_rows(f"k{i:03d}", vs, 50, 30)
    grid, vocab = tokenizer["grid"], tokenizer["vocab"]
    tokens = rng.integers(0, vocab, (len(rows), grid, grid))
    for name, value in fields.items():
        if name == "tokens":
            tokens[3].flat[4] = value
        else:
            rows[3][name] = value
    meta = file_meta(tokenizer, ViewRecipe(views=views), decoder_meta("lanczos3"), min_size=0)
    return write_tokens(path, build_table(rows, tokens, grid), dataclasses.replace(meta, source="s.tar"))


@pytest.mark.parametrize("fields, problem", [
    ({"tokens": 37}, "token id 37 is outside the tokenizer's vocab 0..36"),
    ({"tokens": -3}, "token id -3 is outside the tokenizer's vocab 0..36"),
    ({"x": 21}, "crop window x 21 y .* w 30 h 20 is not inside its 50x30 image"),
    ({"y": -1}, "crop window x .* y -1 w 30 h 20 is not inside its 50x30 image"),
    ({"h": 0}, "crop window x .* h 0 is not inside its 50x30 image"),
    ({"width": 29}, "crop window .* is not inside its 29x30 image"),
])
def test_a_bad_token_row_is_refused_naming_file_and_row(tmp_path, fields, problem):
    path = token_file(tmp_path / "s.parquet", **fields)
    # The ids and negative windows show in the footer's statistics: refused as the file is opened.
    opened = "token" in problem or "-1" in str(fields) or "h 0" in problem
    row = rf"{path}: row 3 \(key k001, view 1\): {problem}; tokenize its shard again with `--overwrite`"
    if opened:
        with pytest.raises(BeitDataError, match=row):
            read_footer(path)
    else:
        read_footer(path)
    with pytest.raises(BeitDataError, match=row):
        check_rows(pq.read_table(path), TOKENIZER["vocab"], path)


def test_a_token_file_of_another_shape_is_refused_naming_the_column(tmp_path):
    good = token_file(tmp_path / "good.parquet")
    table, raw = pq.read_table(good), pq.read_schema(good).metadata
    cases = {
        "no_flip": (table.drop(["flip"]), "no column flip"),
        "no_tokens": (table.drop(["tokens"]), "no column tokens"),
        "short": (table.set_column(table.schema.get_field_index("tokens"), "tokens", pa.FixedSizeListArray.from_arrays(
            pa.array(np.zeros(8 * 8), pa.int16()), 8)), r"column tokens holds 8 ids a row, not 9 \(the tokenizer's "
                                                       r"grid 3x3\)"),
        "wide": (table.set_column(table.schema.get_field_index("x"), "x", table.column("x").cast(pa.int64())),
                 "column x is int64, not int32"),
    }
    for name, (changed, problem) in cases.items():
        path = tmp_path / f"{name}.parquet"
        pq.write_table(changed.replace_schema_metadata(raw), path)
        with pytest.raises(BeitDataError, match=rf"{path}: schema does not match the token format: {problem}; "):
            read_footer(path)
    # A vocab the metadata does not record cannot be checked against.
    path = tmp_path / "novocab.parquet"
    pq.write_table(table.replace_schema_metadata({**raw, b"beit_data.tokenizer": b'{"grid": 3, "name": "t"}'}), path)
    with pytest.raises(BeitDataError, match="records no tokenizer grid and vocab"):
        read_footer(path)


def test_opening_a_sound_file_reads_its_footer_only(tmp_path, monkeypatch):
    """The cost at ImageNet scale: the statistics prove a sound file, no row is read."""
    import beit_data.tokens as tokens

    path = token_file(tmp_path / "s.parquet", images=300, views=3)
    monkeypatch.setattr(tokens, "parquet_file", lambda p: pytest.fail(f"{p}'s rows were read"))
    assert read_footer(path)[1] == 900
    # Without statistics (another writer), the row groups are read and checked all the same.
    monkeypatch.undo()
    bad = token_file(tmp_path / "bad.parquet", tokens=40)
    pq.write_table(pq.read_table(bad), tmp_path / "nostats.parquet", write_statistics=False)
    with pytest.raises(BeitDataError, match=r"nostats.parquet: row 3 \(key k001, view 1\): token id 40 is outside"):
        read_footer(tmp_path / "nostats.parquet")


@settings(max_examples=60, deadline=None)
@given(grid=st.integers(1, 5), vocab=st.integers(2, 300), images=st.integers(1, 9), views=st.integers(1, 3),
       data=st.data())
def test_check_rows_names_the_first_bad_row(grid, vocab, images, views, data):
    """Sound rows pass; a fault put in any rows is named at the first of them."""
    n = images * views
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16), label="seed"))
    width, height = rng.integers(1, 90, n), rng.integers(1, 90, n)
    w, h = rng.integers(1, width + 1), rng.integers(1, height + 1)
    columns = {"key": [f"k{i // views}" for i in range(n)], "view": np.arange(n) % views,
               "x": rng.integers(0, width - w + 1), "y": rng.integers(0, height - h + 1), "w": w, "h": h,
               "width": width, "height": height,
               "tokens": pa.FixedSizeListArray.from_arrays(pa.array(rng.integers(0, vocab, n * grid * grid),
                                                                    pa.int16()), grid * grid)}
    check_rows(pa.table(columns), vocab, "f.parquet")
    bad = sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=3), label="bad rows"))
    kind = data.draw(st.sampled_from(["high", "negative", "right", "below", "empty"]), label="fault")
    for row in bad:
        if kind in ("high", "negative"):
            flat = columns["tokens"].flatten().to_numpy().copy()
            flat[row * grid * grid + int(rng.integers(grid * grid))] = vocab + 5 if kind == "high" else -1
            columns["tokens"] = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.int16()), grid * grid)
        else:
            column = {"right": "x", "below": "y", "empty": "w"}[kind]
            values = np.array(columns[column])
            values[row] = {"right": width[row] - w[row] + 1, "below": height[row] - h[row] + 1, "empty": 0}[kind]
            columns[column] = values
    with pytest.raises(BeitDataError, match=rf"^f.parquet: row {bad[0]} \(key k{bad[0] // views}, view "
                                            rf"{bad[0] % views}\): "):
        check_rows(pa.table(columns), vocab, "f.parquet", start=0)


def replace_column(path: Path, name: str, change) -> None:
    """The token file written again with ``change(values)`` (a numpy copy) as column ``name``."""
    table = pq.read_table(path)  # its metadata as it is, read without a check
    if name == "tokens":
        cells = table.schema.field("tokens").type.list_size
        ids = change(table.column("tokens").combine_chunks().flatten().to_numpy().reshape(-1, cells).copy())
        column = pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1), pa.int16()), cells)
    else:
        column = pa.array(change(table.column(name).to_numpy().copy()), table.schema.field(name).type)
    pq.write_table(table.set_column(table.schema.get_field_index(name), name, column), path)


def test_pretrain_and_inspect_refuse_bad_token_files(held_out, tmp_path):
    vocab = read_footer(held_out / "train_tokens" / "s-000000.parquet")[0].tokenizer.vocab

    def one_past_the_vocab(ids):
        ids[2, 1] = vocab
        return ids

    # pretrain: refused as the token file is opened, before a run folder holds anything
    shutil.copytree(held_out / "train_tokens", tmp_path / "t")
    replace_column(tmp_path / "t" / "s-000000.parquet", "tokens", one_past_the_vocab)
    line = one_line(invoke("pretrain", "--shards", held_out / "train", "--tokens", tmp_path / "t", "--out",
                           tmp_path / "run", "--model", "beit_mim_tiny_patch16_224", "--batch-size", "2", "--steps",
                           "1", "--device", "cpu", "--num-threads", "1", "--quiet"))
    assert line == (f"Error: {tmp_path / 't' / 's-000000.parquet'}: row 2 (key k0000001, view 0): token id {vocab} is "
                    f"outside the tokenizer's vocab 0..{vocab - 1}; tokenize its shard again with `--overwrite`")
    assert not (tmp_path / "run").exists()
    # inspect: an ERROR line for the file, beside the files that are sound, and exit 1
    shutil.copytree(held_out / "val_tokens", tmp_path / "v")
    replace_column(tmp_path / "v" / "s-000001.parquet", "tokens", one_past_the_vocab)
    result = invoke("inspect", tmp_path / "v")
    assert result.exit_code == 1 and re.search(r"token files\s+2 .*\(1 readable\)", result.stdout)
    assert [ln for ln in result.stdout.splitlines() if ln.startswith("ERROR")] == [
        f"ERROR         {tmp_path / 'v' / 's-000001.parquet'}: row 2 (key k0001001, view 0): token id {vocab} is "
        f"outside the tokenizer's vocab 0..{vocab - 1}; tokenize its shard again with `--overwrite`"]
    # A window outside its image: inspect flags it; training refuses it when it loads the shard.
    replace_column(tmp_path / "v" / "s-000001.parquet", "tokens", lambda ids: ids % vocab)
    replace_column(tmp_path / "v" / "s-000000.parquet", "y", lambda y: y + 40)
    result = invoke("inspect", tmp_path / "v", "--json")
    assert result.exit_code == 1
    errors = json.loads(result.stdout)["errors"]
    assert len(errors) == 1 and re.fullmatch(r"s-000000.parquet: row 0 \(key k0000000, view 0\): crop window x \d+ y "
                                             r"\d+ w \d+ h \d+ is not inside its 40x40 image; tokenize its shard "
                                             r"again with `--overwrite`", errors[0])
    with pytest.raises(BeitDataError, match=r"s-000000.parquet: row 0 \(key k0000000, view 0\): crop window .* is "
                                            r"not inside its 40x40 image"):
        next(iter(source(held_out / "val", tmp_path / "v")))


# ---- 9. member names that are not UTF-8, a 0-byte tar ------------------------------------------------------------

def raw_tar(path: Path, members: list[tuple[bytes, bytes]], fmt: int) -> Path:
    """A tar whose member names are the given bytes, whatever their encoding."""
    with tarfile.open(path, "w", format=fmt, encoding="utf-8", errors="surrogateescape") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name.decode("utf-8", "surrogateescape"))
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("bad", [b"caf\xe9", b"\xff\xfe", "na\u00efve".encode("latin-1") + b"/d\xe9j\xe0"])
def test_member_names_that_are_not_utf8_are_rejects_for_every_reader(tmp_path, fmt, bad):
    good = jpeg_bytes((20, 20), seed=9)
    shard = raw_tar(tmp_path / "s.tar", [(b"a.jpg", good), (bad + b".jpg", good), (bad + b".cls", b"1"),
                                         (b"z.jpg", good)], fmt)
    escaped = bad.decode("utf-8", "backslashreplace")
    rejects: list = []
    assert [s.key for s in iter_samples(shard, rejects)] == ["a", "z"]
    assert [(r.key, r.reason) for r in rejects] == [(escaped, f"member name {escaped}.jpg is not UTF-8 (other bytes "
                                                              r"shown as \xNN); rename it in UTF-8")]
    assert [s.key for s in scan_index(Location(shard))] == ["a", "z"]
    result = invoke("index", "--shards", shard, "--quiet")
    assert result.exit_code == 0, result.output
    assert "left out samples whose member names are not UTF-8: 1 (first: s.tar: member name" in result.stderr
    assert escaped in result.stderr
    text = Path(index_path(Location(shard))).read_bytes().decode("utf-8")
    assert text.splitlines()[0] == "v1.2 2" and "a.jpg" in text and "z.jpg" in text


def test_tokenize_lists_a_latin1_name_as_a_reject_and_finishes(tmp_path, tiny_tokenizer):
    (tmp_path / "s").mkdir()
    raw_tar(tmp_path / "s" / "s.tar", [(b"caf\xe9.jpg", jpeg_bytes((32, 32), 1)), (b"ok.jpg", jpeg_bytes((32, 32), 2))],
            tarfile.GNU_FORMAT)
    result = invoke("tokenize", "--shards", tmp_path / "s", "--tokenizer", tiny_tokenizer, "--out", tmp_path / "t",
                    "--views", "2", "--min-size", "0", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [".beit-data.lock", "config.yaml", "s.parquet",
                                                                  "summary.json"]
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert (summary["images"], summary["rejects"]) == (1, 1)
    assert summary["reject_list"][0]["key"] == "caf\\xe9" and "not UTF-8" in summary["reject_list"][0]["reason"]
    assert pq.read_table(tmp_path / "t" / "s.parquet").column("key").unique().to_pylist() == ["ok"]


@pytest.mark.parametrize("content, reason", [(b"", "it is empty (0 bytes)"), (b"\x00" * 700, ""),
                                             (b"not a tar at all" * 40, "")])
def test_index_of_a_file_that_is_no_tar_is_one_line(tmp_path, content, reason):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "bad.tar").write_bytes(content)
    write_tar(tmp_path / "s" / "good.tar", [("a.jpg", jpeg_bytes())])
    line = one_line(invoke("index", "--shards", tmp_path / "s", "--quiet"))
    assert line.startswith(f"Error: {tmp_path / 's' / 'bad.tar'}") and reason in line
    assert "unreadable tar" in line or "no sample to index" in line
    assert not (tmp_path / "s" / "bad.idx").exists()


def test_pair_token_files_is_the_one_check_of_both_paths(held_out):
    shards, paths, footers, missing = pair_token_files(str(held_out / "val"), Location(held_out / "val_tokens"))
    assert [p.name for p in paths] == ["s-000000.parquet", "s-000001.parquet"] and missing == []
    assert [rows for _, rows in footers] == [6, 8]
