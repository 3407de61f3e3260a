"""The settings of every stage, one keyword-only dataclass each, validated when built;
pretrain's in sections (``PretrainConfig``, at the end).

They live apart from the stages so that the command line can take its defaults from them
without importing torch or DALI (``beit-data --help`` stays instant). Each stage module
re-exports its own config beside its ``run_*()`` function.

With the command line they are the boundary where what a user typed becomes a ``Location``: a
setting that names a file or folder is given as a string (or a path) and held as a
``Location`` from ``__post_init__`` on (``resolve_locations``); shard specs (patterns, lists)
stay strings until ``expand_shards`` resolves them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Sequence

from beit_common import BeitDataError, Location, resolve_locations
from beit_data.stream_config import StreamConfig
from beit_data.views import ViewRecipe
from pipelines.recipes import DVAE_CONFIGS, RECIPES, TOKENIZER_RECIPE, check_recipe_name, view_recipe

__all__ = ["ShardsConfig", "TrainDVAEConfig", "TokenizeConfig", "ProbeConfig", "InspectConfig", "IndexConfig",
           "ExportConfig", "PlanConfig", "PRECISIONS", "check_precision", "TRACKERS", "tracker_names", "Sectioned",
           "default", "owners", "setting_names", "INVOCATION", "settings_yaml", "PretrainConfig", "ArchConfig",
           "OptimConfig", "EvalConfig", "RuntimeConfig", "RECIPE_KEYS", "SCHEDULES", "PATCHES", "ENGINES"]


# ---- configs in sections: one flat name a setting ----

# Configs in sections: each setting has one name across them, so that the command line, a run's
# ``config.json`` and its checkpoint speak of settings by one flat name, while the stages take
# their section whole.

# What a run never takes from a record of settings: where it is, and what one invocation does
# (for tokenize, also where it ran: its engine and the engine's workers, which change no row).
INVOCATION = ("out", "resume", "extend", "overwrite", "stop_after", "progress", "engine", "ray_address", "workers",
              "gpus_per_worker", "cpus_per_worker", "max_retries")


def default(config: type, name: str):
    """The default of setting ``name`` of a config class (in whichever section holds it), for the
    command line."""
    owner = owners(config).get(name) if issubclass(config, Sectioned) else None
    return (config.SECTION_TYPES[owner] if owner else config).__dataclass_fields__[name].default


def setting_names(config: type) -> set[str]:
    return {f.name for f in fields(config)}


def owners(config: type) -> dict[str, str | None]:
    """Each flat setting of a sectioned config and the section that holds it (None: the config's own)."""
    found: dict[str, str | None] = {name: None for name in setting_names(config) - set(config.SECTION_TYPES)}
    for section, kind in config.SECTION_TYPES.items():
        found.update({name: section for name in setting_names(kind)})
    return found


class Sectioned:
    """A config whose settings sit in sections (``SECTION_TYPES``: name -> dataclass), each setting
    with one name across them: the command line and the checkpoint use the flat names."""

    SECTION_TYPES: dict[str, type] = {}

    @classmethod
    def from_flat(cls, **settings):
        """The config of flat ``settings``: each goes to the section that has it.

        Raises:
            BeitDataError: For a name no section has.
        """
        found = owners(cls)
        parts: dict[str, dict] = {name: {} for name in cls.SECTION_TYPES}
        top = {}
        for name, value in settings.items():
            if name not in found:
                raise BeitDataError(f"{cls.__name__} has no setting `{name}`")
            (top if found[name] is None else parts[found[name]])[name] = value
        return cls(**top, **{name: cls.SECTION_TYPES[name](**values) for name, values in parts.items()})

    def flat(self) -> dict:
        """Every setting by its one name: what a run's ``config.json`` and checkpoint record."""
        out = {name: getattr(self, name) for name, owner in owners(type(self)).items() if owner is None}
        for name in self.SECTION_TYPES:
            out.update(asdict(getattr(self, name)))
        return out

    def setting(self, name: str):
        owner = owners(type(self))[name]
        return getattr(self if owner is None else getattr(self, owner), name)

    def with_settings(self, **settings):
        """A copy with some flat settings changed."""
        return type(self).from_flat(**{**self.flat(), **settings})


def settings_yaml(settings: dict) -> str:
    """A run's resolved settings as the YAML that ``--config`` takes back (``config.yaml``): what
    it computes and how, without where it wrote or what one invocation did (``INVOCATION``)."""
    import yaml

    def plain(value):  # a location (or path) as its text, a tuple as a list
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)

    return yaml.safe_dump({k: plain(v) for k, v in settings.items() if k not in INVOCATION}, sort_keys=True)


# How a stage computes on its device (``pipelines.runtime.resolve_precision``): auto is bf16 on a GPU
# that computes it natively, fp16 on older GPUs, fp32 on the CPU.
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def check_precision(name: str) -> None:
    if name not in PRECISIONS:
        raise BeitDataError(f"`precision` must be one of {', '.join(PRECISIONS)}, got {name!r}")


# How tokenize runs its shards (``TokenizeConfig.engine``).
ENGINES = ("plain", "ray")


# Where a run's figures go besides ``log.jsonl`` (``pipelines.trackers``); wandb and mlflow are extras.
TRACKERS = ("tensorboard", "csv", "wandb", "mlflow")


def tracker_names(value) -> tuple[str, ...]:
    """``log_to`` as a tuple of tracker names, from a comma list (``"tensorboard,csv"``; ``"none"``
    or ``""``: none) or a sequence of names.

    Raises:
        BeitDataError: For a name that is no tracker, or one given twice.
    """
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else [str(n) for n in value]
    names = [n for n in names if n and n != "none"]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise BeitDataError(f"`log_to`: no tracker {unknown[0]!r}; choose from {', '.join(TRACKERS)} (or none)")
    if len(set(names)) != len(names):
        raise BeitDataError(f"`log_to`: a tracker named twice in {','.join(names)}")
    return tuple(names)


@dataclass(frozen=True, kw_only=True)
class ShardsConfig:
    """Where the images come from and how the shards are cut.

    Attributes:
        sources: Flat image folders, ImageFolder trees (class sub-folders) or text files
            listing image paths (relative paths are taken from the list's folder).
        out: Output folder for the shards, their ``.idx`` files and the reports.
        maxcount: Samples per shard.
        prefix: Shard names are ``{prefix}-{000000}.tar``.
        shuffle: Write the images (all sources together) in a seeded random order. Off, they
            are written in listing order, which for ImageFolder trees is class by class.
        seed: Seed of that order; the same seed and listing give the same shards.
        classes: A class map to number the classes by (another run's ``shards.json`` or
            ``classes.json``), so that an id means the same class in every set; None numbers
            this tree's class folders in name order.
        max_pixels: Larger images are rejected (decompression bombs); None: Pillow's limit.
        min_size: Images whose shorter side is under it are rejected, as tokenize would set them
            aside later (its ``min_size`` is the tokenizer's input size: 112 for DALL-E's and
            train-dvae's, 224 for VQ-KD's, which wants 224 here); so a held-out count per class
            holds. 0 keeps every image.
        image_column, label_column: The columns of Parquet sources that hold the image bytes
            (a bytes column, or a struct with ``bytes``) and the class id; None finds them by
            name (``image``, ``jpg``, ...; ``label``, ``cls``, ...).
        image_root: Parquet sources whose image struct holds a path and no bytes (Hugging Face
            ``datasets`` after ``cast_column('image', Image())`` of files): the folder (or URL
            prefix) a relative path is read from; None: the Parquet file's own folder.
        holdout_per_class: Set apart this many images of each class (or this share, below 1)
            as a held-out shard set, disjoint from the training shards, with the same class map.
        holdout_out: Where the held-out shards go; None: ``OUT-holdout`` beside ``out``.
        overwrite: Replace the shards an earlier run wrote into ``out``; without it a folder
            that is not empty is refused.
        progress: Show a progress bar.
    """

    sources: Sequence[Location]
    out: Location
    maxcount: int = 10000
    prefix: str = "shard"
    shuffle: bool = True
    seed: int = 0
    classes: Location | None = None
    max_pixels: int | None = None  # None: beit_data.images.MAX_PIXELS
    min_size: int = 112  # the DALL-E tokenizer's input size, BEiT's
    image_column: str | None = None
    label_column: str | None = None
    image_root: Location | None = None
    holdout_per_class: float | None = None
    holdout_out: Location | None = None
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        resolve_locations(self, "sources", "out", "classes", "image_root", "holdout_out")
        if not self.sources:
            raise BeitDataError("give at least one image source")
        if self.maxcount < 1:
            raise BeitDataError(f"`maxcount` must be at least 1, got {self.maxcount}")
        if not self.prefix or "/" in self.prefix:
            raise BeitDataError(f"`prefix` must be a plain file-name prefix, got {self.prefix!r}")
        if self.holdout_per_class is not None and not (self.holdout_per_class > 0 and (
                self.holdout_per_class < 1 or float(self.holdout_per_class).is_integer())):
            raise BeitDataError(f"`holdout_per_class` is a count of images (1, 2, ...) or a share below 1, got "
                                f"{self.holdout_per_class}")


MAX_VOCAB = 32768  # token ids are stored as int16 (beit_data.tokens)


@dataclass(frozen=True, kw_only=True)
class TrainDVAEConfig:
    """``beit-data train-dvae``. A resumed run may change only ``RESUMABLE``: every other setting
    decides what the run computes."""

    shards: str
    out: Location
    config: str = "tiny"
    vocab_size: int | None = None  # None: the config's (tiny 512, dalle 8192)
    steps: int = 300
    batch_size: int = 16
    lr: float = 2e-3
    kl_weight: float = 0.02
    usage_weight: float = 1.0
    gumbel_noise: float | None = None  # None: 1.0 for dalle, 0.0 for tiny
    kl_warmup: float = 0.25
    tau_start: float = 1.0
    tau_end: float = 1 / 16
    holdout: int = 2
    checkpoint_every: int = 200
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # PRECISIONS
    resume: bool = False
    extend: bool = False  # a resumed run may train more `steps` than it was started with
    overwrite: bool = False
    progress: bool = True

    RESUMABLE = ("shards", "out", "checkpoint_every", "device", "resume", "overwrite", "progress", "precision",
                 "extend")

    def __post_init__(self):
        resolve_locations(self, "out")
        if self.config not in DVAE_CONFIGS:
            raise BeitDataError(f"`config` must be one of {list(DVAE_CONFIGS)}, got {self.config}")
        if self.steps < 1 or self.batch_size < 1 or self.holdout < 1:
            raise BeitDataError("`steps`, `batch_size` and the held-out count must be at least 1")
        if self.vocab_size is not None and not 2 <= self.vocab_size <= MAX_VOCAB:
            raise BeitDataError(f"`vocab_size` must be between 2 and {MAX_VOCAB}, got {self.vocab_size}")
        if self.gumbel_noise is None:
            object.__setattr__(self, "gumbel_noise", 1.0 if self.config == "dalle" else 0.0)
        if self.resume and self.overwrite:
            raise BeitDataError("`resume` and `overwrite` exclude each other")
        check_precision(self.precision)


@dataclass(frozen=True, kw_only=True)
class TokenizeConfig:
    """``recipe`` (None: the tokenizer kind's, see ``TOKENIZER_RECIPE``) sets ``min_scale`` where it
    is None and the filter of the tokenizer's view (``view_recipe_for``).

    ``engine`` runs the shards in this process (``plain``: or the ranks torchrun or srun start,
    each taking every N-th shard) or on a pool of Ray workers (``ray``, ``pipelines.tokenize_ray``),
    which the settings after it shape; either writes the same rows.
    """

    shards: str
    tokenizer: str
    out: Location
    recipe: str | None = None
    views: int = 10
    seed: int = 0
    min_scale: float | None = None  # the crop's smallest area fraction
    batch_size: int = 64
    target_jitter: bool = True
    min_size: int | None = None  # shorter sides under it are rejected; None: the tokenizer's input size
    max_pixels: int | None = None  # larger images are rejected (decompression bombs); None: Pillow's limit
    batch_pixels: int | None = None  # decoded pixels a batch may hold; None: beit_data.images.BATCH_PIXELS
    compile: bool = False  # torch.compile the tokenizer (worth it on a GPU for long runs)
    overwrite: bool = False
    strict: bool = False  # a shard with any rejected sample is not written, and the run fails
    device: str = "auto"
    precision: str = "auto"  # the tokenizer's forward pass: PRECISIONS
    num_threads: int = 4
    progress: bool = True
    engine: str = "plain"  # ENGINES
    ray_address: str | None = None  # None: a private Ray on this machine; auto or HOST:PORT: join that cluster
    workers: int | None = None  # None: one per GPU of the cluster (gpus_per_worker each), or 1 where it has none
    gpus_per_worker: float | None = None  # None: 1 where the cluster has GPUs, else 0
    cpus_per_worker: float = 1.0
    max_retries: int = 3  # starts of a shard after the first, each after its worker died

    def __post_init__(self):
        resolve_locations(self, "out")
        self._check_engine()
        if self.batch_size < 1:
            raise BeitDataError(f"`batch_size` must be at least 1, got {self.batch_size}")
        check_precision(self.precision)
        if self.min_size is not None and self.min_size < 0:
            raise BeitDataError(f"`min_size` must be 0 or more, got {self.min_size}")
        if self.batch_pixels is not None and self.batch_pixels < 1:
            raise BeitDataError(f"`batch_pixels` must be at least 1, got {self.batch_pixels}")
        check_recipe_name(self.recipe)
        if self.min_scale is not None and not 0 < self.min_scale <= 1:
            raise BeitDataError(f"`min_scale` must be in (0, 1], got {self.min_scale}")

    def _check_engine(self) -> None:
        if self.engine not in ENGINES:
            raise BeitDataError(f"`engine` must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        given = [name for name in ("ray_address", "workers", "gpus_per_worker") if getattr(self, name) is not None]
        if self.engine != "ray" and given:
            raise BeitDataError(f"`{given[0]}` is a setting of the Ray engine; add `engine` ray")
        if self.workers is not None and self.workers < 1 or self.max_retries < 0:
            raise BeitDataError(f"`workers` must be at least 1 and `max_retries` 0 or more, got {self.workers} and "
                                f"{self.max_retries}")
        if (self.gpus_per_worker or 0) < 0 or self.cpus_per_worker < 0:
            raise BeitDataError("`gpus_per_worker` and `cpus_per_worker` must be 0 or more")

    def view_recipe_for(self, kind: str) -> ViewRecipe:
        """The views drawn for a tokenizer of ``kind``: this config's recipe, or the one that kind of
        tokenizer was made for, which also sets ``min_scale`` where it is None."""
        return view_recipe(self.recipe or TOKENIZER_RECIPE[kind], views=self.views, seed=self.seed,
                           target_jitter=self.target_jitter, min_scale=self.min_scale)


@dataclass(frozen=True, kw_only=True)
class ProbeConfig:
    """``beit-data probe``: k-NN (and linear) classification on frozen features.

    Attributes:
        model: A pretrain run folder, or an encoder ``beit-data export`` wrote.
        step: A checkpoint the run folder keeps, instead of its latest.
        train_shards, val_shards: Labeled shards (``.cls`` members).
        k, temperature: The k-NN's neighbours and the temperature of its ``exp(cos / T)`` votes.
        layers: Blocks (1-based) whose mean patch tokens are averaged; None: the last.
        linear: Also fit a logistic regression on the features.
    """

    model: Location
    train_shards: str
    val_shards: str
    step: int | None = None
    k: int = 20
    temperature: float = 0.07
    layers: tuple[int, ...] | None = None
    linear: bool = False
    batch_size: int = 64
    image_size: int = 224
    device: str = "auto"
    num_threads: int = 4
    progress: bool = True

    def __post_init__(self):
        resolve_locations(self, "model")
        if self.k < 1 or self.temperature <= 0 or self.batch_size < 1:
            raise BeitDataError("`k` and `batch_size` must be at least 1 and `temperature` positive")


@dataclass(frozen=True, kw_only=True)
class IndexConfig:
    """``beit-data index``: a DALI ``.idx`` beside each shard that has none (every one with ``overwrite``)."""

    shards: str
    overwrite: bool = False
    progress: bool = True


# The files of an export folder: timm's ``local-dir:`` layout, the config last (``probe`` reads it too).
EXPORT_FOLDER_FILES = ("model.safetensors", "config.json")


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """``beit-data export``: a run's encoder, for timm (a folder of ``EXPORT_FOLDER_FILES``, or a file);
    ``step`` picks a checkpoint the run keeps instead of its latest."""

    run: Location
    out: Location
    step: int | None = None
    overwrite: bool = False

    def __post_init__(self):
        resolve_locations(self, "run", "out")


@dataclass(frozen=True, kw_only=True)
class InspectConfig:
    tokens: Location
    shards: str | None = None
    render: str | None = None
    view: int = 0
    tokenizer: str | None = None
    out: Location | None = None
    histogram: Location | None = None
    max_code_share: float = 0.1  # warn when one code holds more of the tokens
    max_dead_codes: float = 0.5  # warn when more of the codebook never occurs

    def __post_init__(self):
        resolve_locations(self, "tokens", "out", "histogram")
        if self.render is not None and self.out is None:
            raise BeitDataError("`render` needs `out` (a .png file)")
        if not (0 < self.max_code_share <= 1 and 0 <= self.max_dead_codes <= 1):
            raise BeitDataError("`max_code_share` must be in (0, 1] and `max_dead_codes` in [0, 1]")


@dataclass(frozen=True, kw_only=True)
class PlanConfig(Sectioned):
    """Which batches ``beit-data plan`` prints; ``data`` (the order's settings) must be the run's own.

    Attributes:
        world_size: Ranks of the run (torchrun's ``WORLD_SIZE``).
        global_batch: Samples of each global step; ``batch_size`` is then this split over the
            ranks and ``grad_accum``, so the steps are the same on any ``world_size``.
        epochs, start_epoch: The epochs to print.
        steps: At most this many steps of each epoch.
        rank: Only this rank; all ranks when None.
    """

    data: StreamConfig
    world_size: int = 1
    global_batch: int | None = None
    epochs: int = 1
    start_epoch: int = 0
    steps: int | None = None
    rank: int | None = None

    SECTION_TYPES = {"data": StreamConfig}

    def __post_init__(self):
        if min(self.world_size, self.epochs) < 1 or self.start_epoch < 0:
            raise BeitDataError("`world_size` and `epochs` must be at least 1, `start_epoch` 0 or more")
        if self.rank is not None and not 0 <= self.rank < self.world_size:
            raise BeitDataError(f"`rank` must be in [0, {self.world_size}), got {self.rank}")
        if self.global_batch is not None:
            per_rank, rest = divmod(self.global_batch, self.world_size * self.data.grad_accum)
            if rest or not per_rank:
                raise BeitDataError(f"a `global_batch` of {self.global_batch} does not split over {self.world_size} "
                                    f"ranks x `grad_accum` {self.data.grad_accum}")
            object.__setattr__(self, "data", replace(self.data, batch_size=per_rank))


# ---- pretrain's settings, in sections ----

# ``PretrainConfig``: pretrain's settings in the sections that take them whole.
#
# - ``data``: the training stream (``StreamConfig``): shards, tokens, batch, order and masking;
# - ``arch``: the model (``model``, ``drop_path``, ``layer_scale``);
# - ``optim``: optimisation and schedule;
# - ``eval``: the held-out figures and the k-NN probe;
# - ``runtime``: where the run lives and how it goes (none of it changes what it computes, but
#   ``out``).
#
# Every setting has one name across the sections, so the command line (``from_flat``), the run's
# ``config.json`` and its checkpoint (``flat``) use one flat mapping of names. A setting that
# names a folder (``out``, ``val_tokens``, the stream's ``tokens``) is held as a ``Location``.
# ``recipe`` fills each of ``RECIPE_KEYS`` left at None; ``resolved`` does it before the stage
# builds anything (from the token files' own recipe when none is named). Light: no torch.

RECIPE_KEYS = ("model", "epochs", "lr", "warmup_epochs", "layer_scale", "drop_path")
# The learning-rate schedules ``sched`` names: cosine is BEiT's (``pipelines.training.WarmupCosine``,
# the default), the others timm's, stepped per optimizer step. timm's multistep, plateau, wsd and
# rsqrt are left out: they need milestones, a metric or a decay phase this command does not take.
SCHEDULES = ("cosine", "step", "tanh", "poly", "constant", "none")
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
    opt: str = "adamw"  # a name timm.optim.create_optimizer_v2 takes (checked when the run starts)
    opt_eps: float = 1e-8  # for the optimizers that take an eps
    betas: tuple[float, float] = (0.9, 0.999)  # for the optimizers that take betas
    momentum: float = 0.9  # for the optimizers that take a momentum (sgd, ...)
    sched: str = "cosine"  # SCHEDULES
    decay_epochs: float = 90.0  # step: the interval between decays
    decay_rate: float = 0.1  # step: the factor of each decay; poly: the power
    clip_grad: float = 3.0  # the gradient's largest norm; 0: no clipping

    def __post_init__(self):
        if self.steps is not None and self.steps < 1 or self.epochs is not None and self.epochs < 1:
            raise BeitDataError("`steps` and `epochs` must be at least 1")
        if self.lr is not None and self.lr <= 0:
            raise BeitDataError("`lr` must be positive")
        if self.sched not in SCHEDULES:
            raise BeitDataError(f"`sched` must be one of {', '.join(SCHEDULES)}, got {self.sched!r}")
        if not isinstance(self.opt, str) or not self.opt:
            raise BeitDataError(f"`opt` must name one of timm's optimizers (adamw, sgd, lamb, ...), got {self.opt!r}")
        if not (self.opt_eps > 0 and self.decay_epochs > 0 and self.decay_rate > 0 and 0 <= self.momentum < 1):
            raise BeitDataError("`opt_eps`, `decay_epochs` and `decay_rate` must be positive, `momentum` in [0, 1)")


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
    log_to: tuple[str, ...] = ("tensorboard",)  # TRACKERS besides log.jsonl; a comma list is taken too

    def __post_init__(self):
        resolve_locations(self, "out")
        object.__setattr__(self, "log_to", tracker_names(self.log_to))
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
                 "probe_layers", "record_batches", "batch_size", "grad_accum", "precision", "extend", "log_to")

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
