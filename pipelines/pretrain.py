"""``beit-data pretrain``: BEiT masked image modeling on precomputed visual tokens.

The defaults are the paper's recipe for ViT-B/16: AdamW (0.9, 0.999), weight decay 0.05
(none on biases, norms, LayerScale, the cls and mask tokens and the relative-position table),
lr 1.5e-3 with a per-step linear warmup over 10 epochs and cosine decay to 1e-5, drop path
0.1, LayerScale 0.1, gradient clipping at 3.0, 75 block-masked patches, 800 epochs, and the
model's input normalised with ImageNet's mean and std. timm's factories make other optimizers and
schedules (``opt``, ``sched``: ``pipelines.training.build_optimizer``).
One code path serves the CPU (fp32, gloo) and GPUs (bf16 autocast where the GPU computes it
natively, fp16 with a gradient scaler where it does not; nccl) under torchrun.

The run reads top to bottom, as nanoGPT's ``train.py`` does:

- ``run_pretrain``: the device, the process group and the run folder; the checkpoint of a
  resumed run is read once, here;
- ``resolve``: the config completed before anything is built, a pure function of the config,
  the checkpoint's record (``CheckpointMeta``) and the token files' metadata (read once, by the
  stream's source);
- ``Trainer``: the stream, the model, its optimizer and schedule, the held-out checks. It is
  itself the checkpoint's part: ``state_dict`` is the whole checkpoint (its record and every
  part's state), ``load_state_dict`` takes it back, so saving and resuming are one call each;
- ``Trainer.train``: steps, logs, held-out figures and checkpoints (the latest, and those the run
  keeps: ``checkpoint_history``), until the end, ``stop_after`` steps of this invocation, or a
  signal (SIGTERM, SIGINT and SIGHUP end it after the current step, with a checkpoint).
"""

from __future__ import annotations

import functools
import json
import sys
import time
from contextlib import closing
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path

import torch

from beit_common import BeitDataError, Location, redacted, save_atomic, storage, write_text_atomic
from beit_data.old_orders import deals_to_ranks, kept_order, order_settings
from beit_data.order import left_out_note
from beit_data.progress import progress_bar
from beit_data.replay import ReplaySource
from beit_data.stream import TrainStream
from beit_data.stream_config import StreamConfig
from pipelines.checkpoint import (
    CHECKPOINT,
    EXTENDABLE,
    LATER_PARTS,
    CheckpointMeta,
    RNGState,
    ScalerState,
    check_resume,
    checkpoint_path,
    load_checkpoint,
)
from pipelines.checkpoint_history import History
from pipelines.config import PretrainConfig, settings_yaml
from pipelines.logs import BatchRecorder, Logger, LossReader
from pipelines.preemption import Preemption
from pipelines.recipes import TOKENIZER_RECIPE, normalisation_note, view_recipe
from pipelines.run_folder import Mirror, run_folder
from pipelines.runtime import (
    DistInfo,
    deterministic_on_cpu,
    dist_info,
    init_distributed,
    resolve_device,
    resolve_precision,
)
from pipelines.trackers import require
from pipelines.training import accumulated_step, build_model, build_optimizer, check_optimizer
from pipelines.validation import QualityChecks

__all__ = ["PretrainConfig", "PretrainResult", "Trainer", "run_pretrain", "resolve"]


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
    device = resolve_device(cfg.runtime.device, local_rank=dist_info().local_rank)
    require(cfg.runtime.log_to)  # a tracker's missing package, in one line before anything is built
    check_optimizer(cfg.optim.opt)  # timm's names, refused before a run folder is made
    tokenizer = online_tokenizer(cfg)
    with deterministic_on_cpu(device):
        dist = init_distributed(device)
        try:
            if cfg.runtime.resume == "auto":  # resume where out holds a run, start one where not
                found = storage.exists(checkpoint_path(cfg.runtime.out))
                cfg = replace(cfg, runtime=replace(cfg.runtime, resume=found))
            with run_folder(cfg.runtime, dist) as (out, mirror):
                checkpoint = load_checkpoint(checkpoint_path(Location(out))) if cfg.runtime.resume else None
                saved = CheckpointMeta.from_checkpoint(checkpoint) if checkpoint is not None else None
                # The token files' footers, read once: their metadata completes the config.
                source = None if cfg.data.online else ReplaySource.open(cfg.data, rank=dist.rank,
                                                                        world_size=dist.world_size)
                # The recipe the targets were made with: the online tokenizer's, or the token files'.
                made_with = TOKENIZER_RECIPE[tokenizer.kind] if tokenizer is not None else source.meta.views.recipe
                trainer = Trainer(resolve(cfg, saved, made_with, dist.world_size), out=out, device=device, dist=dist,
                                  mirror=mirror, saved=saved, source=source, tokenizer=tokenizer)
                if checkpoint is not None:
                    trainer.load_state_dict(checkpoint)
                return trainer.train()
        finally:
            if dist.world_size > 1 and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


def online_tokenizer(cfg: PretrainConfig):
    """The tokenizer of a run with online targets, loaded (safely: ``beit_model.weights``); else None."""
    if not cfg.data.online:
        return None
    from beit_model.tokenizer import load_tokenizer

    return load_tokenizer(cfg.data.tokenizer)


# ---- the config, resolved once ------------------------------------------------------------------


def resolve(cfg: PretrainConfig, saved: CheckpointMeta | None, made_with: str, world_size: int = 1) -> PretrainConfig:
    """The config complete, before anything is built: the order version of a resumed run (its
    checkpoint's: ``beit_data.old_orders``), the per-rank batch of a run resumed on another number
    of ranks, and the recipe of the token files (or of the online tokenizer) where none was named.

    Args:
        saved: The record of the checkpoint being resumed, if any.
        made_with: The recipe of the targets: the token files', or the online tokenizer's kind's.
    """
    changes: dict = {}
    if saved is not None:
        settings = saved.settings
        changes.update(kept_order(settings))  # the order version the run started with
        batch_size = _same_global_batch(cfg.data, settings, saved.world_size, world_size)
        if batch_size != cfg.data.batch_size:
            changes["batch_size"] = batch_size
    if cfg.recipe is None:
        changes["recipe"] = made_with
    return cfg.with_settings(**changes) if changes else cfg


def _same_global_batch(data: StreamConfig, saved: dict, saved_world: int, world_size: int) -> int:
    """The per-rank batch of a run resumed on ``world_size`` ranks, or with another ``grad_accum``:
    it keeps its global batch. A changed ``batch_size`` on the same ranks and accumulation is left
    for ``check_resume`` to refuse."""
    before = saved["batch_size"] * saved_world * saved["grad_accum"]
    if data.global_batch(world_size) == before or (world_size, data.grad_accum) == (saved_world, saved["grad_accum"]):
        return data.batch_size
    per_rank, rest = divmod(before, world_size * data.grad_accum)
    dealt = deals_to_ranks(saved["order_version"])
    if rest or (dealt and world_size != saved_world):
        raise BeitDataError(f"the run being resumed trains global batches of {before} ({saved_world} ranks x "
                            f"`grad_accum` {saved['grad_accum']} x `batch_size` {saved['batch_size']}); "
                            + ("its order deals shards to its ranks, so it resumes on them only" if dealt
                               else f"they do not split over {world_size} ranks x `grad_accum` {data.grad_accum}; "
                                    "choose a `grad_accum` that divides them"))
    return per_rank


def run_data(stream: TrainStream) -> dict:
    """What a run trains on, as its checkpoint records it: shard names (not paths, which may
    move), their tokenized images, and the tokenizer and view recipe."""
    return {"shards": [s.name for s in stream.shards], "images_per_shard": stream.source.images_per_shard,
            **stream.meta.targets()}


# ---- the trainer --------------------------------------------------------------------------------


class Trainer:
    """A pretrain run: its stream, model, optimizer and schedule, device and ranks; the
    checkpoint's part (``state_dict`` / ``load_state_dict``).

    Args:
        cfg: The resolved config (``resolve``).
        out: The local run folder (``run_folder``); ``mirror`` uploads it to an object-storage ``out``.
        saved: The record of the checkpoint being resumed: this run must compute what it did
            (``check_resume``); ``load_state_dict`` then takes its state.
        source: The stored targets' source, already opened (its token footers read); None for
            online targets.
        tokenizer: The online tokenizer, or None.
    """

    def __init__(self, cfg: PretrainConfig, *, out: Path, device: torch.device, dist: DistInfo,
                 mirror: Mirror | None = None, saved: CheckpointMeta | None = None,
                 source: ReplaySource | None = None, tokenizer=None):
        self.cfg, self.out, self.device, self.dist, self.mirror = cfg, out, device, dist, mirror
        self.step, self.resumed_at, self._extended_from = 0, None, None
        self.history = History(Location(mirror.url if mirror is not None else out),
                               newest=cfg.runtime.keep_checkpoints, every_epochs=cfg.runtime.checkpoint_every_epochs)
        # Online targets draw one fresh view per image each epoch, with the recipe's crop, flip and jitter.
        recipe = view_recipe(cfg.recipe, views=1, seed=cfg.data.seed) if cfg.data.online else None
        self.stream = TrainStream(cfg.data, rank=dist.rank, world_size=dist.world_size, device=device,
                                  tokenizer=tokenizer, recipe=recipe, source=source)
        self.data = run_data(self.stream)
        self._steps_in = functools.lru_cache(maxsize=2)(self.stream.steps_per_epoch)  # of an epoch, asked each step
        if saved is not None:
            resumable = PretrainConfig.RESUMABLE + (EXTENDABLE if cfg.runtime.extend else ())
            changed = check_resume(saved, redacted(cfg.flat()), resumable, dist.world_size, self.data)
            if changed and self.is_main:
                print("pretrain: resuming with " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()),
                      file=sys.stderr)
        note = normalisation_note(self.stream.meta.views.recipe, cfg.data.mean, cfg.data.std)
        if note and self.is_main:
            print(f"pretrain: warning: {note}", file=sys.stderr)
        self.precision, why = resolve_precision(cfg.runtime.precision, device)
        if self.is_main and self.precision.worth_saying:
            print(f"pretrain: precision {why}", file=sys.stderr)
        self.scaler = self.precision.scaler()
        self.model = self._model()
        self.total, self.warmup, self.decay = self._schedule()
        if cfg.runtime.extend and saved is not None:
            self._extended_from = saved.step
            if self.total <= saved.step:
                raise BeitDataError(f"`extend`: the run has trained {saved.step} steps; give `steps` (or `epochs`) "
                                    f"beyond them, not {self.total}")
        optim = cfg.optim
        self.optimizer, self.scheduler = build_optimizer(
            self.model, opt=optim.opt, lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
            betas=optim.betas, eps=optim.opt_eps, momentum=optim.momentum, sched=optim.sched, warmup=self.warmup,
            total=self.total, decay_steps=self.decay, decay_rate=optim.decay_rate)
        self.checks = QualityChecks(cfg.eval, self.stream, dist, device, depth=len(self.model.blocks))
        self.parts = {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler,
                      "stream": self.stream, "rng": RNGState(device, dist.rank, dist.world_size),
                      "scaler": ScalerState(self.scaler)}
        if saved is None:
            torch.manual_seed(cfg.data.seed + 1000 * dist.rank)  # drop path differs per rank

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0

    def _model(self) -> torch.nn.Module:
        cfg, stream = self.cfg, self.stream
        torch.manual_seed(cfg.data.seed)
        model = build_model(cfg.arch.model, stream.vocab, drop_path=cfg.arch.drop_path,
                            layer_scale=cfg.arch.layer_scale)
        grid = tuple(model.grid)
        if grid != (stream.grid, stream.grid):
            raise BeitDataError(f"model grid {grid[0]}x{grid[1]} does not match the tokens' grid "
                                f"{stream.grid}x{stream.grid} ({stream.cfg.tokens or stream.cfg.tokenizer})")
        return model.to(self.device)

    def _schedule(self) -> tuple[int, int, int]:
        """Total, warmup and decay (``sched`` step) steps; ``warmup_steps`` wins over ``warmup_epochs``,
        as ``steps`` over ``epochs``."""
        source = self.stream.source
        source.check_epoch(0)
        note = left_out_note(source.layout(0), source.spec)
        if note and self.is_main:
            print(f"pretrain: {note}", file=sys.stderr)
        steps_per_epoch, optim = self.stream.steps_per_epoch(0), self.cfg.optim
        total = optim.steps or optim.epochs * steps_per_epoch
        warmup = optim.warmup_steps if optim.warmup_steps is not None else int(optim.warmup_epochs * steps_per_epoch)
        warmup = min(total, warmup)
        if optim.sched == "cosine":  # BEiT's warms up for a step at least, as it always has
            warmup = warmup or 1
        return total, warmup, max(1, round(optim.decay_epochs * steps_per_epoch))

    # ---- the checkpoint ----

    def record(self) -> CheckpointMeta:
        """What the checkpoint records beside the parts' states."""
        model = self.model
        return CheckpointMeta(step=self.step, config=redacted(self.cfg.flat()), model_name=self.cfg.arch.model,
                              vocab_size=model.vocab_size, world_size=self.dist.world_size, data=self.data,
                              model_args={"embed_dim": model.embed_dim, "depth": model.depth,
                                          "num_heads": model.num_heads})

    def state_dict(self) -> dict:
        """The whole checkpoint: the record and each part's state. A collective (the generators
        of every rank are gathered): every rank calls it."""
        return {**self.record().as_dict(), **{name: part.state_dict() for name, part in self.parts.items()}}

    def load_state_dict(self, checkpoint: dict) -> None:
        """Take back a checkpoint's state (``load_checkpoint``): each part's, and the step."""
        for name, part in self.parts.items():
            part.load_state_dict(checkpoint.get(name) if name in LATER_PARTS else checkpoint[name])
        record = CheckpointMeta.from_checkpoint(checkpoint)
        self.step = self.resumed_at = record.step
        if record.world_size != self.dist.world_size:  # no saved generator is this rank's own: a fresh one
            torch.manual_seed(self.cfg.data.seed + 1000 * self.dist.rank + 1_000_003 * self.step)

    def save(self, epoch: int | None = None) -> None:
        """Every rank gives its parts' state, rank 0 writes the checkpoint (atomically: a kill never
        leaves half a file), uploads the run folder of an object-storage ``out``, and then keeps
        the checkpoint where due and deletes those no longer kept (``History.keep``; ``epoch``:
        the epochs it ends, where it is kept for good)."""
        state = self.state_dict()
        if self.is_main:
            save_atomic(state, checkpoint_path(Location(self.out)))
        self.push()
        if self.is_main:
            self.history.keep(self.step, epoch)

    def push(self) -> None:
        """Upload what changed in the run folder to an object-storage ``out`` (rank 0), the checkpoint
        last: each object appears whole, and a resumed run drops log lines past the checkpoint."""
        if self.mirror is not None and self.is_main:
            self.mirror.push(last=(CHECKPOINT,))

    # ---- the loop ----

    def settings(self) -> dict:
        """The resolved settings, as ``config.json`` holds them (the checkpoint holds each rank's
        threads), and the settings that said the order before its version (``order_settings``);
        what they come to beside them (``total_steps``, ``total_warmup_steps``...), under names of
        their own, so that a resumed run takes each setting back as it was given."""
        data = self.cfg.data
        return {**redacted(self.cfg.flat()), **order_settings(data.order_version, data.targets),
                "ranks": self.dist.world_size, "global_batch": data.global_batch(self.dist.world_size),
                "total_steps": self.total, "total_warmup_steps": self.warmup,
                "steps_per_epoch": self.stream.steps_per_epoch(0), "torch_threads": torch.get_num_threads()}

    def train(self) -> PretrainResult:
        """Train from ``step`` to the end, for ``stop_after`` steps, or until a signal."""
        cfg, config = self.cfg, self.settings()
        if self.is_main:
            write_text_atomic(self.out / "config.json", json.dumps(config, indent=1))
            write_text_atomic(self.out / "config.yaml", settings_yaml(redacted(cfg.flat())))  # for --config
        forward, logs = self._forward_module(), Logs.open(self, config)
        stop_at = min(self.total, self.step + cfg.runtime.stop_after if cfg.runtime.stop_after else self.total)
        stopped = 0
        try:
            if self._extended_from is not None:
                logs.logger.log({"step": self.step, "event": "extended", "total_steps": self.total})
                if self.is_main:
                    print(f"pretrain: extending the run to {self.total} steps; it has trained {self.step}, and the "
                          f"learning rate's cosine now ends at step {self.total}", file=sys.stderr)
            if self.step == 0:
                self.checks(self.model, 0, self.total, logs.logger)  # the held-out figures before training
            self.model.train()
            accum, batches = cfg.data.grad_accum, self.stream.batches(dtype=self.precision.dtype)
            with Preemption(self.dist.world_size) as preemption, closing(batches) as stream:
                while self.step < stop_at:
                    done = StepRecord()
                    out = accumulated_step(self.model, self.optimizer, self.scheduler,
                                           done.micro_batches(islice(stream, accum)), accum=accum,
                                           max_masked=cfg.data.num_masked, clip_grad=cfg.optim.clip_grad,
                                           device=self.device, forward=forward, world_size=self.dist.world_size,
                                           precision=self.precision, scaler=self.scaler)
                    self.step += 1
                    stopped = preemption.requested()
                    self._after_step(logs, out, done, stop_at, stopped)
                    if stopped:
                        break
        except BaseException:
            logs.close(failed=True)  # a failed run leaves no file open, no tracker's run on: a Python caller goes on
            raise
        return self._finish(logs, stopped)

    def _forward_module(self) -> torch.nn.Module:
        """The model as the step calls it: wrapped in DDP under torchrun, compiled with ``compile``."""
        forward = self.model
        if self.dist.world_size > 1:
            forward = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return torch.compile(forward) if self.cfg.runtime.compile else forward

    def _after_step(self, logs: Logs, out, done: StepRecord, stop_at: int, stopped: int) -> None:
        """Record, log, evaluate and save what is due after a step."""
        runtime = self.cfg.runtime
        logs.recorder.record(self.step, done.epoch, done.step, done.keys)
        logs.losses.add(self.step - 1, out.loss)
        logs.meter.seen += done.images * self.dist.world_size
        log_now = self.step % runtime.log_every == 0 or self.step == self.total
        kept_epoch = self._kept_epoch(done)
        save_now = self.step % runtime.checkpoint_every == 0 or self.step == stop_at or stopped or kept_epoch
        if log_now or save_now:
            logs.losses.read()
        if log_now:
            self._log_step(logs, out, done.epoch)
        logs.bar.update()
        if not stopped:  # a preempted run saves first: the job may have seconds left
            self.checks(self.model, self.step, self.total, logs.logger)
        if save_now:
            logs.recorder.flush()
            self.save(kept_epoch)

    def _kept_epoch(self, done: StepRecord) -> int | None:
        """The epochs done, where this step ends one whose checkpoint the run keeps for good."""
        if not self.history.every_epochs:
            return None
        ended = done.step + 1 == self._steps_in(done.epoch)
        return done.epoch + 1 if ended and self.history.keeps_epoch(done.epoch + 1) else None

    def _log_step(self, logs: Logs, out, epoch: int) -> None:
        img_s, acc = logs.meter.rate(), out.accuracy()
        record = {"step": self.step, "epoch": epoch, "loss": logs.losses.last, "acc": acc,
                  "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": float(out.grad_norm), "img_s": img_s}
        if self.scaler.is_enabled():  # fp16: a scale that keeps falling means the gradients overflow
            record["loss_scale"] = self.scaler.get_scale()
        if self.device.type == "cuda":  # the peak so far: a leak shows as growth between logs
            record["max_mem_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        logs.logger.log(record)
        # Not refreshed here: the bar redraws at its own interval (every 30 s into a log file).
        logs.bar.set_postfix(loss=f"{logs.losses.last:.3f}", acc=f"{acc:.3f}", img_s=f"{img_s:.0f}", refresh=False)

    def _finish(self, logs: Logs, stopped: int) -> PretrainResult:
        name = Preemption.name(stopped) if stopped else None
        if stopped:
            logs.logger.log({"step": self.step, "event": "stopped", "signal": name})
            if self.is_main:
                print(f"pretrain: stopped by {name} after step {self.step}; {checkpoint_path(self.cfg.runtime.out)} "
                      "holds it, resume to continue", file=sys.stderr)
        logs.close()
        self.push()  # the logs written after the last checkpoint
        if self.dist.world_size > 1:
            torch.distributed.barrier()
        stream = self.stream
        return PretrainResult(steps=self.step, first_loss=logs.losses.first, last_loss=logs.losses.last,
                              checkpoint=str(checkpoint_path(self.cfg.runtime.out)),
                              skipped_rejected=stream.skipped_rejected, skipped_missing_shards=len(stream.missing),
                              stopped=name,
                              holdout=[r for r in (self.checks.first, self.checks.last) if r is not None])


# ---- what the loop keeps while it goes ----------------------------------------------------------


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
    def open(cls, trainer: Trainer, config: dict) -> Logs:
        runtime, resumed_at = trainer.cfg.runtime, trainer.resumed_at or 0
        return cls(Logger(trainer.out, trainer.is_main, resumed_at=resumed_at, config=config, log_to=runtime.log_to),
                   BatchRecorder(trainer.out, trainer.dist.rank, runtime.record_batches, resumed_at=resumed_at),
                   LossReader(checkpoint_path(Location(trainer.out))), Meter(),
                   progress_bar(total=trainer.total, initial=trainer.step, desc="pretrain", unit="step",
                                disable=not (runtime.progress and trainer.is_main)))

    def close(self, failed: bool = False) -> None:
        self.bar.close()
        self.logger.close(failed)
        self.recorder.close()


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
