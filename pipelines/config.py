"""The settings of every stage, one keyword-only dataclass each, validated when built.

They live apart from the stages so that the command line can take its defaults from them
without importing torch or DALI (``beit-data --help`` stays instant). Each stage module
re-exports its own config beside its ``run_*()`` function.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Sequence

from beit_common import BeitDataError
from beit_data.order import MIX_SHARDS, PARTITIONS
from beit_data.views import ViewRecipe

# The dVAE architectures of ``beit_model.dvae.CONFIGS`` (named here so this module needs no torch).
DVAE_CONFIGS = ("tiny", "dalle")

# The papers' recipes for ViT-B/16, in one place. ``beit``: BEiT (Bao et al., ICLR 2022), 800
# epochs, DALL-E tokens of a 112-pixel Lanczos view. ``beitv2``: BEiT v2 (Peng et al., 2022) as in
# unilm's beit2/PRETRAINING.md, 1600 epochs, VQ-KD tokens of the model's own 224-pixel bicubic
# view, crops of at least 20% of the image, and the extra head after block 9. Both: batch 2048
# in all, AdamW (0.9, 0.999), weight decay 0.05, clip 3.0, 75 masked patches, colour jitter 0.4.
RECIPES = {
    "beit": {"min_scale": 0.08, "tokenizer_filter": "lanczos", "model": "beit_mim_base_patch16_224",
             "epochs": 800, "lr": 1.5e-3, "warmup_epochs": 10.0, "layer_scale": 0.1, "drop_path": 0.1},
    "beitv2": {"min_scale": 0.2, "tokenizer_filter": "bicubic", "model": "beitv2_mim_base_patch16_224",
               "epochs": 1600, "lr": 1.5e-3, "warmup_epochs": 10.0, "layer_scale": 0.1, "drop_path": 0.1},
}
# The recipe tokenize follows when none is named: the one each kind of tokenizer was made for.
TOKENIZER_RECIPE = {"dvae": "beit", "vqkd": "beitv2"}
PRETRAIN_RECIPE_KEYS = ("model", "epochs", "lr", "warmup_epochs", "layer_scale", "drop_path")


def check_recipe_name(name: str | None) -> None:
    if name is not None and name not in RECIPES:
        raise BeitDataError(f"`recipe` must be one of {sorted(RECIPES)}, got {name}")

__all__ = ["ShardsConfig", "TrainDVAEConfig", "TokenizeConfig", "PretrainConfig", "ProbeConfig", "InspectConfig",
           "PlanConfig", "RECIPES", "default"]


def default(config: type, name: str):
    """The default of setting ``name`` of a config class, for the command line."""
    return config.__dataclass_fields__[name].default


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
        overwrite: Replace the shards an earlier run wrote into ``out``; without it a folder
            that is not empty is refused.
        progress: Show a progress bar.
    """

    sources: Sequence[str | os.PathLike]
    out: str | os.PathLike
    maxcount: int = 10000
    prefix: str = "shard"
    shuffle: bool = True
    seed: int = 0
    classes: str | os.PathLike | None = None
    max_pixels: int | None = None  # None: beit_data.images.MAX_PIXELS
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        if not self.sources:
            raise BeitDataError("give at least one image source")
        if self.maxcount < 1:
            raise BeitDataError(f"`maxcount` must be at least 1, got {self.maxcount}")
        if not self.prefix or "/" in self.prefix:
            raise BeitDataError(f"`prefix` must be a plain file-name prefix, got {self.prefix!r}")


@dataclass(frozen=True, kw_only=True)
class TrainDVAEConfig:
    """``beit-data train-dvae``. A resumed run may change only ``RESUMABLE``: every other setting
    decides what the run computes."""

    shards: str
    out: str
    config: str = "tiny"
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
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    RESUMABLE = ("shards", "out", "checkpoint_every", "device", "resume", "overwrite", "progress")

    def __post_init__(self):
        if self.config not in DVAE_CONFIGS:
            raise BeitDataError(f"`config` must be one of {list(DVAE_CONFIGS)}, got {self.config}")
        if self.steps < 1 or self.batch_size < 1 or self.holdout < 1:
            raise BeitDataError("`steps`, `batch_size` and the hold-out count must be at least 1")
        if self.gumbel_noise is None:
            object.__setattr__(self, "gumbel_noise", 1.0 if self.config == "dalle" else 0.0)
        if self.resume and self.overwrite:
            raise BeitDataError("`resume` and `overwrite` exclude each other")


@dataclass(frozen=True, kw_only=True)
class TokenizeConfig:
    """``recipe`` (None: the tokenizer kind's, see ``TOKENIZER_RECIPE``) sets ``min_scale`` where it
    is None and the filter of the tokenizer's view; ``for_tokenizer`` fills them in."""

    shards: str
    tokenizer: str
    out: str
    recipe: str | None = None
    views: int = 10
    seed: int = 0
    min_scale: float | None = None  # the crop's smallest area fraction
    batch_size: int = 64
    target_jitter: bool = True
    min_size: int | None = None  # shorter sides under it are rejected; None: the tokenizer's input size
    max_pixels: int | None = None  # larger images are rejected (decompression bombs); None: Pillow's limit
    compile: bool = False  # torch.compile the tokenizer (worth it on a GPU for long runs)
    overwrite: bool = False
    strict: bool = False  # a shard with any rejected sample is not written, and the run fails
    device: str = "auto"
    num_threads: int = 4
    progress: bool = True

    def __post_init__(self):
        if self.batch_size < 1:
            raise BeitDataError(f"`batch_size` must be at least 1, got {self.batch_size}")
        if self.min_size is not None and self.min_size < 0:
            raise BeitDataError(f"`min_size` must be 0 or more, got {self.min_size}")
        check_recipe_name(self.recipe)
        if self.min_scale is not None and not 0 < self.min_scale <= 1:
            raise BeitDataError(f"`min_scale` must be in (0, 1], got {self.min_scale}")

    def for_tokenizer(self, kind: str) -> TokenizeConfig:
        """This config with the recipe, and what it sets, filled in for a tokenizer of ``kind``."""
        recipe = self.recipe or TOKENIZER_RECIPE[kind]
        min_scale = RECIPES[recipe]["min_scale"] if self.min_scale is None else self.min_scale
        return replace(self, recipe=recipe, min_scale=min_scale)

    @property
    def view_recipe(self) -> ViewRecipe:
        if self.recipe is None or self.min_scale is None:
            raise RuntimeError("call for_tokenizer() first")
        return ViewRecipe(views=self.views, seed=self.seed, target_jitter=self.target_jitter,
                          scale=(self.min_scale, 1.0), interp=RECIPES[self.recipe]["tokenizer_filter"],
                          recipe=self.recipe)


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """``recipe`` sets each of ``PRETRAIN_RECIPE_KEYS`` left at None; with no recipe named, the
    token files' own recipe is used (``for_tokens``)."""

    shards: str
    tokens: str
    out: str
    recipe: str | None = None
    model: str | None = None
    epochs: int | None = None
    steps: int | None = None  # overrides epochs
    stop_after: int | None = None  # stop this invocation after N more steps, with a checkpoint
    batch_size: int = 256  # per rank
    lr: float | None = None
    min_lr: float = 1e-5
    warmup_epochs: float | None = None
    warmup_steps: int | None = None  # overrides warmup_epochs
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float = 3.0
    drop_path: float | None = None
    layer_scale: float | None = None
    num_masked: int = 75
    seed: int = 0
    # Partitions of each epoch (see beit_data.order); None: shards dealt to ranks, the order of runs
    # from before partitions, which a resumed old run keeps.
    partitions: int | None = PARTITIONS
    mix_shards: int = MIX_SHARDS  # shards a partition reads at once, their samples permuted together
    checkpoint_every: int = 1000
    log_every: int = 10
    resume: bool = False
    skip_missing: bool = False
    compile: bool = False
    device: str = "auto"
    num_threads: int = 4
    progress: bool = True
    shuffle_targets: bool = False  # control experiment: targets from other images
    record_batches: bool = False  # each rank writes the keys of its every step to RUN/batches-rank{R}.jsonl
    val_shards: str | None = None  # held-out shards, tokenized into val_tokens
    val_tokens: str | None = None
    val_every: int = 1000  # evaluate at step 0, every N steps and at the end
    val_images: int = 1024  # the fixed held-out set, over all ranks
    probe_every: int | None = None  # a k-NN probe on rank 0 every N steps (and at 0 and the end); off by default
    probe_train: str | None = None  # labeled shards (.cls) the k-NN votes with
    probe_val: str | None = None  # labeled shards it is scored on
    probe_layers: tuple[int, ...] | None = None  # blocks (1-based) whose features it averages; None: the last

    # Settings a resumed run may change: they decide how the run goes, not what it computes.
    # The shards and tokens may move (their paths may change); what they hold is checked.
    # Every other setting must equal the checkpoint's, the step count and epochs included: the
    # cosine schedule is a function of the total, so extending a run would change its past.
    RESUMABLE = ("shards", "tokens", "out", "stop_after", "checkpoint_every", "log_every", "resume", "compile",
                 "device", "num_threads", "progress", "val_shards", "val_tokens", "val_every", "val_images",
                 "probe_every", "probe_train", "probe_val", "probe_layers", "record_batches")

    def __post_init__(self):
        check_recipe_name(self.recipe)
        for key in PRETRAIN_RECIPE_KEYS:
            if getattr(self, key) is None and self.recipe is not None:
                object.__setattr__(self, key, RECIPES[self.recipe][key])
        if self.steps is not None and self.steps < 1 or self.epochs is not None and self.epochs < 1:
            raise BeitDataError("`steps` and `epochs` must be at least 1")
        if self.batch_size < 1 or self.lr is not None and self.lr <= 0:
            raise BeitDataError("`batch_size` and `lr` must be positive")
        if self.partitions is not None and self.partitions < 1:
            raise BeitDataError(f"`partitions` must be at least 1, got {self.partitions}")
        if (self.val_shards is None) != (self.val_tokens is None):
            raise BeitDataError("`val_shards` and `val_tokens` go together: the held-out shards and their tokens")
        if self.val_every < 1 or self.val_images < 1:
            raise BeitDataError("`val_every` and `val_images` must be at least 1")
        if self.probe_every is not None and (self.probe_every < 1 or not self.probe_train or not self.probe_val):
            raise BeitDataError("`probe_every` needs a positive step count, `probe_train` and `probe_val`")

    def for_tokens(self, views: dict) -> PretrainConfig:
        """This config with the recipe filled in from the token files' ``views`` metadata, if none was named."""
        return self if self.recipe is not None else replace(self, recipe=views.get("recipe", "beit"))


@dataclass(frozen=True, kw_only=True)
class ProbeConfig:
    """``beit-data probe``: k-NN (and linear) classification on frozen features.

    Attributes:
        model: A pretrain run folder, or an encoder ``beit-data export`` wrote.
        train_shards, val_shards: Labeled shards (``.cls`` members).
        k, temperature: The k-NN's neighbours and the temperature of its ``exp(cos / T)`` votes.
        layers: Blocks (1-based) whose mean patch tokens are averaged; None: the last.
        linear: Also fit a logistic regression on the features.
    """

    model: str
    train_shards: str
    val_shards: str
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
        if self.k < 1 or self.temperature <= 0 or self.batch_size < 1:
            raise BeitDataError("`k` and `batch_size` must be at least 1 and `temperature` positive")


@dataclass(frozen=True, kw_only=True)
class InspectConfig:
    tokens: str
    shards: str | None = None
    render: str | None = None
    view: int = 0
    tokenizer: str | None = None
    out: str | None = None
    histogram: str | None = None

    def __post_init__(self):
        if self.render is not None and self.out is None:
            raise BeitDataError("`render` needs `out` (a .png file)")


@dataclass(frozen=True, kw_only=True)
class PlanConfig:
    """Which batches ``beit-data plan`` prints; the order settings must be the run's own.

    Attributes:
        world_size: Ranks of the run (torchrun's ``WORLD_SIZE``).
        epochs, start_epoch: The epochs to print.
        steps: At most this many steps of each epoch.
        rank: Only this rank; all ranks when None.
    """

    shards: str
    tokens: str
    batch_size: int = PretrainConfig.batch_size
    world_size: int = 1
    epochs: int = 1
    start_epoch: int = 0
    steps: int | None = None
    rank: int | None = None
    seed: int = PretrainConfig.seed
    partitions: int = PARTITIONS
    mix_shards: int = PretrainConfig.mix_shards
    skip_missing: bool = False

    def __post_init__(self):
        if min(self.batch_size, self.world_size, self.epochs, self.mix_shards, self.partitions) < 1 \
                or self.start_epoch < 0:
            raise BeitDataError("`batch_size`, `world_size`, `epochs`, `partitions` and `mix_shards` must be at "
                                "least 1")
        if self.rank is not None and not 0 <= self.rank < self.world_size:
            raise BeitDataError(f"`rank` must be in [0, {self.world_size}), got {self.rank}")
