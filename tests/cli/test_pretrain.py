import json
import math
import re
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import TINY, losses, records, run_cli, write_tar

from beit_common import BeitDataError
from beit_data.old_orders import ORDER_VERSION
from pipelines.pretrain import PretrainConfig, run_pretrain


def test_resume_gives_bitwise_equal_losses(sample_shards, sample_tokens, tmp_path, capfd):
    """A run stopped and resumed gives the losses and weights of a run made without a stop, bit for
    bit, also when the resuming process starts with another torch thread count (as a shell
    launches it after torchrun made the run: the run's own count is set back and said)."""
    common = dict(shards=str(sample_shards), tokens=str(sample_tokens), steps=8, checkpoint_every=100,
                  **{**TINY, "warmup_steps": 1})
    torch.set_num_threads(1)  # the fixture _same_torch_threads puts the count back after the test
    straight = run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "straight"), **common))
    first = run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "resumed"), stop_after=4, **common))
    assert first.steps == 4 and len(losses(tmp_path / "resumed")) == 4
    config = json.loads((tmp_path / "resumed" / "config.json").read_text())
    assert config["torch_threads"] == 1
    # A new run's order is the current version, which its checkpoint records; config.json says it as before too.
    assert (config["order_version"], config["dealt"], config["shared_draws"]) == (ORDER_VERSION, False, False) \
        and ORDER_VERSION == 3
    saved = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert saved["rng"]["threads"] == [1] and saved["config"]["order_version"] == 3
    # What a SIGKILL during a checkpoint write leaves: the next start of the run removes it.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "resumed" / f".checkpoint.pt.tmp-{gone.stdout.strip()}"
    stale.write_bytes(b"half a checkpoint")
    with pytest.raises(BeitDataError, match="`resume`"):
        run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "resumed"), **common))
    torch.set_num_threads(2)
    capfd.readouterr()
    second = run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "resumed"), resume=True, **common))
    assert "torch's CPU threads set to 1, as the run was saved with (this process had 2)" in capfd.readouterr().err
    assert torch.get_num_threads() == 1
    assert straight.steps == second.steps == 8 and not stale.exists()
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")  # bitwise: exact float equality
    assert all(math.isfinite(x) for x in losses(tmp_path / "resumed"))
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


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
        run_pretrain(PretrainConfig.from_flat(tokens=str(tmp_path / "t96"), out=str(tmp_path / "r0"), **common))
    small = DVAEConfig(n_hid=8, n_blk_per_group=1, vocab_size=128, n_init=16)
    save_checkpoint(tmp_path / "t112.pt", small, *small.build())
    run_tokenize(TokenizeConfig(shards=str(sample_shards), tokenizer=str(tmp_path / "t112.pt"),
                                out=str(tmp_path / "t112"), views=1, device="cpu", progress=False))
    run_pretrain(PretrainConfig.from_flat(tokens=str(sample_tokens), out=str(tmp_path / "r1"), **common))
    with pytest.raises(BeitDataError, match=r"^`tokens` holds other data than the run being resumed \(tokenizer "
                                            r"differ\); resume with the same shards and token files$"):
        run_pretrain(PretrainConfig.from_flat(tokens=str(tmp_path / "t112"), out=str(tmp_path / "r1"), resume=True,
                                              **common))


def test_rejected_keys_are_skipped_and_counted(tmp_path, tiny_tokenizer):
    from helpers import jpeg_bytes

    from pipelines.tokenize_shards import TokenizeConfig, run_tokenize

    (tmp_path / "s").mkdir()
    write_tar(tmp_path / "s" / "a.tar", [(f"{i}.jpg", jpeg_bytes((160, 140), seed=i)) for i in range(5)]
              + [("5.jpg", b""), ("6.jpg", jpeg_bytes((160, 140), seed=6))])
    run_tokenize(TokenizeConfig(shards=str(tmp_path / "s"), tokenizer=str(tiny_tokenizer), out=str(tmp_path / "t"),
                                views=2, device="cpu", progress=False))
    summary = run_pretrain(PretrainConfig.from_flat(shards=str(tmp_path / "s"), tokens=str(tmp_path / "t"),
                                          out=str(tmp_path / "r"), steps=3, **{**TINY, "batch_size": 3}))
    # Key 5 has no rows; of the batches (0,1,2), (3,4,6) and (0,1,2), only the second passes it.
    assert summary.steps == 3 and summary.skipped_rejected == 1


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(sample_shards, sample_tokens, tmp_path):
    import re

    cfg = PretrainConfig.from_flat(shards=str(sample_shards), tokens=str(sample_tokens), out=str(tmp_path / "r"),
                                   steps=50, checkpoint_every=1, clip_grad=1e30,
                                   **{**TINY, "lr": 1e12, "warmup_steps": 0})
    with pytest.raises(BeitDataError, match=r"loss is (nan|inf) at step \d+; stopped. The last good checkpoint") as exc:
        run_pretrain(cfg)
    failed_at = int(re.search(r"at step (\d+)", str(exc.value)).group(1))
    kept = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)
    assert kept["step"] == failed_at >= 1  # the checkpoint of the last step whose loss was finite
    assert len(losses(tmp_path / "r")) == failed_at


def test_resume_refuses_settings_that_change_the_run_and_logs_the_others(sample_shards, sample_tokens, tmp_path,
                                                                       capfd):
    common = dict(shards=str(sample_shards), tokens=str(sample_tokens), out=str(tmp_path / "r"), steps=4, **TINY)
    run_pretrain(PretrainConfig.from_flat(stop_after=2, **common))
    refused = {"seed": 3, "drop_path": 0.0, "lr": 5e-4, "model": "beit_mim_base_patch16_224",
               "steps": 6, "mix_shards": 4, "recipe": "beitv2", "betas": (0.9, 0.98), "num_masked": 78}
    ran = PretrainConfig.from_flat(**common).resolved("beit")  # the tokens' recipe, as the run took it
    for name, value in refused.items():
        old = ran.setting(name)
        with pytest.raises(BeitDataError, match=rf"^`{name}` is {re.escape(repr(old))} in the run being resumed, "
                                                rf"not {re.escape(repr(value))}"):
            run_pretrain(PretrainConfig.from_flat(resume=True, **{**common, name: value}))
    with pytest.raises(BeitDataError, match=r"^the global batch \(`batch_size` x ranks x `grad_accum`\) is 4 in the "
                                            r"run being resumed, not 2; a resumed run keeps it"):
        run_pretrain(PretrainConfig.from_flat(resume=True, **{**common, "batch_size": 2}))
    sub = tmp_path / "one_shard"
    sub.mkdir()
    (sub / "sample-000000.tar").write_bytes((sample_shards / "sample-000000.tar").read_bytes())
    with pytest.raises(BeitDataError, match=r"^`shards` holds other data than the run being resumed \(shards differ"):
        run_pretrain(PretrainConfig.from_flat(resume=True, **{**common, "shards": str(sub)}))
    capfd.readouterr()
    done = run_pretrain(PretrainConfig.from_flat(resume=True, **{**common, "log_every": 2, "num_threads": 2}))
    assert done.steps == 4
    assert "pretrain: resuming with num_threads 1 -> 2, stop_after 2 -> None, log_every 1 -> 2" in \
        capfd.readouterr().err.splitlines()
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["lr"] == TINY["lr"] and config["log_every"] == 2


def test_a_failed_start_leaves_no_empty_run_folder_and_a_busy_folder_is_refused(tmp_path, sample_tokens,
                                                                               sample_shards):
    from beit_common import folder_lock

    with pytest.raises(BeitDataError, match="no token file for shard"):
        run_pretrain(PretrainConfig.from_flat(shards=str(sample_shards), tokens=str(tmp_path),
                                              out=str(tmp_path / "new"),
                                    steps=1, **TINY))
    assert not (tmp_path / "new").exists()
    (tmp_path / "busy").mkdir()
    with folder_lock(tmp_path / "busy", "beit-data pretrain"):
        with pytest.raises(BeitDataError, match=r"busy is in use by another beit-data run \(beit-data pretrain"):
            run_pretrain(PretrainConfig.from_flat(shards=str(sample_shards), tokens=str(sample_tokens),
                                        out=str(tmp_path / "busy"), steps=1, **TINY))


def test_too_few_images_says_what_would_help(tmp_path, tiny_tokenizer, sample_shards):
    from helpers import jpeg_bytes

    from pipelines.tokenize_shards import TokenizeConfig, run_tokenize

    (tmp_path / "s").mkdir()
    (tmp_path / "s3").mkdir()
    write_tar(tmp_path / "s" / "a.tar", [("0.jpg", b"")])  # only a reject: no tokenized image
    write_tar(tmp_path / "s3" / "b.tar", [(f"{i}.jpg", jpeg_bytes((150, 130), seed=i)) for i in range(3)])
    for shards in ("s", "s3"):
        run_tokenize(TokenizeConfig(shards=str(tmp_path / shards), tokenizer=str(tiny_tokenizer), views=1,
                                    out=str(tmp_path / f"t{shards}"), device="cpu", progress=False))
    common = dict(shards=str(tmp_path / "s"), tokens=str(tmp_path / "ts"), steps=1, **TINY)
    for batch_size in (1, 4):  # no batch size helps when there is no image at all
        with pytest.raises(BeitDataError, match=r"the shards hold no tokenized image \(every sample was rejected\); "
                                                r"no batch size helps"):
            run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "r"), **{**common, "batch_size": batch_size}))
    with pytest.raises(BeitDataError, match=r"hold 3 tokenized images, fewer than one global batch of 4; lower "
                                            r"`batch_size`"):
        run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "r"), **{**common, "shards": str(tmp_path / "s3"),
                                                                "tokens": str(tmp_path / "ts3")}))


def test_a_resume_drops_what_was_logged_after_the_last_checkpoint(sample_shards, sample_tokens, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = dict(shards=str(sample_shards), tokens=str(sample_tokens), out=str(tmp_path / "r"), steps=6, **TINY)
    run_pretrain(PretrainConfig.from_flat(stop_after=3, **common))
    log = tmp_path / "r" / "log.jsonl"
    # What a run killed at step 5 would leave: two steps logged after its checkpoint at step 3,
    # and half a line.
    with log.open("a") as f:
        f.write(json.dumps({"step": 4, "loss": 9.0}) + "\n" + json.dumps({"step": 5, "loss": 9.0}) + "\n")
        f.write('{"step": 6, "lo')
    run_pretrain(PretrainConfig.from_flat(resume=True, **common))
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6] and 9.0 not in losses(tmp_path / "r")
    events = EventAccumulator(str(tmp_path / "r" / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    # A run that died before its first checkpoint leaves logs; a new run into the folder starts them anew.
    (tmp_path / "r" / "checkpoint.pt").unlink()
    run_pretrain(PretrainConfig.from_flat(**{**common, "steps": 2}))
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]


def test_progress_into_a_log_is_a_plain_line_at_most_every_30_seconds(sample_shards, sample_tokens, tmp_path):
    result = run_cli("pretrain", "--shards", str(sample_shards), "--tokens", str(sample_tokens), "--out",
                     str(tmp_path / "r"), "--model", "beit_mim_tiny_patch16_224", "--steps", "6", "--batch-size", "2",
                     "--log-every", "1", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    # Not a terminal: the bar is a line when it starts and when it closes, not at each of the 6
    # logs, and a line is a line: no carriage-return redraws, no empty lines.
    assert "\r" not in result.stderr and "\n\n" not in result.stderr
    draws = [line for line in result.stderr.splitlines() if "/6 [" in line]
    assert len(draws) in (1, 2) and all(line.startswith("pretrain: ") for line in draws), result.stderr
    assert draws[-1].startswith("pretrain: 100%") and "6/6 [" in draws[-1]
    # Every log row has its event and its wall-clock time; the resolved config went to TensorBoard.
    rows = records(tmp_path / "r")
    assert [r["event"] for r in rows] == ["train"] * 6
    assert all(abs(r["time"] - rows[0]["time"]) < 600 and r["time"] > 1.7e9 for r in rows)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "r" / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    config = json.loads(text.strip("`\n"))
    assert (config["global_batch"], config["total_steps"], config["model"]) == (2, 6, "beit_mim_tiny_patch16_224")


def test_a_checkpoint_from_before_partitions_and_parts_still_resumes(sample_shards, sample_tokens, tmp_path):
    """A run keeps its order version: resumed from its checkpoint, which records it, or from a
    checkpoint in the old layout (the stream as an (epoch, step) pair, settings without the
    version, partitions or the mask's own generator), it trains in the order and with the draws it
    was made with: shards dealt to its ranks, one generator for each sample's view pick and mask."""
    common = dict(shards=str(sample_shards), tokens=str(sample_tokens), steps=4, checkpoint_every=100, **TINY)
    old_order = dict(order_version=1, partitions=1)
    run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "straight"), **common, **old_order))
    run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "old"), stop_after=2, **common, **old_order))
    shutil.copytree(tmp_path / "old", tmp_path / "recorded")
    ckpt = torch.load(tmp_path / "old" / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["order_version"] == 1
    ckpt["stream"] = (ckpt["stream"]["epoch"], ckpt["stream"]["step"])
    for name in ("partitions", "order_version", "image_size", "min_block", "record_batches", "grad_accum", "targets",
                 "tokenizer"):
        ckpt["config"].pop(name)
    torch.save(ckpt, tmp_path / "old" / "checkpoint.pt")
    for run in ("old", "recorded"):
        resumed = run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / run), resume=True, **common))
        assert resumed.steps == 4 and losses(tmp_path / run) == losses(tmp_path / "straight")
        config = json.loads((tmp_path / run / "config.json").read_text())
        assert (config["order_version"], config["partitions"]) == (1, 1)
        assert config["dealt"] is True and config["shared_draws"] is True


@pytest.mark.parametrize("config, version", [
    ({"order_version": 1, "partitions": 2}, 1),  # recorded: the version decides, not the settings
    ({"order_version": 2, "partitions": 8, "dealt": False}, 2),
    ({"order_version": 3, "partitions": 8, "shared_draws": True}, 3),
    ({}, 1),  # from before partitions: shards dealt to its 2 ranks, shared draws
    ({"partitions": 8}, 2),  # from before masks had their own generator
    ({"partitions": 8, "dealt": False, "shared_draws": False}, 3),
    ({"partitions": 8, "targets": "online", "tokenizer": "dvae.pt"}, 3),  # online runs never shared their draws
])
def test_a_resumed_run_takes_the_order_version_its_checkpoint_records_or_its_settings_say(config, version):
    from pipelines.checkpoint import CheckpointMeta
    from pipelines.pretrain import resolve

    saved = CheckpointMeta(step=2, config={"batch_size": 4, **config}, model_name="beit_mim_tiny_patch16_224",
                           vocab_size=64, model_args={}, world_size=2, data={})
    assert saved.order_version == version
    cfg = PretrainConfig.from_flat(shards="s", tokens="t", out="o", recipe="beit", batch_size=4)
    assert cfg.data.order_version == ORDER_VERSION  # a new run's
    data = resolve(cfg, saved, made_with="beit", world_size=2).data
    assert (data.order_version, data.partitions) == (version, 2 if version == 1 else 8)


def test_a_run_of_order_version_1_resumes_on_its_own_ranks_only():
    from pipelines.checkpoint import CheckpointMeta, check_resume
    from pipelines.pretrain import resolve

    ran = PretrainConfig.from_flat(shards="s", tokens="t", out="o", recipe="beit", batch_size=4, order_version=1,
                                   partitions=2)
    saved = CheckpointMeta(step=2, config=ran.flat(), model_name="beit_mim_tiny_patch16_224", vocab_size=64,
                           model_args={}, world_size=2, data={})
    with pytest.raises(BeitDataError, match="its order deals shards to its ranks, so it resumes on them only"):
        resolve(ran, saved, made_with="beit", world_size=1)
    on_one = resolve(ran.with_settings(batch_size=8), saved, made_with="beit", world_size=1)  # the same global batch
    with pytest.raises(BeitDataError, match="^the run being resumed has 2 ranks, not 1; its order deals shards to its "
                                            "ranks$"):
        check_resume(saved, on_one.flat(), PretrainConfig.RESUMABLE, 1, data={})


def step_keys(run, rank: int = 0) -> list[list[str]]:
    """The keys of each step of ``rank``, from its record of its batches."""
    rows = [json.loads(line) for line in (run / f"batches-rank{rank}.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    return [r["keys"] for r in rows]


def test_grad_accum_trains_the_steps_of_the_whole_batch_and_resumes_at_any_step(sample_shards, sample_tokens,
                                                                                tmp_path):
    """Two micro-batches of 2 per step read the images of one batch of 4, step for step (across
    the epoch end: 14 images make 3 steps an epoch), train to the same losses within float
    rounding, resume bit for bit, and resume with the accumulation changed (the per-rank batch
    follows the global batch); a changed global batch is refused."""
    tiny = {**TINY, "drop_path": 0.0, "record_batches": True}
    common = dict(shards=str(sample_shards), tokens=str(sample_tokens), steps=4, checkpoint_every=100, **tiny)
    run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "whole"), **common))
    micro = {**common, "batch_size": 2, "grad_accum": 2}
    run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "micro"), **micro))
    assert step_keys(tmp_path / "micro") == step_keys(tmp_path / "whole") and len(step_keys(tmp_path / "whole")) == 4
    assert losses(tmp_path / "micro") == pytest.approx(losses(tmp_path / "whole"), rel=1e-4)
    config = json.loads((tmp_path / "micro" / "config.json").read_text())
    assert (config["global_batch"], config["steps_per_epoch"], config["total_steps"]) == (4, 3, 4)

    first = run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "stopped"), stop_after=2, **micro))
    assert first.steps == 2
    shutil.copytree(tmp_path / "stopped", tmp_path / "switched")  # resumed below without accumulation
    with pytest.raises(BeitDataError, match=r"the global batch .* is 4 in the run being resumed, not 6"):
        run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "stopped"), resume=True,
                                              **{**micro, "batch_size": 3}))
    run_pretrain(PretrainConfig.from_flat(out=str(tmp_path / "stopped"), resume=True, **micro))
    assert losses(tmp_path / "stopped") == losses(tmp_path / "micro")  # bit for bit
    assert step_keys(tmp_path / "stopped") == step_keys(tmp_path / "micro")

    # The same run resumed without accumulation: batch 4 in one pass, the same steps.
    result = run_cli("pretrain", "--shards", str(sample_shards), "--tokens", str(sample_tokens), "--out",
                     str(tmp_path / "switched"), "--resume", "--model", TINY["model"], "--batch-size", "2",
                     "--grad-accum", "1", "--steps", "4", "--warmup-steps", "2", "--lr", "1e-3", "--log-every", "1",
                     "--checkpoint-every", "100", "--drop-path", "0", "--record-batches", "--device", "cpu",
                     "--num-threads", "1", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "pretrain: resuming with batch_size 2 -> 4, grad_accum 2 -> 1" in result.stderr
    assert step_keys(tmp_path / "switched") == step_keys(tmp_path / "micro")
    assert losses(tmp_path / "switched") == pytest.approx(losses(tmp_path / "micro"), rel=1e-4)
