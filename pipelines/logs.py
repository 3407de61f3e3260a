"""What a training run writes as it goes: ``log.jsonl`` and its trackers (``pipelines.trackers``),
the keys of its batches, and its losses read back."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from beit_common import BeitDataError, Location, storage, write_text_atomic
from pipelines.trackers import open_trackers

__all__ = ["Logger", "BatchRecorder", "LossReader"]

FIGURES = ("train", "val", "probe")  # the events whose numbers are figures, for the trackers


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
    """``RUN/log.jsonl`` and the trackers of ``log_to`` (``pipelines.trackers``: TensorBoard,
    ``summary.csv``, W&B, MLflow), written by rank 0 only.

    Args:
        resumed_at: The checkpoint's step when a run resumes, 0 for a new run. Records of
            later steps, which an interrupted run logged after its last checkpoint (or a run
            that died before its first one logged), are dropped from ``log.jsonl``, TensorBoard
            and ``summary.csv``, so that no step appears twice.
        config: The resolved settings, which each tracker records once.
        log_to: The trackers' names.
    """

    def __init__(self, out: Path, enabled: bool, resumed_at: int = 0, config: dict | None = None,
                 log_to: tuple[str, ...] = ("tensorboard",)):
        self.enabled, self.trackers = enabled, []
        if not enabled:
            return
        self.jsonl = open_log(out / "log.jsonl", resumed_at)
        try:
            self.trackers = open_trackers(log_to, out, config or {}, resumed_at)
        except BaseException:
            self.jsonl.close()
            raise

    def log(self, record: dict) -> None:
        """One record: a step's figures (event ``train``), or an event (``{"step": N, "event":
        ...}``), each with its wall-clock ``time`` (Unix seconds). The figures of the ``train``,
        ``val`` and ``probe`` records go to every tracker; the ``val`` and ``probe`` figures are
        also printed, a line each."""
        if not self.enabled:
            return
        event = record.get("event", "train")
        row = {"step": record["step"], "event": event, "time": round(time.time(), 3), **record}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if event not in FIGURES:
            return
        if event != "train":  # the quality figures are rare and read by people: a line each, above the bar
            tqdm.write(f"pretrain: {said(record)}", file=sys.stderr)
        figures = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        for tracker in self.trackers:
            tracker.log(record["step"], figures)

    def close(self, failed: bool = False) -> None:
        """Close ``log.jsonl`` and the trackers; ``failed``: the run ends with an error."""
        if self.enabled:
            self.jsonl.close()
        for tracker in self.trackers:
            tracker.close(failed)


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
