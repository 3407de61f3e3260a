"""What a training run writes as it goes: JSONL and TensorBoard logs, and its losses read back."""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from beit_common import BeitDataError, Location, storage, write_text_atomic

__all__ = ["Logger", "BatchRecorder", "LossReader"]


def open_log(path: Path, resumed_at: int):
    """``path`` opened for appending, without the records of steps after ``resumed_at`` (which an
    interrupted run logged after its last checkpoint), so that no step appears twice."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if _step(line) <= resumed_at]
        write_text_atomic(path, "".join(f"{line}\n" for line in kept))
    return path.open("a")


def said(record: dict) -> str:
    """A ``val`` or ``probe`` record as the line printed when it is measured."""
    step = record["step"]
    if record["event"] == "val":
        return (f"held-out at step {step}: top-1 {100 * record['val_top1']:.1f}%, "
                f"top-5 {100 * record['val_top5']:.1f}%, loss {record['val_loss']:.3f} over {record['val_images']} "
                f"images (always the most common code: top-1 {100 * record['val_majority']:.1f}%)")
    return (f"k-NN probe at step {step}: top-1 {100 * record['probe_top1']:.1f}%, "
            f"top-5 {100 * record['probe_top5']:.1f}% (k {record['probe_k']})")


class Logger:
    """``RUN/log.jsonl`` and TensorBoard (``RUN/tb``), written by rank 0 only.

    Args:
        resumed_at: The checkpoint's step when a run resumes, 0 for a new run. Records of
            later steps, which an interrupted run logged after its last checkpoint (or a run
            that died before its first one logged), are dropped from both logs, so that no
            step appears twice.
    """

    def __init__(self, out: Path, enabled: bool, resumed_at: int = 0, config: dict | None = None):
        self.enabled, self.tb = enabled, None
        if not enabled:
            return
        self.jsonl = open_log(out / "log.jsonl", resumed_at)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency, but a bare GPU image may lack it
            warnings.warn("tensorboard is not installed; logging to log.jsonl only", stacklevel=2)
        else:
            self.tb = SummaryWriter(str(out / "tb"), purge_step=resumed_at + 1)
            if config is not None:  # the resolved settings, beside the curves they made
                self.tb.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```", resumed_at)

    def log(self, record: dict) -> None:
        """One record: a step's figures (event ``train``), or an event (``{"step": N, "event":
        ...}``), each with its wall-clock ``time`` (Unix seconds); the ``val`` and ``probe``
        events go to TensorBoard as ``val/*`` and ``probe/*``."""
        if not self.enabled:
            return
        row = {"step": record["step"], "event": record.get("event", "train"), "time": round(time.time(), 3),
               **record}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        group = record.get("event") if record.get("event") in ("val", "probe") else "train"
        if group != "train":  # the quality figures are rare and read by people: a line each, above the bar
            tqdm.write(f"pretrain: {said(record)}", file=sys.stderr)
        for k, v in record.items():
            if self.tb is not None and k not in ("step", "epoch") and isinstance(v, (int, float)):
                self.tb.add_scalar(f"{group}/{k.removeprefix(group + '_')}", v, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


class BatchRecorder:
    """``RUN/batches-rank{R}.jsonl``: the keys each step of this rank read, one line a step, for
    audits ("which images did step 41,000 see?"). Off unless asked for (``record_batches``)."""

    def __init__(self, out: Path, rank: int, enabled: bool, resumed_at: int = 0):
        self.file = open_log(out / f"batches-rank{rank}.jsonl", resumed_at) if enabled else None

    def record(self, step: int, epoch: int, epoch_step: int, keys: list[str]) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"step": step, "epoch": epoch, "epoch_step": epoch_step, "keys": keys}) + "\n")

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _step(line: str) -> float:
    """A log line's step; a line cut off by a kill counts as past every checkpoint."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return float("inf")


class LossReader:
    """Losses kept on the device until a log or a checkpoint needs them: one sync for many steps."""

    def __init__(self, ckpt: Location):
        self.ckpt, self.pending = ckpt, []
        self.first: float | None = None
        self.last: float | None = None

    def add(self, step: int, loss: torch.Tensor) -> None:
        self.pending.append((step, loss))

    def read(self) -> None:
        """Read the pending losses; stop on the first non-finite one."""
        if not self.pending:
            return
        values = torch.stack([loss for _, loss in self.pending]).tolist()
        for (at, _), value in zip(self.pending, values):
            if not math.isfinite(value):
                raise BeitDataError(f"loss is {value} at step {at}; stopped. The last good checkpoint is "
                                    f"{self.ckpt}" + ("" if storage.exists(self.ckpt) else " (none was written yet)"))
        self.pending.clear()
        self.first = values[0] if self.first is None else self.first
        self.last = values[-1]
