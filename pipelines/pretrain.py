"""``beit-data pretrain``: BEiT masked image modeling on precomputed visual tokens.

The defaults are the paper's recipe for ViT-B/16: AdamW (0.9, 0.999), weight decay 0.05
(none on biases, norms, LayerScale, the cls and mask tokens and the relative-position table),
lr 1.5e-3 with a per-step linear warmup over 10 epochs and cosine decay to 1e-5, drop path
0.1, LayerScale 0.1, gradient clipping at 3.0, 75 block-masked patches, 800 epochs.
One code path serves the CPU (fp32, gloo) and GPUs (bf16 autocast, nccl) under torchrun.

A run reads top to bottom: ``resolve`` (the config completed before anything is built),
``build`` (stream, model, optimizer, and the run's parts restored from the checkpoint with
``--resume``), then ``pipelines.train_loop.loop`` (steps, logs, checkpoints). SIGTERM, SIGINT
and SIGHUP end the loop after the current step, with a checkpoint.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from beit_common import BeitDataError, Location, redacted, write_text_atomic
from beit_data.order import left_out_note
from beit_data.stream import TrainStream
from beit_data.tokens import read_meta, token_files
from pipelines.checkpoint import (
    CHECKPOINT,
    RNGState,
    check_resume,
    checkpoint_path,
    load_checkpoint,
    restore_parts,
    save_checkpoint,
    saved_settings,
)
from pipelines.pretrain_config import PretrainConfig
from pipelines.recipes import TOKENIZER_RECIPE, view_recipe
from pipelines.run_folder import Mirror, run_folder
from pipelines.runtime import DistInfo, deterministic_on_cpu, dist_info, init_distributed, resolve_device
from pipelines.training import build_model, build_optimizer
from pipelines.validation import QualityChecks

__all__ = ["PretrainConfig", "PretrainResult", "Run", "run_pretrain", "resolve", "build", "save"]


@dataclass
class Run:
    """Everything a training run holds while it goes; ``parts`` are what its checkpoint saves."""

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
    parts: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)  # the resolved settings, as config.json holds them
    step: int = 0
    resumed_at: int | None = None
    checks: QualityChecks | None = None
    mirror: Mirror | None = None  # uploads the run folder to an object-storage ``out``

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0


@dataclass
class PretrainResult:
    """What a run did: its steps, first and last losses, where its checkpoint is, what it passed
    over, the signal that stopped it (if one did), and its first and last held-out figures."""

    steps: int
    first_loss: float | None
    last_loss: float | None
    checkpoint: str
    skipped_rejected: int
    skipped_missing_shards: int
    stopped: str | None = None
    holdout: list = field(default_factory=list)

    def warnings(self) -> list[str]:
        """One line for each figure that says the run will not train well, with its baseline."""
        last = self.holdout[-1] if self.holdout else None
        if last is None or last["step"] == 0 or last["val_top1"] > last["val_majority"]:
            return []
        return [f"held-out top-1 {100 * last['val_top1']:.1f}% at step {last['step']} is no better than always "
                f"predicting the most common code ({100 * last['val_majority']:.1f}%): the model has learned nothing "
                "beyond the code frequencies yet; train longer, or check the tokens with beit-data inspect"]

    def summary(self) -> dict:
        return {"steps": self.steps, "first_loss": self.first_loss, "last_loss": self.last_loss,
                "checkpoint": self.checkpoint, "skipped_rejected": self.skipped_rejected,
                "skipped_missing_shards": self.skipped_missing_shards}


def run_pretrain(cfg: PretrainConfig) -> PretrainResult:
    """Train (or resume) a BEiT MIM model."""
    from pipelines.train_loop import loop

    device = resolve_device(cfg.runtime.device, local_rank=dist_info().local_rank)
    tokenizer = online_tokenizer(cfg)
    with deterministic_on_cpu(device):
        dist = init_distributed(device)
        try:
            with run_folder(cfg.runtime, dist) as (out, mirror):
                checkpoint = load_checkpoint(checkpoint_path(out)) if cfg.runtime.resume else None
                cfg = resolve(cfg, checkpoint, dist.world_size, tokenizer)
                return loop(build(cfg, out, device, dist, mirror, checkpoint, tokenizer))
        finally:
            if dist.world_size > 1 and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


def online_tokenizer(cfg: PretrainConfig):
    """The tokenizer of a run with online targets, loaded (safely: ``beit_model.weights``); else None."""
    if not cfg.data.online:
        return None
    from beit_model.tokenizer import load_tokenizer

    return load_tokenizer(cfg.data.tokenizer)


def resolve(cfg: PretrainConfig, checkpoint: dict | None, world_size: int = 1, tokenizer=None) -> PretrainConfig:
    """The config complete, before anything is built: the order of a run from before partitions
    (shards dealt to its ranks), the per-rank batch of a run resumed on another number of ranks,
    and the recipe of the token files (or of the online tokenizer) where none was named."""
    if checkpoint is not None:
        saved = saved_settings(checkpoint)
        if saved["dealt"]:
            cfg = cfg.with_settings(dealt=True, partitions=saved["partitions"])
        if saved["shared_draws"] and saved["targets"] == "stored":  # online runs never shared them
            cfg = cfg.with_settings(shared_draws=True)
        cfg = _same_global_batch(cfg, saved, checkpoint["world_size"], world_size)
    if cfg.recipe is None and tokenizer is not None:
        cfg = cfg.resolved(TOKENIZER_RECIPE[tokenizer.kind])
    if cfg.recipe is None:  # (no token file at all is said by the stream, naming the shard)
        files = token_files(cfg.data.tokens, allow_empty=True)
        cfg = cfg.resolved(read_meta(files[0])["views"].get("recipe", "beit") if files else "beit")
    return cfg


def _same_global_batch(cfg: PretrainConfig, saved: dict, saved_world: int, world_size: int) -> PretrainConfig:
    """A run resumed on ``world_size`` ranks, or with another ``grad_accum``, keeps its global
    batch: the per-rank batch follows. A changed ``batch_size`` on the same ranks and
    accumulation is left for ``check_resume`` to refuse."""
    data, before = cfg.data, saved["batch_size"] * saved_world * saved["grad_accum"]
    if data.global_batch(world_size) == before or (world_size, data.grad_accum) == (saved_world, saved["grad_accum"]):
        return cfg
    per_rank, rest = divmod(before, world_size * data.grad_accum)
    if rest or (saved["dealt"] and world_size != saved_world):
        raise BeitDataError(f"the run being resumed trains global batches of {before} ({saved_world} ranks x "
                            f"`grad_accum` {saved['grad_accum']} x `batch_size` {saved['batch_size']}); "
                            + ("its order deals shards to its ranks, so it resumes on them only" if saved["dealt"]
                               else f"they do not split over {world_size} ranks x `grad_accum` {data.grad_accum}; "
                                    "choose a `grad_accum` that divides them"))
    return cfg.with_settings(batch_size=per_rank)


def _schedule(cfg: PretrainConfig, stream: TrainStream, dist: DistInfo) -> tuple[int, int]:
    """Total and warmup steps."""
    stream.source.check_epoch(0)
    note = left_out_note(stream.source.layout(0), stream.source.spec)
    if note and dist.rank == 0:
        print(f"pretrain: {note}", file=sys.stderr)
    steps_per_epoch, optim = stream.steps_per_epoch(0), cfg.optim
    total = optim.steps or optim.epochs * steps_per_epoch
    warmup = optim.warmup_steps if optim.warmup_steps is not None else int(optim.warmup_epochs * steps_per_epoch)
    return total, min(total, warmup) or 1


def run_data(stream: TrainStream) -> dict:
    """What a run trains on, as its checkpoint records it: shard names (not paths, which may
    move), their tokenized images, and the tokenizer and view recipe."""
    return {"shards": [Location(s).name for s in stream.shards], "images_per_shard": stream.source.images_per_shard,
            "tokenizer": stream.meta["tokenizer"], "views": stream.meta["views"]}


def _model(cfg: PretrainConfig, stream: TrainStream, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(cfg.data.seed)
    model = build_model(cfg.arch.model, stream.vocab, drop_path=cfg.arch.drop_path, layer_scale=cfg.arch.layer_scale)
    grid = tuple(model.grid)
    if grid != (stream.grid, stream.grid):
        raise BeitDataError(f"model grid {grid[0]}x{grid[1]} does not match the tokens' grid "
                            f"{stream.grid}x{stream.grid} ({stream.cfg.tokens or stream.cfg.tokenizer})")
    return model.to(device)


def build(cfg: PretrainConfig, out: Path, device: torch.device, dist: DistInfo, mirror: Mirror | None = None,
          checkpoint: dict | None = None, tokenizer=None) -> Run:
    """The stream, the model and its optimizer, with the run's parts restored from ``checkpoint``.
    Online targets draw one fresh view per image each epoch, with the recipe's crop, flip and jitter."""
    recipe = view_recipe(cfg.recipe, views=1, seed=cfg.data.seed) if cfg.data.online else None
    stream = TrainStream(cfg.data, rank=dist.rank, world_size=dist.world_size, device=device, tokenizer=tokenizer,
                         recipe=recipe)
    if checkpoint is not None:
        changed = check_resume(checkpoint, redacted(cfg.flat()), PretrainConfig.RESUMABLE, dist.world_size,
                               run_data(stream))
        if changed and dist.rank == 0:
            print("pretrain: resuming with " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()),
                  file=sys.stderr)
    model = _model(cfg, stream, device)
    total, warmup = _schedule(cfg, stream, dist)
    optim = cfg.optim
    optimizer, scheduler = build_optimizer(model, lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
                                           betas=optim.betas, warmup=warmup, total=total)
    run = Run(cfg=cfg, device=device, dist=dist, out=out, stream=stream, model=model, optimizer=optimizer,
              scheduler=scheduler, total=total, warmup=warmup, data=run_data(stream),
              checks=QualityChecks(cfg.eval, stream, dist, device, depth=len(model.blocks)), mirror=mirror)
    run.parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "stream": stream,
                 "rng": RNGState(device, dist.rank, dist.world_size)}
    if checkpoint is not None:
        restore_parts(checkpoint, run.parts)
        run.step = run.resumed_at = checkpoint["step"]
        if checkpoint["world_size"] != dist.world_size:  # no saved generator is this rank's own: a fresh one
            torch.manual_seed(cfg.data.seed + 1000 * dist.rank + 1_000_003 * run.step)
    else:
        torch.manual_seed(cfg.data.seed + 1000 * dist.rank)  # drop path differs per rank
    run.config = {**redacted(cfg.flat()), "ranks": dist.world_size,
                  "global_batch": cfg.data.global_batch(dist.world_size), "total_steps": total,
                  "warmup_steps": warmup, "steps_per_epoch": stream.steps_per_epoch(0),
                  "torch_threads": torch.get_num_threads()}  # the checkpoint holds each rank's
    if run.is_main:
        write_text_atomic(out / "config.json", json.dumps(run.config, indent=1))
    return run


def save(run: Run) -> None:
    """Every rank gives its parts' state (the RNG states are gathered), rank 0 writes the checkpoint
    and uploads the run folder of an object-storage ``out``."""
    meta = {"step": run.step, "config": redacted(run.cfg.flat()), "model_name": run.cfg.arch.model,
            "vocab_size": run.model.vocab_size, "world_size": run.dist.world_size, "data": run.data,
            "model_args": {"embed_dim": run.model.embed_dim, "depth": run.model.depth,
                           "num_heads": run.model.num_heads}}
    save_checkpoint(checkpoint_path(run.out), run.parts, meta, write=run.is_main)
    push(run)


def push(run: Run) -> None:
    """Upload what changed in the run folder to an object-storage ``out`` (rank 0), the checkpoint
    last: each object appears whole, and a resumed run drops log lines past the checkpoint."""
    if run.mirror is not None and run.is_main:
        run.mirror.push(last=(CHECKPOINT,))
