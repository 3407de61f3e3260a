"""BEiT v2 end to end on the sample photographs: a tiny random VQ-KD checkpoint in the released
layout tokenizes, and a beitv2_mim model pretrains on its tokens, resumes exactly and exports."""

import dataclasses
import json

import pyarrow.parquet as pq
import pytest
import torch
from helpers import SMALL, cached, run_cli, save_released

from beit_data.tokens import read_meta
from benchmarks.random_vqkd import random_tokenizer
from pipelines.pretrain import PretrainConfig, run_pretrain

V2 = dict(recipe="beitv2", model="beitv2_mim_tiny_patch16_224", batch_size=4, warmup_steps=2, log_every=1,
          device="cpu", progress=False, num_threads=1)


@pytest.fixture(scope="module")
def v2_tokens(sample_shards):
    """A random VQ-KD in the released layout and the sample tokenized with it (built once, ``cached``)."""
    def build(tmp):
        tokenizer = save_released(tmp / "vqkd.pth", random_tokenizer(SMALL, seed=1))
        done = run_cli("tokenize", "--shards", str(sample_shards), "--tokenizer", str(tokenizer), "--out",
                       str(tmp / "tokens"), "--views", "2", "--batch-size", "8", "--device", "cpu", "--quiet")
        assert done.returncode == 0, done.stderr

    tmp = cached("v2_tokens", build, sample_shards)
    return tmp / "vqkd.pth", tmp / "tokens"


def test_vqkd_tokens_record_the_recipe_and_are_the_ids_of_the_models_own_view(sample_shards, v2_tokens):
    from beit_data.dali_views import UNIT_RANGE, DaliViews, ViewSpec
    from beit_data.shards import iter_samples
    from beit_data.stream import model_view_spec
    from beit_data.views import row_view
    from beit_model.tokenizer import load_tokenizer

    tokenizer_path, tokens = v2_tokens
    meta = read_meta(tokens / "sample-000000.parquet")
    tok = load_tokenizer(tokenizer_path)
    assert meta.tokenizer.as_dict() == tok.describe() and meta.tokenizer.kind == "vqkd"
    assert (meta.views.recipe, meta.views.scale, meta.views.interp) == ("beitv2", (0.2, 1.0), "bicubic")
    assert "bicubic" in meta.decoder.resize and meta.min_size == 224
    # The view pretrain replays, before its normalisation, is the tokenized view pixel for pixel,
    # and the stored ids are the tokenizer's ids of it.
    spec = dataclasses.replace(model_view_spec(meta, 224), mean=UNIT_RANGE[0], std=UNIT_RANGE[1], half=False)
    replay, tokenized = DaliViews(spec, batch_size=1), DaliViews(ViewSpec(size=224, interp="bicubic"), batch_size=1)
    images = {s.key: s.image for s in iter_samples(sample_shards / "sample-000000.tar")}
    for row in pq.read_table(tokens / "sample-000000.parquet").to_pylist()[:4]:
        view = row_view(row)
        pixels = replay([images[row["key"]]], [[view]])[0]
        assert torch.equal(pixels, tokenized([images[row["key"]]], [[view]])[0])
        assert tok.encode(pixels).flatten().tolist() == row["tokens"]
    summary = run_cli("inspect", str(tokens))
    assert "tokenizer     vqkd " in summary.stdout and "recipe beitv2  filter bicubic" in summary.stdout
    render = run_cli("inspect", str(tokens), "--shards", str(sample_shards), "--render", row["key"], "--out",
                     str(tokens.parent / "view.png"), "--tokenizer", str(tokenizer_path))
    assert render.returncode != 0 and "no pixel decoder" in render.stderr and "Traceback" not in render.stderr
    render = run_cli("inspect", str(tokens), "--shards", str(sample_shards), "--render", row["key"], "--out",
                     str(tokens.parent / "view.png"))
    assert render.returncode == 0, render.stderr
    assert (tokens.parent / "view.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_beitv2_pretrain_resumes_exactly_and_exports_to_timm(sample_shards, v2_tokens, tmp_path):
    import timm

    _, tokens = v2_tokens
    common = dict(shards=str(sample_shards), tokens=str(tokens), steps=4, checkpoint_every=100, **V2)
    run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "straight"), **common))
    run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "resumed"), stop_after=2, **common))
    run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "resumed"), resume=True, **common))

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]

    assert len(losses(tmp_path / "straight")) == 4 and losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    ckpt = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert any(k.startswith("cls_pt_layers.") for k in ckpt["model"]) and ckpt["vocab_size"] == 512
    config = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert config["recipe"] == "beitv2" and config["lr"] == 1.5e-3 and config["epochs"] == 1600
    done = run_cli("export", str(tmp_path / "resumed"), "--out", str(tmp_path / "enc.pth"))
    assert done.returncode == 0, done.stderr
    info = json.loads((tmp_path / "enc.json").read_text())
    model = timm.create_model(info["timm_model"], checkpoint_path=str(tmp_path / "enc.pth"), **info["timm_kwargs"])
    assert torch.equal(model.blocks[0].attn.qkv.weight, ckpt["model"]["blocks.0.attn.qkv.weight"])
