"""The token Parquet format: its files read in other tools, its checks and its metadata."""

import pytest


def test_files_read_in_duckdb_and_polars(sample_tokens):
    import duckdb
    import polars as pl

    glob = str(sample_tokens / "*.parquet")
    con = duckdb.connect()
    [(n, first)] = con.execute(f"SELECT count(*), min(key) FROM '{glob}'").fetchall()
    assert (n, first) == (56, "000000000")
    [(tokens,)] = con.execute(f"SELECT CAST(tokens AS SMALLINT[]) AS t FROM '{glob}' LIMIT 1").fetchall()
    assert len(tokens) == 196
    df = pl.read_parquet(glob)
    assert df.height == 56 and df["tokens"].dtype == pl.Array(pl.Int16, 196)


def test_one_check_refuses_files_of_another_recipe(sample_tokens, tmp_path):
    from dataclasses import replace

    from beit_common import BeitDataError
    from beit_data.tokens import TARGET_KEYS, check_recipe, read_consistent_footers, read_meta, recipe_mismatch

    files = sorted(sample_tokens.glob("*.parquet"))
    meta = read_consistent_footers(files)[0][0]
    assert meta.format_version == 2 and meta.tokenizer.grid == 14 and meta.shard["bytes"] > 0
    other = replace(meta, views=replace(meta.views, seed=5))
    assert recipe_mismatch(meta, meta) == ""
    assert recipe_mismatch(other, meta) == "views.seed: 5 != 0"
    with pytest.raises(BeitDataError, match=r"^a and b come from different tokenizers or recipes: views.seed: "
                                             r"5 != 0; do this$"):
        check_recipe(other, meta, "a and b", "; do this")
    # Keys outside the signature (the source shard, its rejects) may differ.
    check_recipe(replace(meta, source="x.tar", rejects=(("k", "why"),)), read_meta(files[0]), "a and b")
    # Held-out tokens share the training tokens' tokenizer, filter and jitter rule; other crops may differ.
    check_recipe(other, meta, "a and b", keys=TARGET_KEYS)
    bicubic = replace(other, views=replace(other.views, interp="bicubic"),
                      tokenizer=replace(meta.tokenizer, fingerprint="ab" * 32))
    assert recipe_mismatch(bicubic, meta, TARGET_KEYS) == (f"tokenizer.fingerprint: abababababababab != "
                                                           f"{meta.tokenizer.fingerprint[:16]}; views.interp: "
                                                           "bicubic != lanczos")


def _rows_and_tokens():
    import numpy as np

    from beit_data.tokens import build_table, view_rows
    from beit_data.views import View

    views = [View(1, 2, 30, 40, True, 1.1, 0.9, 1.0), View(0, 0, 50, 50, False, 1.0, 1.0, 1.2)]
    rows = view_rows("k2", views, 64, 48) + view_rows("k1", views[:1], 80, 60)
    return build_table(rows, np.arange(3 * 4).reshape(3, 2, 2), 2)


TOKENIZER = {"kind": "dvae", "name": "t", "fingerprint": "f", "vocab": 16, "input_size": 16, "grid": 2}


def test_rows_table_and_metadata_round_trip(tmp_path):
    import json
    from dataclasses import replace

    import pyarrow.parquet as pq

    from beit_common import __version__
    from beit_data.tokens import FORMAT_VERSION, decoder_meta, file_meta, read_meta, write_tokens
    from beit_data.views import ViewRecipe

    meta = replace(file_meta(TOKENIZER, ViewRecipe(views=2), decoder_meta("lanczos3"), min_size=16),
                   source="s.tar", shard={"bytes": 10, "members": "ab"}, rejects=(("k3", "empty file"),))
    path = write_tokens(tmp_path / "s.parquet", _rows_and_tokens(), meta)
    table = pq.read_table(path).to_pylist()
    assert [(r["key"], r["view"]) for r in table] == [("k1", 0), ("k2", 0), ("k2", 1)]
    assert table[0]["tokens"] == [8, 9, 10, 11] and table[2]["tokens"] == [4, 5, 6, 7]
    assert (table[1]["x"], table[1]["h"], table[1]["flip"], table[1]["width"]) == (1, 40, True, 64)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left
    # The footer: one JSON value per key.
    footer = {k: v for k, v in pq.read_metadata(path).metadata.items() if k.startswith(b"beit_data.")}
    assert sorted(footer) == sorted(f"beit_data.{k}".encode() for k in ("format_version", "tokenizer", "views",
                                                                         "decoder", "min_size", "source", "shard",
                                                                         "rejects", "tool_version"))
    assert json.loads(footer[b"beit_data.tokenizer"]) == TOKENIZER
    assert footer[b"beit_data.rejects"] == b'[{"key": "k3", "reason": "empty file"}]'
    assert json.loads(footer[b"beit_data.views"])["ratio"] == [0.75, 4 / 3]
    # Read back: the metadata written, a value that cannot change.
    back = read_meta(path)
    assert back == meta and back.format_version == FORMAT_VERSION and back.tool_version == __version__
    assert back.tokenizer.as_dict() == TOKENIZER and "lanczos3" in back.decoder.resize
    with pytest.raises(AttributeError):
        back.source = "other.tar"
    with pytest.raises(AttributeError):
        back.tokenizer.grid = 4
    # Written again, the file's footer is the same bytes.
    again = write_tokens(tmp_path / "again.parquet", _rows_and_tokens(), back)
    assert {k: v for k, v in pq.read_metadata(again).metadata.items() if k.startswith(b"beit_data.")} == footer


def test_metadata_of_an_older_version_gets_its_defaults(tmp_path):
    """A file from before the BEiT v2 recipe names no tokenizer kind, view filter or recipe: it
    reads as a dVAE with BEiT's Lanczos recipe, and matches today's files made the same way."""
    import json

    import pyarrow.parquet as pq

    from beit_data.tokens import decoder_meta, file_meta, read_meta, recipe_mismatch
    from beit_data.views import ViewRecipe

    today = file_meta(TOKENIZER, ViewRecipe(views=2), decoder_meta("lanczos3"), min_size=16)
    old = today.as_footer()
    old["tokenizer"] = {k: v for k, v in old["tokenizer"].items() if k != "kind"}
    old["views"] = {k: v for k, v in old["views"].items() if k not in ("interp", "recipe")}
    del old["source"], old["shard"], old["rejects"]
    pq.write_table(_rows_and_tokens().replace_schema_metadata(
        {f"beit_data.{k}": json.dumps(v, sort_keys=True) for k, v in old.items()}), tmp_path / "old.parquet")
    legacy = read_meta(tmp_path / "old.parquet")
    assert (legacy.tokenizer.kind, legacy.views.interp, legacy.views.recipe) == ("dvae", "lanczos", "beit")
    assert (legacy.source, legacy.shard, legacy.rejects) == (None, None, ())
    assert legacy == today and recipe_mismatch(legacy, today) == ""
