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
    from beit_common import BeitDataError
    from beit_data.tokens import check_recipe, read_consistent_footers, read_meta, recipe_mismatch

    files = sorted(sample_tokens.glob("*.parquet"))
    meta = read_consistent_footers(files)[0][0]
    assert meta["format_version"] == 2 and meta["tokenizer"]["grid"] == 14 and meta["shard"]["bytes"] > 0
    other = {**meta, "views": {**meta["views"], "seed": 5}}
    assert recipe_mismatch(meta, meta) == ""
    assert recipe_mismatch(other, meta) == "views.seed: 5 != 0"
    with pytest.raises(BeitDataError, match=r"^a and b come from different tokenizers or recipes: views.seed: "
                                             r"5 != 0; do this$"):
        check_recipe(other, meta, "a and b", "; do this")
    # Keys outside the signature (the source shard, its rejects) may differ.
    check_recipe({**meta, "source": "x.tar", "rejects": [1]}, read_meta(files[0]), "a and b")


def test_rows_table_and_metadata_round_trip(tmp_path):
    import numpy as np
    import pyarrow.parquet as pq

    from beit_data.tokens import (
        FORMAT_VERSION,
        build_table,
        decoder_meta,
        file_meta,
        read_meta,
        recipe_mismatch,
        view_rows,
        write_tokens,
    )
    from beit_data.views import View, ViewRecipe

    views = [View(1, 2, 30, 40, True, 1.1, 0.9, 1.0), View(0, 0, 50, 50, False, 1.0, 1.0, 1.2)]
    rows = view_rows("k2", views, 64, 48) + view_rows("k1", views[:1], 80, 60)
    tokens = np.arange(3 * 4).reshape(3, 2, 2)
    tokenizer = {"kind": "dvae", "name": "t", "fingerprint": "f", "vocab": 16, "input_size": 16, "grid": 2}
    meta = file_meta(tokenizer, ViewRecipe(views=2).as_dict(), decoder_meta("lanczos3"), min_size=16)
    path = write_tokens(tmp_path / "s.parquet", build_table(rows, tokens, 2), {**meta, "source": "s.tar"})
    table = pq.read_table(path).to_pylist()
    assert [(r["key"], r["view"]) for r in table] == [("k1", 0), ("k2", 0), ("k2", 1)]
    assert table[0]["tokens"] == [8, 9, 10, 11] and table[2]["tokens"] == [4, 5, 6, 7]
    assert (table[1]["x"], table[1]["h"], table[1]["flip"], table[1]["width"]) == (1, 40, True, 64)
    back = read_meta(path)
    assert back["format_version"] == FORMAT_VERSION and back["tokenizer"] == tokenizer
    assert back["source"] == "s.tar" and "lanczos3" in back["decoder"]["resize"] and back["tool_version"]
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left
    # A file from before the BEiT v2 recipe (no tokenizer kind, view filter or recipe name) reads
    # as a dVAE with BEiT's Lanczos recipe: it matches today's files made the same way.
    old = {**meta, "tokenizer": {k: v for k, v in tokenizer.items() if k != "kind"},
           "views": {k: v for k, v in meta["views"].items() if k not in ("interp", "recipe")}}
    legacy = read_meta(write_tokens(tmp_path / "old.parquet", build_table(rows, tokens, 2), old))
    assert recipe_mismatch(legacy, back) == "" and legacy["views"]["recipe"] == "beit"
