"""``PretrainConfig``: pretrain's settings in the sections that take them whole.

- ``data``: the training stream (``StreamConfig``): shards, tokens, batch, order and masking;
- ``arch``: the model (``model``, ``drop_path``, ``layer_scale``);
- ``optim``: optimisation and schedule;
- ``eval``: the held-out figures and the k-NN probe;
- ``runtime``: where the run lives and how it goes (none of it changes what it computes, but
  ``out``).

Every setting has one name across the sections, so the command line (``from_flat``), the run's
``config.json`` and its checkpoint (``flat``) use one flat mapping of names. A setting that
names a folder (``out``, ``val_tokens``, the stream's ``tokens``) is held as a ``Location``.
``recipe`` fills each of ``RECIPE_KEYS`` left at None; ``resolved`` does it before the stage
builds anything (from the token files' own recipe when none is named). Light: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from beit_common import BeitDataError, Location, resolve_locations
from beit_data.stream_config import StreamConfig
from pipelines.config import check_precision
from pipelines.recipes import RECIPES, check_recipe_name
from pipelines.sections import Sectioned, setting_names

__all__ = ["PretrainConfig", "ArchConfig", "OptimConfig", "EvalConfig", "RuntimeConfig", "RECIPE_KEYS", "PATCHES"]

RECIPE_KEYS = ("model", "epochs", "lr", "warmup_epochs", "layer_scale", "drop_path")
PATCHES = (224 // 16) ** 2  # patches of every beit_mim_* model (16-pixel patches at 224): the most a mask holds


@dataclass(frozen=True, kw_only=True)
class ArchConfig:
    model: str | None = None  # beit_mim_{tiny,base,large}_patch16_224, beitv2_mim_* [recipe]
    drop_path: float | None = None  # [recipe]
    layer_scale: float | None = None  # [recipe]


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    epochs: int | None = None  # [recipe]
    steps: int | None = None  # overrides epochs
    lr: float | None = None  # [recipe]
    min_lr: float = 1e-5
    warmup_epochs: float | None = None  # [recipe]
    warmup_steps: int | None = None  # overrides warmup_epochs
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float = 3.0  # the gradient's largest norm; 0: no clipping

    def __post_init__(self):
        if self.steps is not None and self.steps < 1 or self.epochs is not None and self.epochs < 1:
            raise BeitDataError("`steps` and `epochs` must be at least 1")
        if self.lr is not None and self.lr <= 0:
            raise BeitDataError("`lr` must be positive")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    val_shards: str | None = None  # held-out shards, tokenized into val_tokens
    val_tokens: Location | None = None
    val_every: int = 1000  # evaluate at step 0, every N steps and at the end
    val_images: int = 1024  # the fixed held-out set, over all ranks
    probe_every: int | None = None  # a k-NN probe on rank 0 every N steps (and at 0 and the end); off by default
    probe_train: str | None = None  # labeled shards (.cls) the k-NN votes with
    probe_val: str | None = None  # labeled shards it is scored on
    probe_layers: tuple[int, ...] | None = None  # blocks (1-based) whose features it averages; None: the last

    def __post_init__(self):
        resolve_locations(self, "val_tokens")
        if (self.val_shards is None) != (self.val_tokens is None):
            raise BeitDataError("`val_shards` and `val_tokens` go together: the held-out shards and their tokens")
        if self.val_every < 1 or self.val_images < 1:
            raise BeitDataError("`val_every` and `val_images` must be at least 1")
        if self.probe_every is not None and (self.probe_every < 1 or not self.probe_train or not self.probe_val):
            raise BeitDataError("`probe_every` needs a positive step count, `probe_train` and `probe_val`")


@dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    out: Location
    resume: bool | str = False  # True, False, or "auto": resume where out holds a run, start one where not
    extend: bool = False  # a resumed run may train more steps (or epochs) than it was started with
    stop_after: int | None = None  # stop this invocation after N more steps, with a checkpoint
    checkpoint_every: int = 1000
    keep_checkpoints: int = 0  # the newest N checkpoints kept as RUN/checkpoints/step-S.pt (0: the latest only)
    checkpoint_every_epochs: int = 100  # the checkpoint ending every N-th epoch kept for good (0: none)
    log_every: int = 10
    compile: bool = False
    device: str = "auto"
    precision: str = "auto"  # PRECISIONS: bf16 where the GPU computes it natively, fp16 on older GPUs, fp32 on the CPU
    progress: bool = True
    record_batches: bool = False  # each rank writes the keys of its every step to RUN/batches-rank{R}.jsonl

    def __post_init__(self):
        resolve_locations(self, "out")
        check_precision(self.precision)
        if self.resume not in (True, False, "auto"):
            raise BeitDataError(f"`resume` must be true, false or auto, got {self.resume!r}")
        if self.keep_checkpoints < 0 or self.checkpoint_every_epochs < 0:
            raise BeitDataError("`keep_checkpoints` and `checkpoint_every_epochs` must be at least 0")


@dataclass(frozen=True, kw_only=True)
class PretrainConfig(Sectioned):
    """Pretrain's settings, by section; ``recipe`` names the paper whose settings fill the
    ``RECIPE_KEYS`` left at None."""

    recipe: str | None = None
    data: StreamConfig
    arch: ArchConfig = field(default_factory=ArchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig

    SECTION_TYPES = {"data": StreamConfig, "arch": ArchConfig, "optim": OptimConfig, "eval": EvalConfig,
                     "runtime": RuntimeConfig}
    # Settings a resumed run may change: they decide how the run goes, not what it computes.
    # The shards, tokens and tokenizer may move (their paths may change); what they hold is checked.
    # ``batch_size`` and ``grad_accum`` split the global batch over ranks and micro-batches:
    # they may change with the number of ranks, the global batch may not (``check_resume``).
    # Every other setting must equal the checkpoint's, the step count and epochs included: the
    # cosine schedule is a function of the total, so extending a run would change its past.
    RESUMABLE = ("shards", "tokens", "tokenizer", "out", "stop_after", "checkpoint_every", "keep_checkpoints",
                 "checkpoint_every_epochs", "log_every", "resume", "compile", "device", "num_threads", "progress",
                 "val_shards", "val_tokens", "val_every", "val_images", "probe_every", "probe_train", "probe_val",
                 "probe_layers", "record_batches", "batch_size", "grad_accum", "precision", "extend")

    def __post_init__(self):
        check_recipe_name(self.recipe)
        if self.recipe is not None:
            filled = {k: RECIPES[self.recipe][k] for k in RECIPE_KEYS if self.setting(k) is None}
            if filled:
                for section in ("arch", "optim"):
                    mine = {k: v for k, v in filled.items() if k in setting_names(self.SECTION_TYPES[section])}
                    object.__setattr__(self, section, replace(getattr(self, section), **mine))

    def resolved(self, recipe: str) -> PretrainConfig:
        """This config with ``recipe`` (the tokens' own, where none was named) filling its blanks."""
        return self if self.recipe is not None else replace(self, recipe=recipe)

