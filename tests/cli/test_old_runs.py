"""What an earlier beit-data wrote still works with this one: ``tests/data/v1_run`` holds a tiny
pretrain run stopped after 2 of its 4 steps, its shards, token folders and tokenizer, all written
by the commit its README names (``make.py``), and the log of the same run made without a stop."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from helpers import REPO, invoke, losses, records
from PIL import Image

from pipelines.pretrain import PretrainConfig, run_pretrain

OLD = REPO / "tests" / "data" / "v1_run"
CLOCK = ("time", "img_s")  # the wall clock of a log line, which no rerun repeats


def old_copy(tmp_path: Path, monkeypatch) -> dict:
    """A copy of the old run's folder as the working directory (its settings name their folders
    relative to it), and what the uninterrupted run gave."""
    shutil.copytree(OLD, tmp_path / "v1", ignore=shutil.ignore_patterns("make.py", "README.md"))
    monkeypatch.chdir(tmp_path / "v1")
    return json.loads((OLD / "expected.json").read_text())


def test_an_old_checkpoint_resumes_to_the_losses_of_the_run_made_without_a_stop(tmp_path, monkeypatch):
    expected = old_copy(tmp_path, monkeypatch)
    assert [r["step"] for r in records(Path("run"))][-1] == 2
    result = run_pretrain(PretrainConfig.from_flat(out="run", resume=True, **expected["settings"]))
    assert result.steps == 4 and len(expected["losses"]) == 4
    assert losses(Path("run")) == expected["losses"]  # bitwise: exact float equality
    # Its held-out figures and k-NN probe too, at steps 0 and 2 (before the stop) and 4 (after it).
    assert [{k: v for k, v in r.items() if k not in CLOCK} for r in records(Path("run"))] == expected["log"]


def test_an_old_token_folder_and_tokenizer_read_as_they_did(tmp_path, monkeypatch):
    expected = old_copy(tmp_path, monkeypatch)
    result = invoke("inspect", "tokens", "--shards", "shards", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == expected["inspect"]
    result = invoke("inspect", "tokens", "--shards", "shards", "--render", expected["render"]["key"],
                    "--tokenizer", "tokenizer.pt", "--out", "view.png")
    assert result.exit_code == 0, result.output
    pixels = np.asarray(Image.open("view.png").convert("RGB")).tobytes()  # the view and its reconstruction
    assert hashlib.sha256(pixels).hexdigest() == expected["render"]["pixels_sha256"]


def test_a_run_started_today_with_the_old_settings_trains_as_the_old_code_did(tmp_path, monkeypatch):
    """The optimizer and schedule come from timm's factories now; by default they are the old
    AdamW and cosine: a fresh run of the old settings has the old run's losses and learning rates,
    bit for bit (without the held-out figures and the probe, which never change the trajectory)."""
    expected = old_copy(tmp_path, monkeypatch)
    checks = ("val_shards", "val_tokens", "val_every", "val_images", "probe_every", "probe_train", "probe_val")
    settings = {k: v for k, v in expected["settings"].items() if k not in checks}
    # The old run's thread count (a gradient norm's last bits follow it): a fresh run takes this process's.
    torch.set_num_threads(json.loads(Path("run/config.json").read_text())["torch_threads"])
    run_pretrain(PretrainConfig.from_flat(out="fresh", **settings))
    train = [{k: v for k, v in r.items() if k not in CLOCK} for r in records(Path("fresh"))]
    assert losses(Path("fresh")) == expected["losses"]  # bitwise
    assert train == [r for r in expected["log"] if r["event"] == "train"]  # the lr and gradient norm of each step
