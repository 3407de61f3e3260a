"""SIGTERM and Ctrl-C: pretrain finishes the step, saves, says why it stopped, leaves no child behind,
and ``--resume`` continues bit for bit (under torchrun with two ranks: tests/system/test_rehearsal.py)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, descendants, invoke

ARGS = ["--model", "beit_mim_tiny_patch16_224", "--steps", "16", "--batch-size", "2", "--warmup-steps", "2",
        "--log-every", "1", "--checkpoint-every", "1000", "--device", "cpu", "--num-threads", "1", "--quiet"]
ENV = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}  # the command sets what it needs itself


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def alive(pids: set[int]) -> set[int]:
    left = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            left.add(pid)
    return left


def launch(command: list[str], run: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *command, "--out", str(run)], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def interrupt(proc: subprocess.Popen, run: Path, sig: int, *, group: bool) -> tuple[str, set[int]]:
    """Wait until the run has logged 3 steps, then send ``sig``; returns stderr and the children seen."""
    deadline = time.monotonic() + 240
    while not (run / "log.jsonl").exists() or len((run / "log.jsonl").read_text().splitlines()) < 3:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    children = descendants(proc.pid)
    os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
    _, err = proc.communicate(timeout=240)
    return err, children


def check_stopped(run: Path, err: str, sig: int, returncode: int) -> int:
    import torch

    name = signal.Signals(sig).name
    assert returncode == 128 + sig, err
    assert "Traceback" not in err and f"stopped by {name} after step" in err
    log = records(run)
    assert log[-1]["event"] == "stopped" and log[-1]["signal"] == name
    step = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert step == log[-1]["step"] == len(log) - 1 < 16  # every finished step logged, and checkpointed
    return step


def losses(run: Path) -> list[float]:
    rows = [r for r in records(run) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))  # no step twice
    return [r["loss"] for r in rows]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_after_the_step_and_resume_is_exact(sample_shards, sample_tokens, tmp_path, sig):
    command = ["cli", "pretrain", "--shards", str(sample_shards), "--tokens", str(sample_tokens), *ARGS]
    run = tmp_path / "stopped"
    # Both reach the whole process group, DALI's loader process too, as Ctrl-C and Slurm's scancel do.
    err, children = interrupt(launch(command, run), run, sig, group=True)
    assert children, "the DALI loader process should have been running"
    check_stopped(run, err, sig, 128 + sig)
    deadline = time.monotonic() + 20
    while alive(children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(children)  # no loader process or resource tracker outlives the trainer
    if sig == signal.SIGINT:
        return  # resuming after either signal is the same; SIGTERM's case shows it
    done = subprocess.run([sys.executable, "-m", *command, "--out", str(run), "--resume"], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    straight = invoke(*command[1:], "--out", tmp_path / "straight")  # the run without a stop, in this process
    assert straight.exit_code == 0, straight.output
    assert losses(run) == losses(tmp_path / "straight")
