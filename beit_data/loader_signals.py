"""Signals in DALI's loader process: it outlives a job-wide preemption by the trainer's last step,
and not its trainer."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time

__all__ = ["LOADER_GRACE_S", "outlive_job_signals", "exit_with_parent"]

LOADER_GRACE_S = 20.0
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Sent by the kernel when the parent dies. Not SIGTERM, which means "finish the step" here, and
# not SIGKILL: the kernel also sends it when the parent's *thread* that started this process
# ends, and the parent may well live on then, so the handler checks before it exits.
_PARENT_DEATH_SIGNAL = signal.SIGUSR2


def outlive_job_signals(grace: float = LOADER_GRACE_S) -> None:
    """Keep DALI's loader process alive while its trainer finishes the step it is on.

    Ctrl-C and a closed terminal reach the whole process group, Slurm's ``scancel`` every
    process of the job, and torchrun each worker's process group, so under Slurm and torchrun
    a preemption brings this process two SIGTERMs. The trainer answers all of them by finishing
    its step (which may still need a batch from here), saving, and closing this process itself.
    So SIGINT and SIGHUP are ignored here, and SIGTERMs end this process ``grace`` seconds after
    the first one, or at once when the trainer is gone. (DALI itself sends SIGTERM only to a
    loader that is still busy a second after the trainer closed the pipeline; that one waits out
    the grace too.)
    """
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    parent = _parent_pid()
    exit_with_parent(parent)
    timer: threading.Timer | None = None

    def on_sigterm(signum, frame) -> None:
        nonlocal timer
        if os.getppid() != parent:
            os._exit(128 + signum)
        if timer is None:
            timer = threading.Timer(grace, os._exit, (128 + signum,))
            timer.daemon = True
            timer.start()

    signal.signal(signal.SIGTERM, on_sigterm)


def _parent_pid() -> int:
    """The pid of the process that started this one: multiprocessing's record of it (which is
    right even when the parent died before this process got here), else ``getppid``."""
    parent = multiprocessing.parent_process()
    return parent.pid if parent is not None and parent.pid else os.getppid()


def exit_with_parent(parent: int | None = None, *, poll: float = 1.0) -> None:
    """End this process as soon as its parent is gone, however the parent ended (a SIGKILL, the
    OOM killer): a loader left without its trainer holds hundreds of MB for nothing.

    On Linux the kernel signals this process when its parent dies (``PR_SET_PDEATHSIG``). A
    daemon thread also compares ``getppid`` with ``parent`` every ``poll`` seconds: the check
    elsewhere, and where the main thread sits in a call that a signal does not interrupt. A
    parent that died before this call is found at once.
    """
    parent = _parent_pid() if parent is None else parent

    def orphaned() -> bool:
        return os.getppid() != parent

    def on_parent_death(signum, frame) -> None:
        if orphaned():  # not merely the end of the parent's thread that started this process
            os._exit(128 + signum)

    if sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread():
        try:
            signal.signal(_PARENT_DEATH_SIGNAL, on_parent_death)
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(_PARENT_DEATH_SIGNAL), 0, 0, 0)
        except (OSError, AttributeError, ValueError):
            pass  # the thread below still watches
    if orphaned():
        os._exit(128 + _PARENT_DEATH_SIGNAL)

    def watch() -> None:
        while not orphaned():
            time.sleep(poll)
        os._exit(128 + _PARENT_DEATH_SIGNAL)

    threading.Thread(target=watch, daemon=True, name="beit-data-parent-watch").start()
