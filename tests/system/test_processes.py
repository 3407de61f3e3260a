"""Tests about the process itself: what a fresh interpreter imports and sets, loader processes that
must outlive or follow their parent, locks that die with their holder, views equal across processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO

from beit_common import (
    BeitDataError,
    folder_lock,
)
from beit_data.views import ViewRecipe, sample_views

PARENT = """
import multiprocessing, sys, threading, time


def loader(ready, mode):
    from beit_data.loader_signals import exit_with_parent

    if mode == "signal":  # the kernel's signal alone: the getppid watch would take an hour
        exit_with_parent(poll=3600)
    else:  # armed off the main thread: the getppid watch alone
        armer = threading.Thread(target=exit_with_parent, kwargs={"poll": 0.2})
        armer.start()
        armer.join()
    ready.set()
    time.sleep(60)


if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    loader_process = ctx.Process(target=loader, args=(ready, sys.argv[1]))
    # Started from a thread that ends once the loader is armed, as a pipeline built off the main
    # thread is: the kernel sends the parent-death signal then too, and the loader must live on.
    starter = threading.Thread(target=lambda: (loader_process.start(), ready.wait(30)))
    starter.start()
    starter.join()
    assert ready.is_set()
    print(loader_process.pid, flush=True)
    time.sleep(60)
"""


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # a zombie no one has reaped yet has ended all the same


TRAINER = """
import sys, time

from beit_data.stream import TrainStream
from beit_data.stream_config import StreamConfig

if __name__ == "__main__":
    batches = TrainStream(StreamConfig(shards=sys.argv[1], tokens=sys.argv[2], batch_size=2, num_threads=1)).batches()
    next(batches)
    print("ready", flush=True)
    time.sleep(60)
"""


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()]



@pytest.mark.parametrize("command", ["tokenize", "pretrain", "train-dvae"])
def test_without_dali_the_commands_name_the_extras(tmp_path, command):
    import subprocess
    import sys

    from helpers import REPO

    args = {"tokenize": ["--tokenizer", str(tmp_path / "t.pt"), "--out", str(tmp_path / "o")],
            "pretrain": ["--tokens", str(tmp_path), "--out", str(tmp_path / "o")],
            "train-dvae": ["--out", str(tmp_path / "d.pt")]}[command]
    code = ("import sys; sys.modules['nvidia.dali'] = None; import cli; "
            f"cli.main([{command!r}, '--shards', {str(tmp_path)!r}, *{args!r}], prog_name='beit-data')")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "NVIDIA DALI is not installed" in result.stderr
    assert "beit-data[cuda13]" in result.stderr and "beit-data[cuda12]" in result.stderr


def test_the_command_sets_mkl_reproducible_mode_before_torch_loads():
    import os
    import subprocess
    import sys

    from helpers import REPO

    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    code = "import sys, os, cli; print(os.environ['MKL_CBWR'], 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.split() == ["AUTO", "False"], done.stderr


def test_a_folder_lock_is_exclusive_and_dies_with_its_process(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from beit_common import folder_lock\n"
        f"with folder_lock({str(tmp_path)!r}, 'beit-data tokenize'):\n"
        "    print('locked', flush=True); time.sleep(600)")], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(BeitDataError, match=rf"^{tmp_path} is in use by another beit-data run \(beit-data "
                                                 rf"tokenize, pid {holder.pid} on .*\); wait for it"):
            with folder_lock(tmp_path, "beit-data pretrain"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with folder_lock(tmp_path, "beit-data pretrain"):  # a killed holder leaves no stale lock
        assert "beit-data pretrain, pid" in (tmp_path / ".beit-data.lock").read_text()


@pytest.mark.parametrize("mode", ["signal", "watch"])
def test_the_loader_process_exits_when_its_parent_is_killed(tmp_path, mode):
    """Either way ``exit_with_parent`` has: the kernel's signal (the getppid watch set to an hour
    here), or the getppid watch alone (armed off the main thread, where no handler can be set).
    The end of the parent thread that started the loader is no parent's death."""
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script), mode], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        line = parent.stdout.readline().strip()
        assert line.isdigit(), line
        child = int(line)
        time.sleep(0.6)  # the thread that started it has ended: the loader lives on
        assert not _gone(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 5
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(child), "the loader outlived its parent"
    finally:
        parent.kill()
        parent.wait()
        if "child" in locals() and not _gone(child):
            os.kill(child, signal.SIGKILL)


@pytest.mark.parametrize("start", ["spawn", "fork"])
def test_dalis_loader_process_exits_when_its_trainer_is_killed(sample_shards, sample_tokens, tmp_path, start):
    """The reproduction: a trainer SIGKILLed with its DALI loader running (DALI's own worker
    process, which reads the shards); the loader used to live on, with no parent. Spawned, as on
    the GPU, and forked, as on the CPU by default."""
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    trainer = subprocess.Popen([sys.executable, str(script), str(sample_shards), str(sample_tokens)], cwd=REPO,
                               stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO), "BEIT_DATA_LOADER_START": start})
    children: list[int] = []
    try:
        assert trainer.stdout.readline().strip() == "ready"
        children = _children(trainer.pid)
        spawned = [c for c in children if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
        assert children and len(spawned) == (start == "spawn"), "no loader process, or not started as asked"
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(timeout=10)
        deadline = time.monotonic() + 5
        while not all(map(_gone, children)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [c for c in children if not _gone(c)] == []
    finally:
        trainer.kill()
        trainer.wait()
        for child in children:
            if not _gone(child):
                os.kill(child, signal.SIGKILL)


def test_tokenize_loads_no_timm_and_importing_beit_mim_registers_the_timm_variants():
    code = ("import sys, pipelines.tokenize_shards, beit_model.tokenizer; print('timm' in sys.modules); "
            "import timm, beit_model.beit_mim; print(timm.list_models('beit_mim_*'))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.splitlines()[0] == "False", done.stderr
    assert "beit_mim_base_patch16_224" in done.stdout and "beit_mim_tiny_patch16_224" in done.stdout, done.stderr


def test_the_loader_process_outlives_a_job_wide_sigterm_only_for_its_grace():
    """torchrun and Slurm send SIGTERM to the loader too: it must not die before the trainer's
    last step has its batch, but it must not linger either."""
    import signal
    import subprocess
    import sys
    import time

    from helpers import REPO

    code = ("import sys, time; from beit_data.loader_signals import outlive_job_signals; outlive_job_signals(1.5); "
            "print('ready', flush=True); time.sleep(60)")

    def started() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        return proc

    proc = started()
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)  # Ctrl-C to the group: ignored
    time.sleep(0.5)
    assert proc.poll() is None
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM and 1.5 <= time.monotonic() - sent < 10

    proc = started()
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)  # scancel's
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)  # torchrun's, to the worker's process group: the grace still runs
    time.sleep(0.5)
    assert proc.poll() is None
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM and 1.5 <= time.monotonic() - sent < 10


def test_cli_does_not_import_torch_or_dali_for_help():
    import subprocess
    import sys

    code = "import sys, cli; cli.main(['--help'], standalone_mode=False); " \
           "print('torch' in sys.modules, 'nvidia.dali' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False False False"


def test_a_script_without_a_main_guard_gets_a_clear_error(sample_shards, sample_tokens, tmp_path):
    """A spawned loader (always on the GPU) imports the main module again; forked, it needs no guard."""
    script = tmp_path / "train.py"
    script.write_text(f"""
from beit_data.stream import StreamConfig, TrainStream
stream = TrainStream(StreamConfig(shards={str(sample_shards)!r}, tokens={str(sample_tokens)!r}, batch_size=3))
next(stream.batches())
""")
    runs = {start: subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=300,
                                  env={**os.environ, "PYTHONPATH": str(REPO), "BEIT_DATA_LOADER_START": start})
            for start in ("spawn", "fork")}  # any other value: tests/unit/test_dali_views.py
    assert runs["spawn"].returncode != 0
    assert 'guard its entry point with `if __name__ == "__main__":`' in runs["spawn"].stderr
    assert runs["fork"].returncode == 0, runs["fork"].stderr


def test_same_views_in_another_process():
    code = ("import json; from beit_data.views import ViewRecipe, sample_views; "
            "print(json.dumps([list(v.__dict__.values()) for v in sample_views(ViewRecipe(seed=7), 'abc', 333, 444)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}, cwd=sys.path[0] or None)
    here = [list(v.__dict__.values()) for v in sample_views(ViewRecipe(seed=7), "abc", 333, 444)]
    assert json.loads(out.stdout) == json.loads(json.dumps(here))
