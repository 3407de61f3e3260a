"""A run at the shape of a real one, as small as the shapes allow: 200 shards of 0 to 2 images
(some without an index, some all rejected), the default --mix-shards and --partitions, a batch
that divides neither the shards nor the windows, 2 ranks under torchrun, two epochs, held-out
shards, a SIGTERM inside a window and a --resume; and tokenize under torchrun killed part way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import REPO, cached, descendants, free_port, tokenize_folder, write_shards

# The tests share the shards and the uninterrupted run: one worker builds them while the other goes on.
pytestmark = pytest.mark.xdist_group("rehearsal")

SHARDS = 200
ENV = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}  # the command sets what it needs itself
BEIT_DATA = os.path.join(os.path.dirname(sys.executable), "beit-data")  # the console script


@pytest.fixture(scope="module")
def imagenet_shaped(tiny_tokenizer):
    """Shards, their token files (one process, uninterrupted) and held-out shards with theirs, built
    once for the package's code (``cached``)."""
    return _imagenet_shaped(cached("rehearsal", lambda root: _imagenet_shaped(root, tiny_tokenizer), tiny_tokenizer),
                            tiny_tokenizer, build=False)


def _imagenet_shaped(root, tiny_tokenizer, build: bool = True) -> dict:
    sizes = np.random.default_rng(5).integers(0, 3, SHARDS).tolist()
    corrupt = (7, 100, 177)
    if build:
        write_shards(root / "shards", sizes, indexed=range(0, SHARDS, 2), corrupt=corrupt)
        write_shards(root / "val", [5, 4], seed=10**6)
        tokenize_folder(root / "shards", root / "tokens", tiny_tokenizer)
        tokenize_folder(root / "val", root / "val_tokens", tiny_tokenizer)
    return {"shards": root / "shards", "tokens": root / "tokens", "val": root / "val",
            "val_tokens": root / "val_tokens", "images": sum(sizes) - sum(sizes[i] for i in corrupt)}


def torchrun(*args: str) -> list[str]:
    """torchrun on 2 ranks of the ``beit-data`` console script (``--no-python``), as the docs run it,
    its rendezvous on a free loopback port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "--no-python", BEIT_DATA, *args]


def wait_for(condition, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_tokenize_killed_part_way_then_rerun_writes_the_rows_of_an_uninterrupted_run(imagenet_shaped, tiny_tokenizer,
                                                                                    tmp_path):
    out = tmp_path / "tokens"
    args = ["tokenize", "--shards", str(imagenet_shaped["shards"]), "--tokenizer", str(tiny_tokenizer), "--out",
            str(out), "--views", "2", "--batch-size", "32", "--min-size", "0", "--device", "cpu", "--quiet"]
    proc = subprocess.Popen(torchrun(*args), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(lambda: len(list(out.glob("*.parquet"))) >= 60, proc)
    # torchrun, both ranks (each in a process group of its own) and their loaders, at once, as a
    # node failure would.
    for pid in {proc.pid, *descendants(proc.pid)}:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("*.parquet")))
    assert 60 <= done < SHARDS, "the run was not killed part way"
    rerun = subprocess.run(torchrun(*args), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.count("skipped ") == 1 and f"skipped {done}" in rerun.stdout  # rank 0 says it, once
    expected = imagenet_shaped["tokens"]
    names = sorted(p.name for p in expected.glob("*.parquet"))
    assert sorted(p.name for p in out.glob("*.parquet")) == names and len(names) == SHARDS
    for name in names:
        a, b = pq.read_table(out / name), pq.read_table(expected / name)
        assert a.equals(b) and a.schema.metadata == b.schema.metadata, name
    assert not [p for p in out.iterdir() if "tmp" in p.name]


PRETRAIN = ["--model", "beit_mim_tiny_patch16_224", "--epochs", "2", "--batch-size", "5", "--warmup-steps", "5",
            "--log-every", "1", "--drop-path", "0", "--val-every", "20", "--val-images", "8", "--record-batches",
            "--device", "cpu", "--num-threads", "1", "--quiet"]


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def trained_keys(run) -> list[list[str]]:
    """``[step] -> keys`` of both ranks, from each rank's record of its batches."""
    ranks = [[json.loads(line) for line in (run / f"batches-rank{r}.jsonl").read_text().splitlines()]
             for r in range(2)]
    for rows in ranks:
        assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))  # every step once
    return [[r0["epoch"], *r0["keys"], *r1["keys"]] for r0, r1 in zip(*ranks)]


def pretrain_args(imagenet_shaped) -> list[str]:
    return ["pretrain", "--shards", str(imagenet_shaped["shards"]), "--tokens", str(imagenet_shaped["tokens"]),
            "--val-shards", str(imagenet_shaped["val"]), "--val-tokens", str(imagenet_shaped["val_tokens"]),
            *PRETRAIN]


@pytest.fixture(scope="module")
def straight(imagenet_shaped):
    """The run uninterrupted, on 2 ranks (run once for the package's code, ``cached``)."""
    def run(folder):
        done = subprocess.run(torchrun(*pretrain_args(imagenet_shaped), "--out", str(folder / "run")), cwd=REPO,
                              env=ENV, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("pretrain: steps") == 1  # the summary, from rank 0 only

    return cached("rehearsal_straight", run, imagenet_shaped["shards"]) / "run"


def stop_with_sigterm(command: list[str], out, at: int = 25) -> int:
    """Run ``command``, SIGTERM it (torchrun passes it on to the ranks) once ``at`` steps are logged;
    returns the checkpoint's step."""
    import torch

    proc = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for(lambda: (out / "log.jsonl").exists()
             and sum('"loss"' in line for line in (out / "log.jsonl").read_text().splitlines()) >= at, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and err.count("stopped by SIGTERM after step") == 1, err[-3000:]
    return torch.load(out / "checkpoint.pt", weights_only=True)["step"]


def test_two_ranks_stopped_inside_a_window_resume_bit_for_bit(imagenet_shaped, straight, tmp_path):
    import torch
    from helpers import evaluate_untrained

    from beit_data.order import partition_windows
    from beit_data.replay import ReplaySource, StreamConfig

    data = pretrain_args(imagenet_shaped)
    stopped = tmp_path / "stopped"
    stop_with_sigterm(torchrun(*data, "--out", str(stopped)), stopped)

    ckpt = torch.load(stopped / "checkpoint.pt", weights_only=True)
    epoch, step = ckpt["stream"]["epoch"], ckpt["stream"]["step"]
    source = ReplaySource.open(StreamConfig(shards=str(imagenet_shaped["shards"]),
                                            tokens=str(imagenet_shaped["tokens"]), batch_size=5), world_size=2)
    assert source.steps_per_epoch(0) == imagenet_shaped["images"] // 10
    assert ckpt["step"] < 2 * source.steps_per_epoch(0)
    layout, spec = source.layout(epoch), source.spec
    inside = [p for p, share in enumerate(spec.shares)
              if next(partition_windows(layout, spec, epoch, p, step * share)).start < step * share]
    assert inside, "the run stopped at a window boundary of every partition"

    resumed = subprocess.run(torchrun(*data, "--out", str(stopped), "--resume"), cwd=REPO, env=ENV,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = records(straight), records(stopped)
    losses = [[r["loss"] for r in rows if "loss" in r] for rows in (a, b)]
    assert losses[0] == losses[1] and len(losses[0]) == 2 * source.steps_per_epoch(0)  # bit for bit
    val = [[{k: v for k, v in r.items() if k != "time"} for r in rows if r.get("event") == "val"] for rows in (a, b)]
    assert val[0] == val[1] and [r["step"] for r in val[0]] == [*range(0, len(losses[0]), 20), len(losses[0])]
    # The ranks' shares of the held-out set reduce to one process's figures.
    one = evaluate_untrained(imagenet_shaped["tokens"], imagenet_shaped["val"], imagenet_shaped["val_tokens"],
                             count=8)
    for key in ("val_loss", "val_top1", "val_top5"):
        assert val[0][0][key] == pytest.approx(one[key], rel=1e-6, abs=1e-9)

    steps = trained_keys(stopped)
    assert steps == trained_keys(straight)
    for e in (0, 1):
        keys = [k for s in steps if s[0] == e for k in s[1:]]
        assert len(keys) == len(set(keys)) == source.steps_per_epoch(e) * 10  # each key at most once an epoch


def global_steps(run, ranks: int, after: int = 0) -> list[list[str]]:
    """``[epoch, keys...]`` of each global step past ``after``, from the ranks' records in rank order
    (rank ``r`` reads positions ``r * G / W ..`` of each step)."""
    rows = [[json.loads(line) for line in (run / f"batches-rank{r}.jsonl").read_text().splitlines()]
            for r in range(ranks)]
    steps = zip(*[[row for row in rank if row["step"] > after] for rank in rows])
    return [[parts[0]["epoch"], *(k for p in parts for k in p["keys"])] for parts in steps]


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_a_run_resumed_on_another_number_of_ranks_trains_the_same_global_steps(imagenet_shaped, straight, tmp_path,
                                                                               before, after):
    """SIGTERM on ``before`` ranks, resume on ``after``: the same command (the per-rank batch
    follows the global batch of 10), and the remaining global steps hold exactly the keys (so
    the views and masks, drawn from seed, epoch and key) of the uninterrupted 2-rank run, with
    its losses to float rounding (drop path 0: with drop path, each rank draws its own)."""
    data, out = pretrain_args(imagenet_shaped), tmp_path / "run"
    start = {2: lambda: torchrun(*data, "--out", str(out)),
             1: lambda: [BEIT_DATA, *data, "--batch-size", "10", "--out", str(out)]}
    step = stop_with_sigterm(start[before](), out)
    command = torchrun(*data, "--out", str(out), "--resume") if after == 2 else \
        [BEIT_DATA, *data, "--out", str(out), "--resume"]
    resumed = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    per_rank = (5, 10) if before == 2 else (10, 5)
    assert f"pretrain: resuming with ranks {before} -> {after}, batch_size {per_rank[0]} -> {per_rank[1]}" in \
        resumed.stderr
    assert global_steps(out, after, after=step) == global_steps(straight, 2, after=step)
    a, b = ([r["loss"] for r in records(run) if "loss" in r] for run in (straight, out))
    assert len(a) == len(b) and b[step:] == pytest.approx(a[step:], rel=1e-3)
