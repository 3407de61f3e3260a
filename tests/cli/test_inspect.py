import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import jpeg_bytes, run_cli, write_tar
from PIL import Image

from beit_common import Location
from beit_data.summary import summarise
from pipelines.tokenize_shards import TokenizeConfig, run_tokenize


@pytest.fixture(scope="module")
def known(tmp_path_factory, tiny_tokenizer):
    """Two tokenized shards with known content, 5 good images and 2 rejects, and a third shard not tokenized."""
    root = tmp_path_factory.mktemp("known")
    (root / "s").mkdir()
    write_tar(root / "s" / "a.tar", [(f"a{i}.jpg", jpeg_bytes((150, 130), seed=i)) for i in range(3)]
              + [("a3.jpg", b""), ("a4.txt", b"no image")])
    write_tar(root / "s" / "b.tar", [(f"b{i}.jpg", jpeg_bytes((140, 160), seed=10 + i)) for i in range(2)])
    run_tokenize(TokenizeConfig(shards=str(root / "s"), tokenizer=str(tiny_tokenizer), out=str(root / "t"), views=3,
                                device="cpu", progress=False))
    write_tar(root / "s" / "c.tar", [("c0.jpg", jpeg_bytes((140, 160), seed=20))])
    return root


def test_json_summary_values(known):
    result = run_cli("inspect", str(known / "t"), "--shards", str(known / "s"), "--json")
    assert result.returncode == 0, result.stderr
    s = json.loads(result.stdout)
    assert (s["files"], s["rows"], s["images"], s["views_per_image"]) == (2, 15, 5, 3.0)
    assert s["tokenizer"]["vocab"] == 512 and s["tokenizer"]["grid"] == 14 and s["views"]["views"] == 3
    tokens = np.concatenate([np.stack(pq.read_table(p).column("tokens").to_numpy(zero_copy_only=False))
                             for p in sorted((known / "t").glob("*.parquet"))])
    counts = np.bincount(tokens.ravel(), minlength=512)
    cb = s["codebook"]
    assert cb["codes_used"] == int((counts > 0).sum()) and cb["dead_codes"] == int((counts == 0).sum())
    assert cb["top_codes"][0]["code"] == int(counts.argmax()) and cb["counts"] == counts.tolist()
    p = counts[counts > 0] / counts.sum()
    assert cb["perplexity"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), abs=0.01)
    assert s["rejects"]["total"] == 2
    assert s["rejects"]["by_reason"] == {"empty file": 1, "no image member": 1}
    cov = s["coverage"]
    assert (cov["shard_keys"], cov["keys_missing_from_parquet"], cov["missing_examples"]) == (7, 1, ["c0"])
    assert cov["rejected_keys"] == 1  # a3 (empty); a4 has no image member, so it is no image key
    assert cov["keys_not_in_shards"] == 0 and cov["shards_without_token_file"] == ["c.tar"]
    assert cov["unusable_shards"] == []
    assert s["errors"] == []


def test_text_summary_is_readable(known):
    result = run_cli("inspect", str(known / "t"), "--shards", str(known / "s"))
    assert result.returncode == 0
    assert re.search(r"rows\s+15\s+images 5\s+views/image 3.0", result.stdout)
    assert "codes used" in result.stdout and "perplexity" in result.stdout
    assert "1 missing from Parquet" in result.stdout and "missing: c0" in result.stdout


def test_a_shard_rewritten_since_tokenize_is_an_error_line(known, tmp_path):
    import shutil

    shutil.copytree(known / "s", tmp_path / "s")
    write_tar(tmp_path / "s" / "b.tar", [(f"b{i}.jpg", jpeg_bytes((140, 160), seed=10 + i)) for i in range(3)])
    (tmp_path / "s" / "empty.tar").write_bytes(b"")
    result = run_cli("inspect", str(known / "t"), "--shards", str(tmp_path / "s"), "--json")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    s = json.loads(result.stdout)
    assert len(s["errors"]) == 2 and "b.tar has changed since it was tokenized" in s["errors"][0]
    assert "empty.tar: unreadable tar" in s["errors"][1]
    cov = s["coverage"]
    assert cov["unusable_shards"] == ["b.tar", "empty.tar"]
    assert (cov["shard_keys"], cov["keys_not_in_shards"]) == (5, 0)  # a0-a3 and c0; b's keys are left out


def test_validation_errors_exit_non_zero(known, tmp_path, sample_tokens):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for p in (known / "t").glob("*.parquet"):
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "other.parquet").write_bytes((sample_tokens / "sample-000000.parquet").read_bytes())
    (folder / "broken.parquet").write_bytes(b"PAR1 not really")
    pq.write_table(pq.read_table(known / "t" / "a.parquet").drop(["flip"]).replace_schema_metadata(
        pq.read_schema(known / "t" / "a.parquet").metadata), folder / "schema.parquet")
    result = run_cli("inspect", str(folder), "--json")
    assert result.returncode == 1
    errors = json.loads(result.stdout)["errors"]
    assert any("broken.parquet is not a readable Parquet file" in e for e in errors)
    assert any("come from different tokenizers or recipes" in e and "views.views: 4 != 3" in e for e in errors)
    assert any("schema.parquet: schema does not match" in e for e in errors)
    assert len(errors) == 3


def test_bad_input_one_line_errors(tmp_path, known):
    (tmp_path / "empty").mkdir()
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "x.parquet").write_text("hello")
    cases = [((str(tmp_path / "empty"),), "no .parquet files"),
             ((str(tmp_path / "fake"),), "not a readable Parquet file"),
             ((str(known / "t"), "--shards", str(known / "s"), "--render", "nope", "--out", str(tmp_path / "x.png")),
              "key nope is not in any token file")]
    for args, message in cases:
        result = run_cli("inspect", *args)
        assert result.returncode != 0 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_render_and_histogram_pngs_have_content(tmp_path, tiny_tokenizer, sample_shards):
    """The four panels of a render: the image, the view, its tokens and the tokenizer's
    reconstruction, each drawn and none a copy of another. This tokenizer is untrained (its
    reconstruction a flat grey); the demo's trained one draws the cat back (tests/system/test_demo.py)."""
    tokens = tmp_path / "tokens"
    run_tokenize(TokenizeConfig(shards=str(sample_shards), tokenizer=str(tiny_tokenizer), out=str(tokens),
                                views=2, device="cpu", progress=False))
    out = tmp_path / "new" / "folder" / "view.png"  # made as needed
    result = run_cli("inspect", str(tokens), "--shards", str(sample_shards), "--render", "000000010", "--view", "1",
                     "--tokenizer", str(tiny_tokenizer), "--out", str(out))
    assert result.returncode == 0, result.stderr
    img = np.asarray(Image.open(out).convert("RGB")).astype(float)
    assert img.shape == (340, 1280, 3)
    panels = [img[40:320, 20 + 320 * i: 300 + 320 * i] for i in range(4)]
    for i, a in enumerate(panels[:3]):
        assert a.std() > 5, f"panel {i} is blank"
    for i, a in enumerate(panels):
        for b in panels[i + 1:]:
            assert np.abs(a - b).mean() > 5
    hist = tmp_path / "hist.png"
    assert run_cli("inspect", str(tokens), "--histogram", str(hist)).returncode == 0
    h = np.asarray(Image.open(hist).convert("RGB")).astype(float)
    assert h.shape == (550, 800, 3) and h.std() > 5


def test_summary_streams_by_row_group(sample_tokens):
    small = summarise(Location(sample_tokens), batch_rows=5)
    assert small["rows"] == summarise(Location(sample_tokens))["rows"] == 56


def test_images_are_counted_by_shard_and_key(known, tmp_path):
    """Separate `shards` runs reuse keys (000000000 and up): a key in two shards is two images."""
    import shutil

    shutil.copytree(known / "s", tmp_path / "s")
    shutil.copytree(known / "t", tmp_path / "t")
    shutil.copy(known / "s" / "a.tar", tmp_path / "s" / "copy.tar")
    shutil.copy(known / "t" / "a.parquet", tmp_path / "t" / "copy.parquet")
    s = summarise(Location(tmp_path / "t"), str(tmp_path / "s"))
    assert (s["images"], s["rows"], s["views_per_image"]) == (8, 24, 3.0)
    assert s["coverage"]["shard_keys"] == 11 and s["coverage"]["keys_missing_from_parquet"] == 1  # c0, untokenized
    assert s["coverage"]["rejected_keys"] == 2 and s["errors"] == []  # the empty a3.jpg of a.tar and of copy.tar


def test_codebook_warnings_name_their_figure_and_threshold(known):
    """One code above ``--max-code-share`` and dead codes above ``--max-dead-codes`` each warn in
    one line with the figure; just under the figures, nothing is said."""
    s = json.loads(run_cli("inspect", str(known / "t"), "--json").stdout)
    cb = s["codebook"]
    share, dead = cb["top_codes"][0]["share"], cb["dead_codes"] / cb["vocab"]
    loud = run_cli("inspect", str(known / "t"), "--max-code-share", str(share - 1e-4), "--max-dead-codes",
                   str(dead - 1e-4))
    assert loud.returncode == 0, loud.stderr
    warnings = [line for line in loud.stdout.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 2
    assert f"code {cb['top_codes'][0]['code']} holds {100 * share:.1f}% of the tokens" in warnings[0]
    assert f"{cb['dead_codes']:,} of 512 codes ({100 * dead:.1f}%) never occur" in warnings[1]
    quiet = json.loads(run_cli("inspect", str(known / "t"), "--json", "--max-code-share", str(min(1.0, share + 1e-4)),
                               "--max-dead-codes", str(min(1.0, dead + 1e-4))).stdout)
    assert quiet["warnings"] == []


def test_the_histogram_reads_on_a_linear_scale_and_marks_the_dead_codes(known, tmp_path):
    from beit_data.summary import summarise
    from pipelines.inspect_tokens import render_histogram

    summary = summarise(Location(known / "t"))
    dead = summary["codebook"]["dead_codes"]
    assert dead > 0
    render_histogram(summary, Location(tmp_path / "hist.png"))
    h = np.asarray(Image.open(tmp_path / "hist.png").convert("RGB")).astype(int)
    assert h.shape == (550, 800, 3)
    # The dead codes' band: light red (tab:red at a quarter over white), across both panels.
    red = (np.abs(h - [245, 201, 202]).max(-1) <= 6)
    columns = np.flatnonzero(red.sum(0) > 100)
    assert len(columns) > 0 and red.sum() > 0
    summary["codebook"]["counts"] = [1] * 512  # every code used: no band
    summary["codebook"].update(dead_codes=0, codes_used=512)
    render_histogram(summary, Location(tmp_path / "full.png"))
    full = np.asarray(Image.open(tmp_path / "full.png").convert("RGB")).astype(int)
    assert (np.abs(full - [245, 201, 202]).max(-1) <= 6).sum() == 0
