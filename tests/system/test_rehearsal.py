"""A run at the shape of a real one, as small as the shapes allow: 200 shards of 0 to 2 images
(some without an index, some all rejected), the default --mix-shards and --partitions, a batch
that divides neither the shards nor the windows, 2 ranks under torchrun, two epochs, held-out
shards, a SIGTERM inside a window and a --resume, then a --resume on 1 rank and on 2 again; and
tokenize under torchrun killed part way.
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


def stop_with_sigterm(command: list[str], out, at: int) -> int:
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


def resume(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def global_steps(run, ranks: int, after: int = 0, upto: float = float("inf")) -> list[list[str]]:
    """``[epoch, keys...]`` of each global step in ``(after, upto]`` that ``ranks`` ranks trained,
    from their records in rank order (rank ``r`` reads positions ``r * G / W ..`` of each step)."""
    rows = [[json.loads(line) for line in (run / f"batches-rank{r}.jsonl").read_text().splitlines()]
            for r in range(ranks)]
    chosen = [[row for row in rank if after < row["step"] <= upto] for rank in rows]
    for rank in chosen:  # every step once, the same on each rank
        steps = [r["step"] for r in rank]
        assert steps == [r["step"] for r in chosen[0]] == list(range(after + 1, after + 1 + len(rank)))
    return [[parts[0]["epoch"], *(k for p in parts for k in p["keys"])] for parts in zip(*chosen)]


def test_a_run_stopped_inside_a_window_resumes_bit_for_bit_then_on_1_rank_and_on_2_again(imagenet_shaped, straight,
                                                                                         tmp_path):
    """One run through every kind of restart, against the uninterrupted 2-rank run: SIGTERM inside a
    window and ``--resume`` on 2 ranks (the losses and held-out figures bit for bit), then
    ``--resume`` on 1 rank and on 2 again, each with the same command (the per-rank batch follows
    the global batch of 10): every global step holds exactly the keys of the uninterrupted run (so
    the views and masks, drawn from seed, epoch and key), and its losses to float rounding (drop
    path 0: with drop path, each rank draws its own)."""
    import torch
    from helpers import evaluate_untrained

    from beit_data.order import partition_windows
    from beit_data.replay import ReplaySource, StreamConfig

    data, run = pretrain_args(imagenet_shaped), tmp_path / "run"
    on_two, on_one = torchrun(*data, "--out", str(run)), [BEIT_DATA, *data, "--out", str(run)]

    # 1. SIGTERM inside a window, on 2 ranks.
    stopped = stop_with_sigterm(on_two, run, at=12)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    epoch, step = ckpt["stream"]["epoch"], ckpt["stream"]["step"]
    source = ReplaySource.open(StreamConfig(shards=str(imagenet_shaped["shards"]),
                                            tokens=str(imagenet_shaped["tokens"]), batch_size=5), world_size=2)
    total = 2 * source.steps_per_epoch(0)
    assert source.steps_per_epoch(0) == imagenet_shaped["images"] // 10
    assert stopped + 12 < total
    layout, spec = source.layout(epoch), source.spec
    inside = [p for p, share in enumerate(spec.shares)
              if next(partition_windows(layout, spec, epoch, p, step * share)).start < step * share]
    assert inside, "the run stopped at a window boundary of every partition"

    # 2. --resume on 2 ranks, for 5 steps: bit for bit.
    resume(on_two + ["--resume", "--stop-after", "5"])
    # 3. --resume on 1 rank, for 5 steps.
    one = resume(on_one + ["--resume", "--stop-after", "5"])
    assert "pretrain: resuming with ranks 2 -> 1, batch_size 5 -> 10" in one.stderr
    # 4. --resume on 2 ranks, to the end.
    two = resume(on_two + ["--resume"])
    assert "pretrain: resuming with ranks 1 -> 2, batch_size 10 -> 5" in two.stderr

    on_one_from, on_two_from = stopped + 5, stopped + 10
    expected = global_steps(straight, 2)
    assert len(expected) == total
    assert global_steps(run, 2, upto=on_one_from) == expected[:on_one_from]
    assert global_steps(run, 1, after=on_one_from, upto=on_two_from) == expected[on_one_from:on_two_from]
    assert global_steps(run, 2, after=on_two_from) == expected[on_two_from:]
    for e in (0, 1):
        keys = [k for s in expected if s[0] == e for k in s[1:]]
        assert len(keys) == len(set(keys)) == source.steps_per_epoch(e) * 10  # each key at most once an epoch

    a, b = records(straight), records(run)
    losses = [[r["loss"] for r in rows if "loss" in r] for rows in (a, b)]
    assert len(losses[0]) == len(losses[1]) == total
    assert losses[1][:on_one_from] == losses[0][:on_one_from]  # bit for bit while on 2 ranks
    assert losses[1][on_one_from:] == pytest.approx(losses[0][on_one_from:], rel=1e-3)
    val = [[{k: v for k, v in r.items() if k != "time"} for r in rows if r.get("event") == "val"] for rows in (a, b)]
    assert [r["step"] for r in val[0]] == [r["step"] for r in val[1]] == [*range(0, total, 20), total]
    for x, y in zip(*val):
        if x["step"] <= on_one_from:
            assert x == y
        else:
            assert {k: v for k, v in y.items() if k.startswith("val_")} == \
                pytest.approx({k: v for k, v in x.items() if k.startswith("val_")}, rel=1e-3)
    # The ranks' shares of the held-out set reduce to one process's figures.
    untrained = evaluate_untrained(imagenet_shaped["tokens"], imagenet_shaped["val"], imagenet_shaped["val_tokens"],
                                   count=8)
    for key in ("val_loss", "val_top1", "val_top5"):
        assert val[0][0][key] == pytest.approx(untrained[key], rel=1e-6, abs=1e-9)
