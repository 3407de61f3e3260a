"""Signals in DALI's loader process: it outlives a job-wide preemption by the trainer's last step."""

from __future__ import annotations

import os
import signal
import threading

__all__ = ["LOADER_GRACE_S", "outlive_job_signals"]

LOADER_GRACE_S = 20.0


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
    parent = os.getppid()
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
