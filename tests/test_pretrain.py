import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from beit_common import BeitDataError
from pipelines.pretrain import PretrainConfig, run_pretrain
from tests.conftest import REPO, run_cli, write_tar

TINY = dict(model="beit_mim_tiny_patch16_224", batch_size=4, warmup_steps=2, lr=1e-3, log_every=1,
            device="cpu", progress=False, num_threads=1)


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_resume_gives_bitwise_equal_losses(sample_shards, sample_tokens, tmp_path):
    common = dict(shards=str(sample_shards), tokens=str(sample_tokens), steps=8, checkpoint_every=100, **TINY)
    straight = run_pretrain(PretrainConfig(out=str(tmp_path / "straight"), **common))
    first = run_pretrain(PretrainConfig(out=str(tmp_path / "resumed"), stop_after=4, **common))
    assert first["steps"] == 4 and len(losses(tmp_path / "resumed")) == 4
    with pytest.raises(BeitDataError, match="`resume`"):
        run_pretrain(PretrainConfig(out=str(tmp_path / "resumed"), **common))
    second = run_pretrain(PretrainConfig(out=str(tmp_path / "resumed"), resume=True, **common))
    assert straight["steps"] == second["steps"] == 8
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")  # bitwise: exact float equality
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def torchrun(*args, port):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), "-m", "cli", *args], cwd=REPO, capture_output=True, text=True, timeout=900)


def test_two_process_resume_is_exact(sample_shards, sample_tokens, tmp_path):
    args = ["pretrain", "--shards", str(sample_shards), "--tokens", str(sample_tokens), "--model",
            "beit_mim_tiny_patch16_224", "--steps", "6", "--batch-size", "2", "--warmup-steps", "2", "--log-every", "1",
            "--device", "cpu", "--num-threads", "1", "--quiet"]
    straight = torchrun(*args, "--out", str(tmp_path / "straight"), port=29531)
    assert straight.returncode == 0, straight.stderr[-3000:]
    part = torchrun(*args, "--out", str(tmp_path / "resumed"), "--stop-after", "3", port=29532)
    assert part.returncode == 0, part.stderr[-3000:]
    rest = torchrun(*args, "--out", str(tmp_path / "resumed"), "--resume", port=29533)
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert len(losses(tmp_path / "straight")) == 6
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    config = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert config["steps_per_epoch"] == 3  # 8 and 6 images on the two ranks in epoch 0: min(4, 3) batches of 2


def test_missing_parquet_is_an_error_or_skipped(sample_shards, sample_tokens, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    (tokens / "sample-000001.parquet").write_bytes((sample_tokens / "sample-000001.parquet").read_bytes())
    args = ["pretrain", "--shards", str(sample_shards), "--tokens", str(tokens), "--model",
            "beit_mim_tiny_patch16_224", "--steps", "1", "--batch-size", "2", "--device", "cpu", "--quiet"]
    failed = run_cli(*args, "--out", str(tmp_path / "a"))
    assert failed.returncode != 0 and "Traceback" not in failed.stderr
    assert "no token file for shard" in failed.stderr and "sample-000000.tar" in failed.stderr
    ok = run_cli(*args, "--out", str(tmp_path / "b"), "--skip-missing")
    assert ok.returncode == 0, ok.stderr
    assert "skipped_missing_shards 1" in ok.stdout


def test_grid_and_vocab_mismatch_are_refused(sample_shards, sample_tokens, tmp_path):
    from beit_model.dvae import DVAEConfig, save_checkpoint
    from pipelines.tokenize_shards import TokenizeConfig, run_tokenize

    small = DVAEConfig(n_hid=8, n_blk_per_group=1, vocab_size=128, n_init=16, input_size=96)
    save_checkpoint(tmp_path / "t96.pt", small, *small.build())
    run_tokenize(TokenizeConfig(shards=str(sample_shards), tokenizer=str(tmp_path / "t96.pt"),
                                out=str(tmp_path / "t96"), views=1, device="cpu", progress=False))
    common = dict(shards=str(sample_shards), steps=1, **TINY)
    with pytest.raises(BeitDataError, match="model grid 14x14 does not match the tokens' grid 12x12"):
        run_pretrain(PretrainConfig(tokens=str(tmp_path / "t96"), out=str(tmp_path / "r0"), **common))
    small = DVAEConfig(n_hid=8, n_blk_per_group=1, vocab_size=128, n_init=16)
    save_checkpoint(tmp_path / "t112.pt", small, *small.build())
    run_tokenize(TokenizeConfig(shards=str(sample_shards), tokenizer=str(tmp_path / "t112.pt"),
                                out=str(tmp_path / "t112"), views=1, device="cpu", progress=False))
    run_pretrain(PretrainConfig(tokens=str(sample_tokens), out=str(tmp_path / "r1"), **common))
    with pytest.raises(BeitDataError, match="checkpoint vocab 512 does not match the tokens' vocab 128"):
        run_pretrain(PretrainConfig(tokens=str(tmp_path / "t112"), out=str(tmp_path / "r1"), resume=True,
                                    **{**common, "steps": 2}))


def test_rejected_keys_are_skipped_and_counted(tmp_path, tiny_tokenizer):
    from pipelines.tokenize_shards import TokenizeConfig, run_tokenize
    from tests.conftest import jpeg_bytes

    (tmp_path / "s").mkdir()
    write_tar(tmp_path / "s" / "a.tar", [(f"{i}.jpg", jpeg_bytes((160, 140), seed=i)) for i in range(5)]
              + [("5.jpg", b""), ("6.jpg", jpeg_bytes((160, 140), seed=6))])
    run_tokenize(TokenizeConfig(shards=str(tmp_path / "s"), tokenizer=str(tiny_tokenizer), out=str(tmp_path / "t"),
                                views=2, device="cpu", progress=False))
    summary = run_pretrain(PretrainConfig(shards=str(tmp_path / "s"), tokens=str(tmp_path / "t"),
                                          out=str(tmp_path / "r"), steps=3, **{**TINY, "batch_size": 3}))
    # Key 5 has no rows; of the batches (0,1,2), (3,4,6) and (0,1,2), only the second passes it.
    assert summary["steps"] == 3 and summary["skipped_rejected"] == 1


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(sample_shards, sample_tokens, tmp_path):
    import re

    cfg = PretrainConfig(shards=str(sample_shards), tokens=str(sample_tokens), out=str(tmp_path / "r"), steps=50,
                         checkpoint_every=1, clip_grad=1e30, **{**TINY, "lr": 1e12, "warmup_steps": 0})
    with pytest.raises(BeitDataError, match=r"loss is (nan|inf) at step \d+; stopped. The last good checkpoint") as exc:
        run_pretrain(cfg)
    failed_at = int(re.search(r"at step (\d+)", str(exc.value)).group(1))
    kept = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)
    assert kept["step"] == failed_at >= 1  # the checkpoint of the last step whose loss was finite
    assert len(losses(tmp_path / "r")) == failed_at


@pytest.mark.slow
def test_learning_proves_the_replayed_crops_match_their_tokens(sample_shards, trained_tokenizer, tmp_path):
    """Masked-token accuracy beats the most-frequent-token baseline, and shuffled targets learn less."""
    from pipelines.tokenize_shards import TokenizeConfig, run_tokenize

    run_tokenize(TokenizeConfig(shards=str(sample_shards), tokenizer=str(trained_tokenizer), out=str(tmp_path / "t"),
                                views=10, device="cpu", progress=False))
    tokens = np.concatenate([np.stack(pq.read_table(p).column("tokens").to_numpy(zero_copy_only=False))
                             for p in (tmp_path / "t").glob("*.parquet")])
    baseline = np.bincount(tokens.ravel()).max() / tokens.size
    accuracy = {}
    for shuffle in (False, True):
        out = tmp_path / f"run-{shuffle}"
        run_pretrain(PretrainConfig(shards=str(sample_shards), tokens=str(tmp_path / "t"), out=str(out), steps=300,
                                    drop_path=0.0, shuffle_targets=shuffle,
                                    **{**TINY, "batch_size": 8, "warmup_steps": 20, "lr": 2e-3}))
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        accuracy[shuffle] = float(np.mean([r["acc"] for r in log[-100:]]))
    print(f"baseline {baseline:.3f}  aligned {accuracy[False]:.3f}  shuffled {accuracy[True]:.3f}")
    assert accuracy[False] > baseline + 0.1
    assert accuracy[False] > accuracy[True] + 0.05

