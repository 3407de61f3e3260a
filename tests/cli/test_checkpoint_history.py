"""A run keeps checkpoints besides its latest (``--keep-checkpoints``, ``--checkpoint-every-epochs``):
which ones, across a resume that changes the settings; export and probe pick one by ``--step``;
and a run killed while it keeps or prunes them leaves every listed one whole."""

import json
import multiprocessing
import os
import shutil
import signal
import socket
from pathlib import Path

import pytest
import torch
from helpers import TINY, cached, invoke, records

from beit_common import Location
from pipelines.checkpoint import load_checkpoint
from pipelines.checkpoint_history import KEPT, kept_checkpoints
from pipelines.pretrain import PretrainConfig, run_pretrain

WEIGHT = "patch_embed.proj.weight"


@pytest.fixture(scope="module")
def kept_run(sample_shards, sample_tokens) -> Path:
    """A run of 6 steps (3 an epoch) saving every step: it keeps the 2 newest and every second
    epoch's until it stops at step 4, then resumes keeping the 3 newest and every epoch's. Read only."""

    def build(folder: Path) -> None:
        common = dict(shards=str(sample_shards), tokens=str(sample_tokens), out=str(folder / "run"), steps=6,
                      checkpoint_every=1, **TINY)
        run_pretrain(PretrainConfig.from_flat(stop_after=4, keep_checkpoints=2, checkpoint_every_epochs=2, **common))
        stopped = [k.location.name for k in kept_checkpoints(Location(folder / "run"))]
        (folder / "stopped.json").write_text(json.dumps(stopped))
        run_pretrain(PretrainConfig.from_flat(resume=True, keep_checkpoints=3, checkpoint_every_epochs=1, **common))

    return cached("kept_run", build, sample_shards, sample_tokens) / "run"


def names(run: Path) -> list[str]:
    return sorted(p.name for p in (run / KEPT).iterdir())


def test_a_run_keeps_the_newest_and_every_epochs_checkpoint_and_resumes_from_the_latest(kept_run):
    assert json.loads((kept_run / "config.json").read_text())["steps_per_epoch"] == 3
    # Stopped at step 4 it kept 3 and 4 (no epoch of 2 ended yet); resumed from checkpoint.pt
    # (step 4), it kept 5 and 6 and the end of epoch 2, and deleted 3 as newer ones came.
    assert json.loads((kept_run.parent / "stopped.json").read_text()) == ["step-00000003.pt", "step-00000004.pt"]
    assert names(kept_run) == ["step-00000004.pt", "step-00000005.pt", "step-00000006-epoch-0002.pt"]
    assert [r["step"] for r in records(kept_run) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    for k in kept_checkpoints(Location(kept_run)):
        assert load_checkpoint(k.location)["step"] == k.step
    # The newest kept one is the latest itself: a hard link, not a second torch.save.
    assert os.path.samefile(kept_run / "checkpoint.pt", kept_run / KEPT / "step-00000006-epoch-0002.pt")
    assert load_checkpoint(kept_run / "checkpoint.pt")["config"]["keep_checkpoints"] == 3


def test_a_run_with_the_defaults_keeps_the_latest_alone_as_before(two_step_run, tmp_path):
    assert not (two_step_run / KEPT).exists()  # no 100th epoch in 2 steps
    result = invoke("export", two_step_run, "--step", "2", "--out", tmp_path / "enc.pth")
    assert result.exit_code == 1 and result.stderr.strip() == (
        f"Error: {two_step_run} keeps no checkpoint of step 2: it keeps none (pretrain --keep-checkpoints, "
        "--checkpoint-every-epochs); without --step, the latest (checkpoint.pt)")
    assert not (tmp_path / "enc.pth").exists()


def test_export_and_probe_take_the_checkpoint_of_a_step(kept_run, labeled_shards, tmp_path):
    from pipelines.probe import load_encoder

    kept, latest = (torch.load(p, weights_only=True)["model"][WEIGHT]
                    for p in (kept_run / KEPT / "step-00000005.pt", kept_run / "checkpoint.pt"))
    assert not torch.equal(kept, latest)
    result = invoke("export", kept_run, "--step", "5", "--out", tmp_path / "enc.safetensors")
    assert result.exit_code == 0, result.output
    from safetensors.torch import load_file

    assert torch.equal(load_file(tmp_path / "enc.safetensors")[WEIGHT], kept)
    assert json.loads((tmp_path / "enc.json").read_text())["step"] == 5
    assert torch.equal(load_encoder(Location(kept_run), 5)[0].patch_embed.proj.weight, kept)
    assert torch.equal(load_encoder(Location(kept_run))[0].patch_embed.proj.weight, latest)
    missing = invoke("export", kept_run, "--step", "3", "--out", tmp_path / "three.pth")
    assert missing.exit_code == 1 and missing.stderr.strip() == (
        f"Error: {kept_run} keeps no checkpoint of step 3: it keeps steps 4, 5, 6; without --step, the latest "
        "(checkpoint.pt)")
    probe = invoke("probe", kept_run, "--step", "6", "--train-shards", labeled_shards / "train",
                   "--val-shards", labeled_shards / "val", "--k", "3", "--device", "cpu", "--quiet", "--json")
    assert probe.exit_code == 0, probe.output
    assert json.loads(probe.stdout)["step"] == 6 and json.loads(probe.stdout)["kind"] == "run"
    export = invoke("probe", tmp_path / "enc.safetensors", "--step", "6", "--train-shards", "x", "--val-shards", "y")
    assert export.exit_code == 1 and export.stderr.strip() == (
        f"Error: {tmp_path / 'enc.safetensors'}: --step picks a checkpoint of a pretrain run folder, and this is none")


def keep_and_die(run: Path, point: str) -> None:
    """In a forked process: keep the latest (made step 7) with the 1 newest, and SIGKILL this
    process at one moment of it: before the copy is renamed to its name, or before the Nth deletion."""
    from beit_common import files
    from pipelines import checkpoint_history
    from pipelines.checkpoint_history import History

    calls = []

    def killed(real):
        def call(*args):
            if point == "copy" or len(calls) == int(point):
                os.kill(os.getpid(), signal.SIGKILL)
            calls.append(args)
            return real(*args)
        return call

    if point == "copy":
        files.os.replace = killed(os.replace)
    else:
        checkpoint_history.remove_file = killed(checkpoint_history.remove_file)
    History(Location(run), newest=1).keep(7)


@pytest.mark.parametrize("point, listed", [
    ("copy", [4, 5, 6]),  # the copy never appears under its name; its temporary file is not listed
    ("0", [4, 5, 6, 7]),  # killed before deleting 4 and 5: the new one is whole first
    ("1", [5, 6, 7]),  # between the two deletions
])
def test_a_run_killed_while_it_keeps_or_prunes_leaves_every_listed_checkpoint_whole(kept_run, tmp_path, point,
                                                                                     listed):
    from beit_common import remove_stale_temps

    run = tmp_path / "run"
    shutil.copytree(kept_run, run, ignore=shutil.ignore_patterns("tb", "*.jsonl"))
    latest = torch.load(run / "checkpoint.pt", weights_only=True)
    (run / "checkpoint.pt").unlink()
    torch.save({**latest, "step": 7}, run / "checkpoint.pt")
    process = multiprocessing.get_context("fork").Process(target=keep_and_die, args=(run, point))
    process.start()
    process.join(timeout=300)
    assert process.exitcode == -signal.SIGKILL
    assert [k.step for k in kept_checkpoints(Location(run))] == listed
    for k in kept_checkpoints(Location(run)):
        assert load_checkpoint(k.location)["step"] == k.step
    temps = [p.name for p in (run / KEPT).iterdir() if p.name.startswith(".")]
    # The copy's temporary file, named for the host and the pid that wrote it.
    assert temps == ([f".step-00000007.pt.tmp-{socket.gethostname()}-{temps[0].rsplit('-', 1)[1]}"]
                     if point == "copy" else [])
    remove_stale_temps(run / KEPT)  # as the next start does (run_folder)
    assert [p.name for p in (run / KEPT).iterdir() if p.name.startswith(".")] == []
