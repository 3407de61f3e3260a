"""The pretrain loop: steps, logs, held-out figures and checkpoints, until the end, ``stop_after``
steps of this invocation, or a signal (which ends it after the current step, with a checkpoint)."""

from __future__ import annotations

import sys
import time
from contextlib import closing
from dataclasses import dataclass, field
from itertools import islice

import torch

from beit_data.progress import progress_bar
from pipelines.checkpoint import checkpoint_path
from pipelines.logs import BatchRecorder, Logger, LossReader
from pipelines.preemption import Preemption
from pipelines.pretrain import PretrainResult, Run, push, save
from pipelines.training import accumulated_step

__all__ = ["loop"]


class Meter:
    """Images per second between two logs."""

    def __init__(self):
        self.tick, self.seen = time.perf_counter(), 0

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.tick
        rate = self.seen / elapsed if elapsed > 0 else 0.0
        self.tick, self.seen = time.perf_counter(), 0
        return rate


@dataclass
class Logs:
    """Where a run's figures go while it trains."""

    logger: Logger
    recorder: BatchRecorder
    losses: LossReader
    meter: Meter
    bar: object

    @classmethod
    def open(cls, run: Run) -> Logs:
        runtime, resumed_at = run.cfg.runtime, run.resumed_at or 0
        return cls(Logger(run.out, run.is_main, resumed_at=resumed_at, config=run.config),
                   BatchRecorder(run.out, run.dist.rank, runtime.record_batches, resumed_at=resumed_at),
                   LossReader(checkpoint_path(run.out)), Meter(),
                   progress_bar(total=run.total, initial=run.step, desc="pretrain", unit="step",
                                disable=not (runtime.progress and run.is_main)))

    def close(self) -> None:
        self.bar.close()
        self.logger.close()
        self.recorder.close()


def _forward_module(run: Run) -> torch.nn.Module:
    """The model as the step calls it: wrapped in DDP under torchrun, compiled with ``compile``."""
    forward = run.model
    if run.dist.world_size > 1:
        forward = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    return torch.compile(forward) if run.cfg.runtime.compile else forward


def _log_step(run: Run, logs: Logs, out, epoch: int) -> None:
    img_s, acc = logs.meter.rate(), out.accuracy()
    record = {"step": run.step, "epoch": epoch, "loss": logs.losses.last, "acc": acc,
              "lr": run.optimizer.param_groups[0]["lr"], "grad_norm": float(out.grad_norm), "img_s": img_s}
    if run.device.type == "cuda":  # the peak so far: a leak shows as growth between logs
        record["max_mem_gb"] = round(torch.cuda.max_memory_allocated(run.device) / 2**30, 3)
    logs.logger.log(record)
    # Not refreshed here: the bar redraws at its own interval (every 30 s into a log file).
    logs.bar.set_postfix(loss=f"{logs.losses.last:.3f}", acc=f"{acc:.3f}", img_s=f"{img_s:.0f}", refresh=False)


@dataclass
class StepRecord:
    """Where a step's samples came from: its place in the order and the keys of its micro-batches."""

    epoch: int = 0
    step: int = 0
    keys: list = field(default_factory=list)
    images: int = 0

    def micro_batches(self, stream):
        """``(images, tokens, mask)`` of each micro-batch from ``stream``, noting where each came from."""
        for batch in stream:
            self.epoch, self.step, self.images = batch.epoch, batch.step, self.images + batch.images.shape[0]
            self.keys.extend(batch.keys)
            yield batch.images, batch.tokens, batch.mask


def _after_step(run: Run, logs: Logs, out, done: StepRecord, stop_at: int, stopped: int) -> None:
    """Record, log, evaluate and save what is due after a step."""
    runtime = run.cfg.runtime
    logs.recorder.record(run.step, done.epoch, done.step, done.keys)
    logs.losses.add(run.step - 1, out.loss)
    logs.meter.seen += done.images * run.dist.world_size
    log_now = run.step % runtime.log_every == 0 or run.step == run.total
    save_now = run.step % runtime.checkpoint_every == 0 or run.step == stop_at or stopped
    if log_now or save_now:
        logs.losses.read()
    if log_now:
        _log_step(run, logs, out, done.epoch)
    logs.bar.update()
    if not stopped:  # a preempted run saves first: the job may have seconds left
        run.checks(run.model, run.step, run.total, logs.logger)
    if save_now:
        logs.recorder.flush()
        save(run)


def loop(run: Run) -> PretrainResult:
    """Train from ``run.step`` to the end, for ``stop_after`` steps, or until a signal."""
    cfg = run.cfg
    forward, logs = _forward_module(run), Logs.open(run)
    stop_at = min(run.total, run.step + cfg.runtime.stop_after if cfg.runtime.stop_after else run.total)
    dtype = torch.bfloat16 if run.device.type == "cuda" else torch.float32
    stopped = 0
    if run.step == 0:
        run.checks(run.model, 0, run.total, logs.logger)  # the held-out figures before training
    run.model.train()
    accum = cfg.data.grad_accum
    try:
        with Preemption(run.dist.world_size) as preemption, closing(run.stream.batches(dtype=dtype)) as stream:
            while run.step < stop_at:
                done = StepRecord()
                out = accumulated_step(run.model, run.optimizer, run.scheduler,
                                       done.micro_batches(islice(stream, accum)), accum=accum,
                                       max_masked=cfg.data.num_masked, clip_grad=cfg.optim.clip_grad, device=run.device,
                                       forward=forward, world_size=run.dist.world_size)
                run.step += 1
                stopped = preemption.requested()
                _after_step(run, logs, out, done, stop_at, stopped)
                if stopped:
                    break
    except BaseException:
        logs.close()  # a failed run leaves no file open: a Python caller goes on
        raise
    return _finish(run, logs, stopped)


def _finish(run: Run, logs: Logs, stopped: int) -> PretrainResult:
    name = Preemption.name(stopped) if stopped else None
    if stopped:
        logs.logger.log({"step": run.step, "event": "stopped", "signal": name})
        if run.is_main:
            print(f"pretrain: stopped by {name} after step {run.step}; {checkpoint_path(run.cfg.runtime.out)} holds "
                  "it, resume to continue", file=sys.stderr)
    logs.close()
    push(run)  # the logs written after the last checkpoint
    if run.dist.world_size > 1:
        torch.distributed.barrier()
    return PretrainResult(steps=run.step, first_loss=logs.losses.first, last_loss=logs.losses.last,
                          checkpoint=str(checkpoint_path(run.cfg.runtime.out)),
                          skipped_rejected=run.stream.skipped_rejected, skipped_missing_shards=len(run.stream.missing),
                          stopped=name, holdout=[r for r in (run.checks.first, run.checks.last) if r is not None])
