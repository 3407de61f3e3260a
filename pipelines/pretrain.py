"""``beit-data pretrain``: BEiT masked image modeling on precomputed visual tokens.

The defaults are the paper's recipe for ViT-B/16: AdamW (0.9, 0.999), weight decay 0.05
(none on biases, norms, LayerScale, the cls and mask tokens and the relative-position table),
lr 1.5e-3 with a per-step linear warmup over 10 epochs and cosine decay to 1e-5, drop path
0.1, LayerScale 0.1, gradient clipping at 3.0, 75 block-masked patches, 800 epochs.
One code path serves the CPU (fp32, gloo) and GPUs (bf16 autocast, nccl) under torchrun.

A run reads top to bottom: ``build`` (stream, model, optimizer), ``restore`` (from the
checkpoint, with ``--resume``), ``loop`` (steps, logs, checkpoints), ``save``.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from beit_common import BeitDataError, ensure_writable_dir, write_atomic
from beit_data.progress import progress_bar
from beit_data.stream import StreamConfig, TrainStream
from pipelines.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from pipelines.config import PretrainConfig
from pipelines.runtime import DistInfo, deterministic_on_cpu, dist_info, init_distributed, resolve_device
from pipelines.training import build_model, build_optimizer, train_step

__all__ = ["PretrainConfig", "run_pretrain"]


class Logger:
    """JSONL and TensorBoard logs, written by rank 0 only."""

    def __init__(self, out: Path, enabled: bool):
        self.enabled = enabled
        self.tb = None
        if enabled:
            self.jsonl = (out / "log.jsonl").open("a")
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency, but a bare GPU image may lack it
                warnings.warn("tensorboard is not installed; logging to log.jsonl only", stacklevel=2)
            else:
                self.tb = SummaryWriter(str(out / "tb"))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for k, v in record.items():
            if self.tb is not None and k not in ("step", "epoch"):
                self.tb.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


class LossReader:
    """Losses kept on the device until a log or a checkpoint needs them: one sync for many steps."""

    def __init__(self, ckpt: Path):
        self.ckpt, self.pending = ckpt, []
        self.first: float | None = None
        self.last: float | None = None

    def add(self, step: int, loss: torch.Tensor) -> None:
        self.pending.append((step, loss))

    def read(self) -> None:
        """Read the pending losses; stop on the first non-finite one."""
        values = torch.stack([loss for _, loss in self.pending]).tolist()
        for (at, _), value in zip(self.pending, values):
            if not math.isfinite(value):
                raise BeitDataError(f"loss is {value} at step {at}; stopped. The last good checkpoint is "
                                    f"{self.ckpt}" + ("" if self.ckpt.exists() else " (none was written yet)"))
        self.pending.clear()
        self.first = values[0] if self.first is None else self.first
        self.last = values[-1]


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
    step: int = 0

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0


def run_pretrain(cfg: PretrainConfig) -> dict:
    """Train (or resume) a BEiT MIM model; returns a summary of the run."""
    device = resolve_device(cfg.device, local_rank=dist_info().local_rank)
    with deterministic_on_cpu(device):
        dist = init_distributed(device)
        try:
            run = build(cfg, device, dist)
            return loop(run)
        finally:
            if dist.world_size > 1 and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


def _open_run_folder(cfg: PretrainConfig) -> Path:
    out = Path(cfg.out)
    ckpt = checkpoint_path(out)
    if ckpt.exists() and not cfg.resume:
        raise BeitDataError(f"{out} already holds a run; pass `resume` to continue it or choose another `out`")
    if cfg.resume and not ckpt.exists():
        raise BeitDataError(f"`resume`: no checkpoint at {ckpt}")
    return ensure_writable_dir(out)


def _schedule(cfg: PretrainConfig, steps_per_epoch: int) -> tuple[int, int]:
    """Total and warmup steps."""
    if steps_per_epoch == 0:
        raise BeitDataError(f"fewer images per rank than one batch of {cfg.batch_size}; lower `batch_size`")
    total = cfg.steps or cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_epochs * steps_per_epoch)
    return total, min(total, warmup) or 1


def _check_model(model, stream: TrainStream, checkpoint: dict | None) -> None:
    grid = tuple(model.grid)
    if grid != (stream.grid, stream.grid):
        raise BeitDataError(f"model grid {grid[0]}x{grid[1]} does not match the tokens' grid "
                            f"{stream.grid}x{stream.grid} ({stream.token_files[0]})")
    if checkpoint is not None and checkpoint["vocab_size"] != stream.vocab:
        raise BeitDataError(f"checkpoint vocab {checkpoint['vocab_size']} does not match the tokens' vocab "
                            f"{stream.vocab} ({stream.token_files[0]})")


def build(cfg: PretrainConfig, device: torch.device, dist: DistInfo) -> Run:
    """The stream, the model and its optimizer, restored from the checkpoint with ``resume``."""
    out = _open_run_folder(cfg)
    stream = TrainStream(StreamConfig(shards=cfg.shards, tokens=cfg.tokens, batch_size=cfg.batch_size, seed=cfg.seed,
                                      mix_shards=cfg.mix_shards, num_masked=cfg.num_masked,
                                      skip_missing=cfg.skip_missing, num_threads=cfg.num_threads,
                                      shuffle_targets=cfg.shuffle_targets),
                         rank=dist.rank, world_size=dist.world_size, device=device)
    checkpoint = load_checkpoint(checkpoint_path(out)) if cfg.resume else None
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, stream.vocab if checkpoint is None else checkpoint["vocab_size"],
                        drop_path=cfg.drop_path, layer_scale=cfg.layer_scale)
    _check_model(model, stream, checkpoint)
    model.to(device)
    total, warmup = _schedule(cfg, stream.steps_per_epoch(0))
    optimizer, scheduler = build_optimizer(model, lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
                                           betas=cfg.betas, warmup=warmup, total=total)
    run = Run(cfg=cfg, device=device, dist=dist, out=out, stream=stream, model=model, optimizer=optimizer,
              scheduler=scheduler, total=total, warmup=warmup)
    if checkpoint is not None:
        restore(run, checkpoint)
    else:
        torch.manual_seed(cfg.seed + 1000 * dist.rank)  # drop path differs per rank
    if run.is_main:
        config = {**asdict(cfg), "total_steps": total, "warmup_steps": warmup,
                  "steps_per_epoch": stream.steps_per_epoch(0)}
        write_atomic(out / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=1)))
    return run


def restore(run: Run, checkpoint: dict) -> None:
    """Model, optimizer, scheduler, stream position and RNG as the checkpoint left them."""
    run.model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    run.step = checkpoint["step"]
    run.stream.seek(*checkpoint["stream"])
    rng = checkpoint["rng"]
    torch.set_rng_state(rng["cpu"][run.dist.rank % len(rng["cpu"])])
    if run.device.type == "cuda" and rng.get("cuda"):
        torch.cuda.set_rng_state(rng["cuda"][run.dist.rank % len(rng["cuda"])])


def save(run: Run) -> None:
    """Every rank's RNG state, and rank 0 writes the checkpoint."""
    rng_cpu = [torch.get_rng_state()]
    if run.dist.world_size > 1:
        rng_cpu = [None] * run.dist.world_size
        torch.distributed.all_gather_object(rng_cpu, torch.get_rng_state())
    if run.is_main:
        save_checkpoint(checkpoint_path(run.out), model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
                        step=run.step, stream=run.stream.position, rng_cpu=rng_cpu,
                        rng_cuda=[torch.cuda.get_rng_state()] if run.device.type == "cuda" else [],
                        config=asdict(run.cfg), model_name=run.cfg.model)


def _forward_module(run: Run) -> torch.nn.Module:
    """The model as the step calls it: wrapped in DDP under torchrun, compiled with ``compile``."""
    forward = run.model
    if run.dist.world_size > 1:
        forward = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    return torch.compile(forward) if run.cfg.compile else forward


def loop(run: Run) -> dict:
    """Train from ``run.step`` to the end, or for ``stop_after`` steps; log and save on the way."""
    cfg = run.cfg
    forward = _forward_module(run)
    logger = Logger(run.out, run.is_main)
    losses = LossReader(checkpoint_path(run.out))
    stop_at = min(run.total, run.step + cfg.stop_after if cfg.stop_after else run.total)
    bar = progress_bar(total=run.total, initial=run.step, desc="pretrain", unit="step",
                       disable=not (cfg.progress and run.is_main))
    dtype = torch.bfloat16 if run.device.type == "cuda" else torch.float32
    tick, seen = time.perf_counter(), 0
    run.model.train()
    for batch in (run.stream.batches(dtype=dtype) if run.step < stop_at else ()):
        out = train_step(run.model, run.optimizer, run.scheduler, batch.images, batch.tokens, batch.mask,
                         max_masked=cfg.num_masked, clip_grad=cfg.clip_grad, device=run.device, forward=forward)
        run.step += 1
        losses.add(run.step - 1, out.loss)
        seen += batch.images.shape[0] * run.dist.world_size
        log_now = run.step % cfg.log_every == 0 or run.step == run.total
        save_now = run.step % cfg.checkpoint_every == 0 or run.step == stop_at
        if log_now or save_now:
            losses.read()
        if log_now:
            elapsed = time.perf_counter() - tick
            img_s = seen / elapsed if elapsed > 0 else 0.0
            acc = out.accuracy()
            logger.log({"step": run.step, "epoch": batch.epoch, "loss": losses.last, "acc": acc,
                        "lr": run.optimizer.param_groups[0]["lr"], "grad_norm": float(out.grad_norm), "img_s": img_s})
            bar.set_postfix(loss=f"{losses.last:.3f}", acc=f"{acc:.3f}", img_s=f"{img_s:.0f}")
            tick, seen = time.perf_counter(), 0
        bar.update()
        if save_now:
            save(run)
        if run.step >= stop_at:
            break
    bar.close()
    logger.close()
    if run.dist.world_size > 1:
        torch.distributed.barrier()
    return {"steps": run.step, "first_loss": losses.first, "last_loss": losses.last,
            "checkpoint": str(checkpoint_path(run.out)), "skipped_rejected": run.stream.skipped_rejected,
            "skipped_missing_shards": len(run.stream.missing)}
