"""``beit-data pretrain``: BEiT masked image modeling on precomputed visual tokens.

The defaults are the paper's recipe for ViT-B/16: AdamW (0.9, 0.999), weight decay 0.05
(none on biases, norms, LayerScale, the cls and mask tokens and the relative-position table),
lr 1.5e-3 with a per-step linear warmup over 10 epochs and cosine decay to 1e-5, drop path
0.1, LayerScale 0.1, gradient clipping at 3.0, 75 block-masked patches, 800 epochs.
One code path serves the CPU (fp32, gloo) and GPUs (bf16 autocast, nccl) under torchrun.

A run reads top to bottom: ``build`` (stream, model, optimizer), ``restore`` (from the
checkpoint, with ``--resume``), ``loop`` (steps, logs, checkpoints), ``save``. SIGTERM,
SIGINT and SIGHUP end the loop after the current step, with a checkpoint.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from beit_common import BeitDataError, Location, redacted, write_text_atomic
from beit_data.order import left_out_note
from beit_data.progress import progress_bar
from beit_data.stream import StreamConfig, TrainStream
from pipelines.checkpoint import CHECKPOINT, check_resume, checkpoint_path, load_checkpoint, save_checkpoint
from pipelines.config import PretrainConfig
from pipelines.logs import BatchRecorder, Logger, LossReader
from pipelines.preemption import Preemption
from pipelines.run_folder import Mirror, run_folder
from pipelines.runtime import DistInfo, deterministic_on_cpu, dist_info, init_distributed, resolve_device
from pipelines.training import build_model, build_optimizer, train_step
from pipelines.validation import QualityChecks

__all__ = ["PretrainConfig", "run_pretrain"]


@dataclass
class Run:
    """Everything a training run holds while it goes."""

    cfg: PretrainConfig
    device: torch.device
    dist: DistInfo
    out: Path
    stream: TrainStream
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    total: int
    warmup: int
    data: dict
    step: int = 0
    resumed_at: int | None = None
    checks: QualityChecks | None = None
    mirror: Mirror | None = None  # uploads the run folder to an object-storage ``out``

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0


def run_pretrain(cfg: PretrainConfig) -> dict:
    """Train (or resume) a BEiT MIM model; returns a summary of the run.

    The summary's ``stopped`` names the signal that ended the run early, if one did.
    """
    device = resolve_device(cfg.device, local_rank=dist_info().local_rank)
    with deterministic_on_cpu(device):
        dist = init_distributed(device)
        try:
            with run_folder(cfg, dist) as (out, mirror):
                return loop(build(cfg, out, device, dist, mirror))
        finally:
            if dist.world_size > 1 and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


def _schedule(cfg: PretrainConfig, stream: TrainStream, dist: DistInfo) -> tuple[int, int]:
    """Total and warmup steps."""
    stream.source.check_epoch(0)
    note = left_out_note(stream.source.layout(0), stream.source.spec)
    if note and dist.rank == 0:
        print(f"pretrain: {note}", file=sys.stderr)
    steps_per_epoch = stream.steps_per_epoch(0)
    total = cfg.steps or cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_epochs * steps_per_epoch)
    return total, min(total, warmup) or 1


def _check_model(model, stream: TrainStream) -> None:
    grid = tuple(model.grid)
    if grid != (stream.grid, stream.grid):
        raise BeitDataError(f"model grid {grid[0]}x{grid[1]} does not match the tokens' grid "
                            f"{stream.grid}x{stream.grid} ({stream.token_files[0]})")


def run_data(stream: TrainStream) -> dict:
    """What a run trains on, as its checkpoint records it: shard names (not paths, which may
    move), their tokenized images, and the tokenizer and view recipe."""
    return {"shards": [Location(s).name for s in stream.shards], "images_per_shard": stream.source.images_per_shard,
            "tokenizer": stream.meta["tokenizer"], "views": stream.meta["views"]}


def build(cfg: PretrainConfig, out: Path, device: torch.device, dist: DistInfo, mirror: Mirror | None = None) -> Run:
    """The stream, the model and its optimizer, restored from the checkpoint with ``resume``."""
    checkpoint = load_checkpoint(checkpoint_path(out)) if cfg.resume else None
    if checkpoint is not None and "partitions" not in checkpoint["config"]:
        cfg = replace(cfg, partitions=None)  # a run from before partitions keeps its order
    stream = TrainStream(StreamConfig(shards=cfg.shards, tokens=cfg.tokens, batch_size=cfg.batch_size, seed=cfg.seed,
                                      partitions=cfg.partitions or dist.world_size, dealt=cfg.partitions is None,
                                      mix_shards=cfg.mix_shards, num_masked=cfg.num_masked,
                                      skip_missing=cfg.skip_missing, num_threads=cfg.num_threads,
                                      shuffle_targets=cfg.shuffle_targets),
                         rank=dist.rank, world_size=dist.world_size, device=device)
    cfg = cfg.for_tokens(stream.meta["views"])
    if checkpoint is not None:
        changed = check_resume(checkpoint, redacted(asdict(cfg)), PretrainConfig.RESUMABLE, dist.world_size,
                               run_data(stream))
        if changed and dist.rank == 0:
            print("pretrain: resuming with " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()),
                  file=sys.stderr)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, stream.vocab,
                        drop_path=cfg.drop_path, layer_scale=cfg.layer_scale)
    _check_model(model, stream)
    model.to(device)
    total, warmup = _schedule(cfg, stream, dist)
    optimizer, scheduler = build_optimizer(model, lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
                                           betas=cfg.betas, warmup=warmup, total=total)
    run = Run(cfg=cfg, device=device, dist=dist, out=out, stream=stream, model=model, optimizer=optimizer,
              scheduler=scheduler, total=total, warmup=warmup, data=run_data(stream),
              checks=QualityChecks(cfg, stream, dist, device, depth=len(model.blocks)), mirror=mirror)
    if checkpoint is not None:
        restore(run, checkpoint)
    else:
        torch.manual_seed(cfg.seed + 1000 * dist.rank)  # drop path differs per rank
    if run.is_main:
        config = {**redacted(asdict(cfg)), "total_steps": total, "warmup_steps": warmup,
                  "steps_per_epoch": stream.steps_per_epoch(0)}
        write_text_atomic(out / "config.json", json.dumps(config, indent=1))
    return run


def restore(run: Run, checkpoint: dict) -> None:
    """Model, optimizer, scheduler, stream position and RNG as the checkpoint left them."""
    run.model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    run.step = run.resumed_at = checkpoint["step"]
    run.stream.seek(*checkpoint["stream"])
    rng = checkpoint["rng"]
    torch.set_rng_state(rng["cpu"][run.dist.rank % len(rng["cpu"])])
    if run.device.type == "cuda" and rng.get("cuda"):
        torch.cuda.set_rng_state(rng["cuda"][run.dist.rank % len(rng["cuda"])])


def save(run: Run) -> None:
    """Every rank's RNG state, and rank 0 writes the checkpoint."""
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if run.device.type == "cuda" else None}
    ranks = [rng]
    if run.dist.world_size > 1:  # every rank's generators: drop path differs per rank
        ranks = [None] * run.dist.world_size
        torch.distributed.all_gather_object(ranks, rng)
    rng_cpu = [r["cpu"] for r in ranks]
    if run.is_main:
        save_checkpoint(checkpoint_path(run.out), model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
                        step=run.step, stream=run.stream.position, rng_cpu=rng_cpu,
                        rng_cuda=[r["cuda"] for r in ranks] if run.device.type == "cuda" else [],
                        config=redacted(asdict(run.cfg)), model_name=run.cfg.model,
                        world_size=run.dist.world_size,
                        data=run.data)
        push(run)


def push(run: Run) -> None:
    """Upload what changed in the run folder to an object-storage ``out`` (rank 0), the checkpoint
    last: each object appears whole, and a resumed run drops log lines past the checkpoint."""
    if run.mirror is not None and run.is_main:
        run.mirror.push(last=(CHECKPOINT,))


def _forward_module(run: Run) -> torch.nn.Module:
    """The model as the step calls it: wrapped in DDP under torchrun, compiled with ``compile``."""
    forward = run.model
    if run.dist.world_size > 1:
        forward = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    return torch.compile(forward) if run.cfg.compile else forward


class Meter:
    """Images per second between two logs."""

    def __init__(self):
        self.tick, self.seen = time.perf_counter(), 0

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.tick
        rate = self.seen / elapsed if elapsed > 0 else 0.0
        self.tick, self.seen = time.perf_counter(), 0
        return rate


def _log_step(run: Run, logger: Logger, losses: LossReader, out, epoch: int, meter: Meter, bar) -> None:
    img_s, acc = meter.rate(), out.accuracy()
    record = {"step": run.step, "epoch": epoch, "loss": losses.last, "acc": acc,
              "lr": run.optimizer.param_groups[0]["lr"], "grad_norm": float(out.grad_norm), "img_s": img_s}
    if run.device.type == "cuda":  # the peak so far: a leak shows as growth between logs
        record["max_mem_gb"] = round(torch.cuda.max_memory_allocated(run.device) / 2**30, 3)
    logger.log(record)
    # Not refreshed here: the bar redraws at its own interval (every 30 s into a log file).
    bar.set_postfix(loss=f"{losses.last:.3f}", acc=f"{acc:.3f}", img_s=f"{img_s:.0f}", refresh=False)


def loop(run: Run) -> dict:
    """Train from ``run.step`` to the end, for ``stop_after`` steps, or until a signal; log and
    save on the way."""
    cfg = run.cfg
    forward = _forward_module(run)
    logger = Logger(run.out, run.is_main, resumed_at=run.resumed_at or 0)
    recorder = BatchRecorder(run.out, run.dist.rank, cfg.record_batches, resumed_at=run.resumed_at or 0)
    losses = LossReader(checkpoint_path(run.out))
    stop_at = min(run.total, run.step + cfg.stop_after if cfg.stop_after else run.total)
    bar = progress_bar(total=run.total, initial=run.step, desc="pretrain", unit="step",
                       disable=not (cfg.progress and run.is_main))
    dtype = torch.bfloat16 if run.device.type == "cuda" else torch.float32
    meter, stopped = Meter(), 0
    if run.step == 0:
        run.checks(run.model, 0, run.total, logger)  # the held-out figures before training
    run.model.train()
    with Preemption(run.dist.world_size) as preemption:
        for batch in (run.stream.batches(dtype=dtype) if run.step < stop_at else ()):
            out = train_step(run.model, run.optimizer, run.scheduler, batch.images, batch.tokens, batch.mask,
                             max_masked=cfg.num_masked, clip_grad=cfg.clip_grad, device=run.device, forward=forward)
            run.step += 1
            recorder.record(run.step, batch.epoch, batch.step, batch.keys)
            losses.add(run.step - 1, out.loss)
            meter.seen += batch.images.shape[0] * run.dist.world_size
            stopped = preemption.requested()
            log_now = run.step % cfg.log_every == 0 or run.step == run.total
            save_now = run.step % cfg.checkpoint_every == 0 or run.step == stop_at or stopped
            if log_now or save_now:
                losses.read()
            if log_now:
                _log_step(run, logger, losses, out, batch.epoch, meter, bar)
            bar.update()
            if not stopped:  # a preempted run saves first: the job may have seconds left
                run.checks(run.model, run.step, run.total, logger)
            if save_now:
                recorder.flush()
                save(run)
            if run.step >= stop_at or stopped:
                break
    bar.close()
    if stopped:
        logger.log({"step": run.step, "event": "stopped", "signal": Preemption.name(stopped)})
        if run.is_main:
            print(f"pretrain: stopped by {Preemption.name(stopped)} after step {run.step}; "
                  f"{checkpoint_path(run.cfg.out)} holds it, resume to continue", file=sys.stderr)
    logger.close()
    recorder.close()
    push(run)  # the logs written after the last checkpoint
    if run.dist.world_size > 1:
        torch.distributed.barrier()
    return {"steps": run.step, "first_loss": losses.first, "last_loss": losses.last,
            "checkpoint": str(checkpoint_path(run.cfg.out)), "skipped_rejected": run.stream.skipped_rejected,
            "skipped_missing_shards": len(run.stream.missing),
            "stopped": Preemption.name(stopped) if stopped else None,
            "held_out": [r for r in (run.checks.first, run.checks.last) if r is not None]}
