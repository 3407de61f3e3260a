"""Stopping a run cleanly when Slurm, Kubernetes or a user asks it to.

SIGTERM (a preemption or ``scancel``), SIGINT (Ctrl-C) and SIGHUP (a closed terminal) do not
kill the trainer: they ask it to finish the current step, write a checkpoint and return, so
that ``--resume`` continues exactly and no child process (DALI's loader process, the
multiprocessing resource tracker) is left behind. A second SIGINT stops at once. Under
torchrun every rank learns of a signal that reached any of them before the next step, so
all ranks stop after the same step.
"""

from __future__ import annotations

import signal
import threading

import torch

__all__ = ["Preemption", "SIGNALS"]

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Preemption:
    """While active, turns ``SIGNALS`` into a stop request; ``requested()`` reads it on every rank."""

    def __init__(self, world_size: int = 1):
        self.received = 0  # the signal number, 0 while none came
        self.group = None
        if world_size > 1:  # a CPU group, so that agreeing on a stop never waits for a GPU
            self.group = torch.distributed.new_group(backend="gloo")
        self._previous = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signum

    def requested(self) -> int:
        """The signal any rank received, or 0; a collective call under torchrun."""
        if self.group is None:
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int64)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return int(flag.item())

    @staticmethod
    def name(signum: int) -> str:
        return signal.Signals(signum).name
