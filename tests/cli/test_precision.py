"""``--precision``: fp16 pretraining with its gradient scaler saved in the checkpoint and resumed
exactly; the line that says which precision a run takes; tokenize in bf16."""

import json

import pyarrow.parquet as pq
import torch
from helpers import TINY, invoke, losses

from pipelines.pretrain import PretrainConfig, run_pretrain


def test_fp16_keeps_its_scaler_in_the_checkpoint_and_resumes_bitwise(sample_shards, sample_tokens, tmp_path, capfd):
    # fp16 on the CPU is slow (0.6 s a step here) and its scale halves each step: 3 steps show it.
    common = dict(shards=str(sample_shards), tokens=str(sample_tokens), steps=3, checkpoint_every=100,
                  **{**TINY, "precision": "fp16"})
    run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "straight"), **common))
    assert "pretrain: precision fp16 autocast with a gradient scaler, as asked" in capfd.readouterr().err.splitlines()
    run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "resumed"), stop_after=1, **common))
    saved = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["scaler"]
    log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert saved["scale"] == log[-1]["loss_scale"] and set(saved) >= {"scale", "_growth_tracker"}
    run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "resumed"), resume=True, **common))
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")  # bitwise, the scale's skips included
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert a["scaler"] == b["scaler"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_run_resumed_in_another_precision_says_so_and_starts_its_scaler_afresh(sample_shards, sample_tokens,
                                                                                tmp_path, capfd):
    common = dict(shards=str(sample_shards), tokens=str(sample_tokens), out=str(tmp_path / "r"), steps=3,
                  checkpoint_every=100, **TINY)
    run_pretrain(PretrainConfig.from_flat(stop_after=1, **common))  # auto: fp32 on the CPU, no scaler state
    assert torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["scaler"] == {}
    capfd.readouterr()
    done = run_pretrain(PretrainConfig.from_flat(resume=True, **{**common, "precision": "fp16"}))
    err = capfd.readouterr().err.splitlines()
    assert done.steps == 3 and "pretrain: resuming with stop_after 1 -> None, precision auto -> fp16" in err
    assert torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["scaler"]["scale"] > 0


def test_precision_is_an_option_of_each_command_that_computes_and_is_checked(sample_shards, tmp_path):
    for command in ("pretrain", "tokenize"):
        result = invoke(command, "--shards", sample_shards, "--precision", "fp8", "--out", tmp_path / command)
        assert result.exit_code == 2 and "'fp8' is not one of 'auto', 'bf16', 'fp16', 'fp32'" in result.stderr


def test_tokenize_in_bf16_writes_the_same_rows_with_ids_of_the_tokenizer(sample_shards, tiny_tokenizer, tmp_path):
    common = ["--shards", sample_shards, "--tokenizer", tiny_tokenizer, "--views", "2", "--device", "cpu", "--quiet"]
    assert invoke("tokenize", *common, "--out", tmp_path / "fp32").exit_code == 0
    bf16 = invoke("tokenize", *common, "--out", tmp_path / "bf16", "--precision", "bf16")
    assert bf16.exit_code == 0, bf16.output
    assert "tokenize: precision bf16 autocast, as asked" in bf16.stderr
    for path in sorted((tmp_path / "fp32").glob("*.parquet")):
        a, b = pq.read_table(path), pq.read_table(tmp_path / "bf16" / path.name)
        assert a.drop(["tokens"]).equals(b.drop(["tokens"]))  # the same views: only the ids may round otherwise
        same = (a.column("tokens").combine_chunks().flatten().to_numpy()
                == b.column("tokens").combine_chunks().flatten().to_numpy()).mean()
        assert same > 0.5, same
