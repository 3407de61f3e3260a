"""``beit-data pretrain``: BEiT masked image modeling on precomputed visual tokens.

The defaults are the paper's recipe for ViT-B/16: AdamW (0.9, 0.999), weight decay 0.05
(none on biases, norms, LayerScale, the cls and mask tokens and the relative-position table),
lr 1.5e-3 with a per-step linear warmup over 10 epochs and cosine decay to 1e-5, drop path
0.1, LayerScale 0.1, gradient clipping at 3.0, 75 block-masked patches, 800 epochs.
One code path serves the CPU (fp32, gloo) and GPUs (bf16 autocast, nccl) under torchrun.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from beit_data import BeitDataError, ensure_writable_dir
from beit_data.progress import progress_bar
from beit_data.runtime import autocast, deterministic_on_cpu, dist_info, init_distributed, resolve_device, save_atomic
from beit_data.stream import StreamConfig, TrainStream
from beit_model.beit_mim import masked_positions

__all__ = ["PretrainConfig", "run_pretrain", "build_model", "mim_loss", "CHECKPOINT"]

CHECKPOINT = "checkpoint.pt"
IGNORE = -100  # target of the padding entries of the fixed-shape masked positions


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    shards: str
    tokens: str
    out: str
    model: str = "beit_mim_base_patch16_224"
    epochs: int = 800
    steps: int | None = None  # overrides epochs
    stop_after: int | None = None  # stop this invocation after N more steps, with a checkpoint
    batch_size: int = 256  # per rank
    lr: float = 1.5e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 10
    warmup_steps: int | None = None  # overrides warmup_epochs
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float = 3.0
    drop_path: float = 0.1
    layer_scale: float = 0.1
    num_masked: int = 75
    seed: int = 0
    checkpoint_every: int = 1000
    log_every: int = 10
    resume: bool = False
    skip_missing: bool = False
    compile: bool = False
    device: str = "auto"
    num_threads: int = 4
    progress: bool = True
    shuffle_targets: bool = False  # control experiment: targets from other images

    def __post_init__(self):
        if self.steps is not None and self.steps < 1 or self.epochs < 1:
            raise BeitDataError("--steps and --epochs must be at least 1")
        if self.batch_size < 1 or self.lr <= 0:
            raise BeitDataError("--batch-size and --lr must be positive")


def build_model(cfg: PretrainConfig, vocab_size: int) -> torch.nn.Module:
    import timm

    import beit_model.beit_mim  # noqa: F401  (registers the beit_mim_* variants)

    if not cfg.model.startswith("beit_mim_"):
        raise BeitDataError(f"--model must be a beit_mim_* variant, got {cfg.model}")
    try:
        return timm.create_model(cfg.model, vocab_size=vocab_size, drop_path_rate=cfg.drop_path,
                                 init_values=cfg.layer_scale)
    except RuntimeError as exc:
        raise BeitDataError(f"unknown model {cfg.model}: {exc}") from None


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on 1-D parameters (biases, norms, LayerScale) and ``no_weight_decay()``."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, warmup: int, total: int, lr: float, min_lr: float) -> float:
    """Linear warmup per step, then cosine decay to ``min_lr``, as a factor of ``lr``."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return (min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))) / lr


def mim_loss(model, images: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, max_masked: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The MIM cross-entropy over the masked patches, with fixed shapes and no host sync.

    Returns the loss, the logits (B, K, vocab) and the targets (B, K), where padding entries
    are ``IGNORE``; the loss is the mean over the masked patches, as with boolean indexing.
    """
    positions, real = masked_positions(mask, max_masked)
    with autocast(device):
        logits = model(images, mask, positions)
    targets = tokens.gather(1, positions).masked_fill(~real, IGNORE)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)
    return loss, logits, targets


def _check_model(model, stream: TrainStream, checkpoint: dict | None) -> None:
    grid = tuple(model.grid)
    if grid != (stream.grid, stream.grid):
        raise BeitDataError(f"model grid {grid[0]}x{grid[1]} does not match the tokens' grid "
                            f"{stream.grid}x{stream.grid} ({stream.token_files[0]})")
    if checkpoint is not None and checkpoint["vocab_size"] != stream.vocab:
        raise BeitDataError(f"checkpoint vocab {checkpoint['vocab_size']} does not match the tokens' vocab "
                            f"{stream.vocab} ({stream.token_files[0]})")


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


def run_pretrain(cfg: PretrainConfig) -> dict:
    """Train (or resume) a BEiT MIM model; returns a summary of the run."""
    device = resolve_device(cfg.device, local_rank=dist_info().local_rank)
    with deterministic_on_cpu(device):
        return _train(cfg, device)


def _train(cfg: PretrainConfig, device: torch.device) -> dict:
    dist = init_distributed(device)
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT
    if ckpt_path.exists() and not cfg.resume:
        raise BeitDataError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if cfg.resume and not ckpt_path.exists():
        raise BeitDataError(f"--resume: no checkpoint at {ckpt_path}")
    ensure_writable_dir(out)

    stream = TrainStream(StreamConfig(shards=cfg.shards, tokens=cfg.tokens, batch_size=cfg.batch_size, seed=cfg.seed,
                                      num_masked=cfg.num_masked, skip_missing=cfg.skip_missing,
                                      num_threads=cfg.num_threads, shuffle_targets=cfg.shuffle_targets),
                         rank=dist.rank, world_size=dist.world_size, device=device)
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True) if cfg.resume else None
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, stream.vocab if checkpoint is None else checkpoint["vocab_size"])
    _check_model(model, stream, checkpoint)
    model.to(device)
    steps_per_epoch = stream.steps_per_epoch(0)
    if steps_per_epoch == 0:
        raise BeitDataError(f"fewer images per rank than one batch of {cfg.batch_size}; lower --batch-size")
    total = cfg.steps or cfg.epochs * steps_per_epoch
    warmup = min(total, cfg.warmup_steps if cfg.warmup_steps is not None
                 else int(cfg.warmup_epochs * steps_per_epoch)) or 1
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, total, cfg.lr, cfg.min_lr))
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # bf16 needs no loss scaling
    step, epoch, epoch_step = 0, 0, 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        step, (epoch, epoch_step) = checkpoint["step"], checkpoint["stream"]
        torch.set_rng_state(checkpoint["rng"]["cpu"][dist.rank % len(checkpoint["rng"]["cpu"])])
        if device.type == "cuda" and checkpoint["rng"].get("cuda"):
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"][dist.rank % len(checkpoint["rng"]["cuda"])])
    else:
        torch.manual_seed(cfg.seed + 1000 * dist.rank)  # drop path differs per rank

    train_model = model
    if dist.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)
    is_main = dist.rank == 0
    if is_main:
        (out / "config.json").write_text(json.dumps({**asdict(cfg), "total_steps": total, "warmup_steps": warmup,
                                                     "steps_per_epoch": steps_per_epoch}, indent=1))
    logger = Logger(out, is_main)

    def save():
        rng_cpu = [torch.get_rng_state()]
        if dist.world_size > 1:
            rng_cpu = [None] * dist.world_size
            torch.distributed.all_gather_object(rng_cpu, torch.get_rng_state())
        if is_main:
            save_atomic({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "stream": (epoch, epoch_step),
                "rng": {"cpu": rng_cpu, "cuda": [torch.cuda.get_rng_state()] if device.type == "cuda" else []},
                "config": asdict(cfg), "model_name": cfg.model, "vocab_size": model.vocab_size,
                "model_args": {"embed_dim": model.embed_dim, "depth": model.depth, "num_heads": model.num_heads}},
                ckpt_path)

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    stop_at = step + cfg.stop_after if cfg.stop_after else None
    bar = progress_bar(total=total, initial=step, desc="pretrain", unit="step", disable=not (cfg.progress and is_main))
    first_loss = last_loss = None
    tick, seen = time.perf_counter(), 0
    train_model.train()
    pending: list[tuple[int, torch.Tensor]] = []  # losses not yet read back; reading one waits for the GPU

    def read_losses() -> list[float]:
        """Read the pending losses with one device sync; stop on the first non-finite one."""
        values = torch.stack([loss for _, loss in pending]).tolist()
        for (at, _), value in zip(pending, values):
            if not math.isfinite(value):
                raise BeitDataError(f"loss is {value} at step {at}; stopped. The last good checkpoint is "
                                    f"{ckpt_path}" + ("" if ckpt_path.exists() else " (none was written yet)"))
        pending.clear()
        return values

    for batch in (stream.batches(epoch, epoch_step, dtype=dtype) if step < total else ()):
        loss, logits, targets = mim_loss(train_model, batch.images, batch.tokens, batch.mask, cfg.num_masked, device)
        pending.append((step, loss.detach()))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        step += 1
        epoch, epoch_step = ((batch.epoch + 1, 0) if batch.step + 1 >= stream.steps_per_epoch(batch.epoch)
                             else (batch.epoch, batch.step + 1))
        seen += batch.images.shape[0] * dist.world_size
        log_now = step % cfg.log_every == 0 or step == total
        save_now = step % cfg.checkpoint_every == 0 or step == total or step == stop_at
        if log_now or save_now:
            values = read_losses()
            first_loss = values[0] if first_loss is None else first_loss
            last_loss = values[-1]
        if log_now:
            elapsed = time.perf_counter() - tick
            acc = ((logits.argmax(-1) == targets).sum() / (targets != IGNORE).sum()).item()
            logger.log({"step": step, "epoch": batch.epoch, "loss": last_loss, "acc": acc,
                        "lr": optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm),
                        "img_s": seen / elapsed if elapsed > 0 else 0.0})
            bar.set_postfix(loss=f"{last_loss:.3f}", acc=f"{acc:.3f}", img_s=f"{seen / max(elapsed, 1e-9):.0f}")
            tick, seen = time.perf_counter(), 0
        bar.update()
        if save_now:
            save()
        if step >= total or step == stop_at:
            break
    bar.close()
    logger.close()
    if dist.world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return {"steps": step, "first_loss": first_loss, "last_loss": last_loss, "checkpoint": str(ckpt_path),
            "skipped_rejected": stream.skipped_rejected, "skipped_missing_shards": len(stream.missing)}
