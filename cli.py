"""The ``beit-data`` command line: a thin click group over the ``pipelines`` stages.

Each command declares its options once, named as its config's settings: the options go to the
config through one mapping (``config_of``), the stage's ``run_*()`` runs it, and the command
prints its summary. Options shared by several commands are module constants. torch and DALI are
imported inside the commands, so ``beit-data --help`` is instant. The data commands come first
(``shards``, ``sample``, ``index``, ``tokenize``, ``plan``, ``inspect``), then the ones that
train and use models (``train-dvae``, ``pretrain``, ``probe``, ``export``).

    python -m cli --help    # the same as the console script, beit-data --help
"""

from __future__ import annotations

import atexit
import gc
import json
import math
import os
import re
import signal
import sys

import click

from beit_common import BeitDataError, Location, __version__, os_error, redact
from beit_common.location import REDACTED
from beit_data.stream_config import TARGETS, StreamConfig
from pipelines.config import (
    ENGINES,
    INVOCATION,
    MAX_VOCAB,
    PATCHES,
    PRECISIONS,
    SCHEDULES,
    ExportConfig,
    IndexConfig,
    InspectConfig,
    PlanConfig,
    PretrainConfig,
    ProbeConfig,
    RuntimeConfig,
    Sectioned,
    ShardsConfig,
    TokenizeConfig,
    TrainDVAEConfig,
    default,
    owners,
    setting_names,
    tracker_names,
)
from pipelines.recipes import DVAE_CONFIGS, RECIPES

# MKL picks kernels by memory alignment and splits work by load unless told not to, which moves
# the last bits of a float32 sum between runs; exact resume on the CPU compares losses bit for
# bit. AUTO is MKL's reproducible mode on the kernels of this CPU (COMPATIBLE, reproducible
# across CPU kinds, runs matrix products 2-3 times slower). It must be set before torch loads,
# which the commands do later (nothing imported above loads torch).
os.environ.setdefault("MKL_CBWR", "AUTO")

# The last thing the interpreter does at exit is a garbage collection over every object torch,
# timm and DALI made, about a second a process (each torchrun rank, each Slurm task). By then every
# file and process of the command is closed: what is frozen out of that collection is freed with
# the process.
atexit.register(gc.freeze)

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def as_flags(message: str, command: click.Command | None) -> str:
    """The library names settings in backticks (`batch_size`); on the command line they are flags."""
    if command is None:
        return message
    flags = {param.name: param.opts[0] for param in command.params if isinstance(param, click.Option) and param.name}
    return re.sub(r"`([a-z_]+)`", lambda m: flags.get(m.group(1), m.group(0)), message)


class Group(click.Group):
    """Turns a ``BeitDataError`` into a one-line message and a non-zero exit."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BeitDataError as exc:
            command = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
            raise click.ClickException(redact(as_flags(str(exc), command))) from None
        except OSError as exc:  # a full disk, a missing permission: the file and the reason
            raise click.ClickException(redact(str(os_error(exc)))) from None


@click.group(cls=Group, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="beit-data")
def main():
    """beit-data: tokenize image shards once, then pretrain BEiT on precomputed targets."""


# Options declared once: each is named as the config setting it sets, with the config's default.
# ``config_of`` builds a command's config from all its options, by name: an option that names no
# setting of the config is an error, so no option is dropped on the way.

# Options that only choose how a command prints, not what it does.
DISPLAY = ("as_json",)
# Options that are not settings of the command's config (DISPLAY, and the file of settings itself).
NOT_SETTINGS = (*DISPLAY, "config_file")


def setting(config: type, *decls: str, name: str | None = None, **kwargs):
    """A click option for the config setting ``name`` (from the flag by default); its default,
    shown in ``--help``, is the config's."""
    name = name or decls[0].split("/")[0].lstrip("-").replace("-", "_")
    return click.option(*decls, name, default=default(config, name), show_default=True, **kwargs)


def config_of(config: type, params: dict):
    """``config`` from a command's options, each passed to the setting of its name, and the
    settings of a ``--config`` file that have no option (``load_config_file``)."""
    settings = {k: v for k, v in params.items() if k not in NOT_SETTINGS}
    ctx = click.get_current_context(silent=True)
    settings = {**(ctx.meta.get(FILE_ONLY, {}) if ctx is not None else {}), **settings}
    return config.from_flat(**settings) if issubclass(config, Sectioned) else config(**settings)


FILE_ONLY = "beit_data.config_file_only"  # ctx.meta: a config file's settings that no option takes


def load_config_file(ctx: click.Context, param: click.Parameter, path: str | None):
    """Read a YAML or JSON file of settings by their flat names (as a run's ``config.yaml`` and
    ``config.json`` hold them) into the command's defaults: a flag on the command line overrides
    it. Settings the command has no option for go to its config as they are; a name the command's
    config does not know is refused in one line, as is a file that is not a mapping."""
    if path is None:
        return None
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)  # JSON is YAML
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror}", param=param) from None
    except yaml.YAMLError as exc:
        raise click.BadParameter(f"{path} is not YAML or JSON: {str(exc).splitlines()[0]}", param=param) from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path} holds no mapping of setting names to values", param=param)
    known = flat_names(CONFIG_OF_COMMAND[ctx.command.name])
    options = {p.name for p in ctx.command.params} - {param.name}
    unknown = sorted(k for k in data if k not in options and k not in known and k not in RECORDED_ONLY)
    if unknown:
        raise click.BadParameter(f"{path}: {ctx.command.name} has no setting {', '.join(unknown)}", param=param)
    data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k not in RECORDED_ONLY}
    ctx.default_map = {**(ctx.default_map or {}), **{k: v for k, v in data.items() if k in options}}
    ctx.meta[FILE_ONLY] = {k: v for k, v in data.items() if k not in options}
    return path


def flat_names(config: type) -> set[str]:
    """Every setting of a config by its flat name."""
    return set(owners(config)) if issubclass(config, Sectioned) else setting_names(config)


# What a run's config.json records beside its settings (derived figures), which a file may hold.
RECORDED_ONLY = ("ranks", "global_batch", "total_steps", "total_warmup_steps", "steps_per_epoch", "torch_threads",
                 "dealt", "shared_draws")


def config_file_option(*decls: str):
    return click.option(*decls, "config_file", type=click.Path(exists=True, dir_okay=False), default=None,
                        callback=load_config_file, is_eager=True, expose_value=True,
                        help="A YAML or JSON file of settings by their names (batch_size: 64), such as the config.yaml "
                             "a run writes; flags given on the command line override it.")


CONFIG_OF_COMMAND = {"pretrain": PretrainConfig, "tokenize": TokenizeConfig, "train-dvae": TrainDVAEConfig}
class ResumeType(click.Choice):
    """``--resume`` (yes), ``--resume auto`` or none (no), as the config's True, "auto" or False."""

    VALUES = {"yes": True, "auto": "auto", "no": False}

    def __init__(self):
        super().__init__(list(self.VALUES))

    def convert(self, value, param, ctx):
        if value in (True, False, "auto"):  # a config's value: the default, or a config file's
            return value
        return self.VALUES[super().convert(value, param, ctx)]


def resumed_options(options: dict) -> dict:
    """pretrain's options, where ``--resume`` finds a run in ``--out``: each setting not given on
    the command line is the one the run's ``config.json`` records (``with_recorded``)."""
    from pipelines.run_folder import recorded_settings

    return with_recorded(options, recorded_settings(Location(options["out"])) if options["resume"] else {})


def with_recorded(options: dict, recorded: dict) -> dict:
    """``options`` where each setting not given on the command line is the ``recorded`` one, so
    that ``--resume`` alone continues a run. One recorded without its credentials (a redacted
    ``pipe:`` command) must be given again; ``--shards`` must come from one or the other."""
    ctx = click.get_current_context()
    for name, value in recorded.items():
        if name not in options or name in INVOCATION:
            continue
        if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT:
            continue  # given again: the run checks that it agrees
        if isinstance(value, str) and REDACTED in value:
            raise BeitDataError(f"`{name}` is recorded without its credentials ({value}); give it again")
        options[name] = value
    if not options["shards"]:
        raise click.UsageError("Missing option '--shards' (a run resumed from its config.json takes its own).")
    return options


def say(text: str, err: bool = False) -> None:
    """``click.echo`` with every URL's credentials redacted: nothing printed holds a secret."""
    click.echo(redact(text), err=err)


def echo_summary(title: str, summary: dict) -> None:
    say(f"{title}: " + ", ".join(f"{k} {v}" for k, v in summary.items()))


def main_process() -> bool:
    """Whether this process is rank 0 (or alone): under torchrun only rank 0 prints the summary."""
    from pipelines.runtime import dist_info

    return dist_info().rank == 0


class LocationType(click.Path):
    """A local path, checked as ``click.Path`` checks it, or an object-storage URL (``s3://``,
    ``gs://``), checked when it is used (a missing bucket or prefix is one line then)."""

    def convert(self, value, param, ctx):
        location = Location(value)
        return location if location.local_path() is None else Location(super().convert(value, param, ctx))


class Real(click.FloatRange):
    """A float in a range, and a number: click's ``FloatRange`` lets ``nan`` through (every
    comparison with it is false) and ``inf`` where there is no upper bound. Every float option
    takes this type, so each has a range checked at parse time (``tests/cli/test_integrity_settings.py``
    walks every command's options)."""

    name = "real"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value} is not a finite number", param, ctx)
        return number


class TrackersType(click.ParamType):
    """A comma list of trackers (``tensorboard,csv``; ``none``), as the config's tuple of names; a
    config file's list is taken as it is."""

    name = "trackers"

    def convert(self, value, param, ctx):
        try:
            return tracker_names(value)
        except BeitDataError as exc:
            self.fail(str(exc).removeprefix("`log_to`: "), param, ctx)


class DeviceType(click.ParamType):
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto``, checked at parse time (torch would raise later)."""

    name = "device"

    def convert(self, value, param, ctx):
        if isinstance(value, str) and re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", value):
            return value
        self.fail(f"{value!r} is not cpu, cuda, cuda:N or auto", param, ctx)


def layer_numbers(ctx, param, value: str | None) -> tuple[int, ...] | None:
    """``8,9,10`` as block numbers (1 or more), for --layers and --probe-layers."""
    if not value:
        return None
    try:
        layers = tuple(int(x) for x in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected block numbers such as 8,9,10, got {value}") from None
    if min(layers) < 1:
        raise click.BadParameter(f"block numbers start at 1, got {value}")
    return layers


SHARDS_HELP = ("Shards: a brace pattern (data/train-{000000..000099}.tar), a directory or a glob; local, or s3://, "
               "gs://, http(s):// URLs (a prefix is listed), or WebDataset pipe: commands.")
SHARDS = click.option("--shards", "shards", required=True, help=SHARDS_HELP)
MAX_SEED = 2**63 - 1  # torch.manual_seed takes the seed plus a rank and step offset: a 64-bit sum
SEED = setting(StreamConfig, "--seed", type=click.IntRange(0, MAX_SEED), help="Seed of every random choice.")
MIX_SHARDS = setting(StreamConfig, "--mix-shards", type=click.IntRange(min=1),
                     help="Shards each partition reads at once; their samples are permuted together.")
PARTITIONS = setting(StreamConfig, "--partitions", type=click.IntRange(min=1),
                     help="Partitions of each epoch: a global step takes its share of samples from each. A rank reads "
                          "whole partitions when the number of ranks divides them.")
QUIET = click.option("--quiet", "progress", is_flag=True, flag_value=False, default=True, help="Hide progress bars.")
MAX_PIXELS = click.option(
    "--max-pixels", type=click.IntRange(min=1), default=None,
    help="Reject images with more pixels, as likely decompression bombs [default: Pillow's limit, 178,956,970].")
DEVICE = setting(RuntimeConfig, "--device", type=DeviceType(),
                 help="cpu, cuda, cuda:N, or auto (this rank's GPU where CUDA is present).")
PRECISION = click.option(
    "--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
    help="bf16 or fp16 autocast, or fp32. auto: bf16 on a GPU that computes it natively (A100, H100, L4...), fp16 on "
         "one that does not (V100, T4: bf16 would be emulated, slowly), fp32 on the CPU; the start says which.")
NUM_THREADS = setting(StreamConfig, "--num-threads", type=click.IntRange(min=1), help="DALI CPU threads.")


# The commands that make and read data.


@main.command(context_settings=CONTEXT)
@click.argument("sources", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the shards.")
@setting(ShardsConfig, "--maxcount", type=click.IntRange(min=1), help="Images per shard.")
@setting(ShardsConfig, "--prefix", help="Shard file-name prefix.")
@setting(ShardsConfig, "--shuffle/--no-shuffle",
         help="Write the images in a seeded random order; --no-shuffle keeps the listing order "
              "(class by class for ImageFolder trees).")
@setting(ShardsConfig, "--seed", type=click.IntRange(0, MAX_SEED), help="Seed of the write order.")
@click.option("--classes", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Number the classes by this class map (another run's shards.json or classes.json), so that an id "
                   "means the same class in every set [default: this tree's class folders in name order].")
@click.option("--overwrite", is_flag=True,
              help="Replace the shards and reports of an earlier run in --out (and in --holdout-out), only once the "
                   "new run is complete: a failed run leaves the earlier one as it was (a folder that is not empty "
                   "is refused otherwise).")
@click.option("--image-column", default=None,
              help="Parquet sources: the column of image bytes (or a struct with bytes) [default: found by name: "
                   "image, jpg, png, webp, ...].")
@click.option("--label-column", default=None,
              help="Parquet sources: the column of class ids [default: found by name: label, cls, ...].")
@click.option("--image-root", default=None,
              help="Parquet sources whose image column holds paths and no bytes (Hugging Face datasets cast from "
                   "files): read a relative path from this folder or URL prefix [default: the Parquet file's "
                   "folder].")
@click.option("--holdout-per-class", type=Real(min=0, min_open=True), default=None,
              help="Also write a held-out set: this many images of each class (or this share, below 1), drawn "
                   "from --seed, disjoint from the training shards, with the same class map. A class gives at most "
                   "half its images (rounded down), with a warning where that is fewer than asked.")
@click.option("--holdout-out", type=click.Path(file_okay=False), default=None,
              help="Folder for the held-out shards [default: OUT-holdout].")
@setting(ShardsConfig, "--min-size", type=click.IntRange(min=0),
         help="Reject images whose shorter side is under N pixels, which tokenize would set aside later (its "
              "--min-size is the tokenizer's input size: 112 for DALL-E and train-dvae, 224 for VQ-KD: pass 224 "
              "then), so that a held-out count per class holds; a held-out image rejected is replaced by the next "
              "of its class. 0 keeps every image.")
@MAX_PIXELS
@QUIET
def shards(**options):
    """Write WebDataset shards and DALI .idx files from image folders, path lists or Parquet.

    Each SOURCE is a flat folder of images, an ImageFolder tree (class sub-folders become
    .cls members; a folder with images both at its top and in sub-folders is refused), a text
    file with one image path per line, or a Parquet image dataset (a
    .parquet file, a folder of them, a glob or an s3:// / gs:// prefix: the Hugging Face layout,
    an image struct and a label whose class names the metadata holds, or img2dataset's jpg
    column), read a row group at a time. Each sample's .json member names where it came from
    (the file, or the Parquet file and row) and its class; shards.json records the order's seed
    and the class map, which --classes reuses for a validation or probe set. Sources that
    overlap (a file reached twice, by two sources or through a link) are refused.
    """
    from pipelines.shards import run_shards

    result = run_shards(config_of(ShardsConfig, options))
    for warning in result.warnings:
        say(f"shards: warning: {as_flags(warning, click.get_current_context().command)}", err=True)
    echo_summary("shards", result.summary())
    for reject in result.rejects + (result.holdout.rejects if result.holdout else []):
        say(f"  rejected {reject.key}: {reject.reason}", err=True)
    say(f"wrote {options['out']}" + (f" and {result.holdout.shards[0].parent}" if result.holdout and
                                      result.holdout.shards else ""))


@main.command(context_settings=CONTEXT)
@click.option("--out", required=True, type=LocationType(file_okay=False), help="Folder for the sample shards.")
@click.option("--maxcount", type=click.IntRange(min=1), default=8, show_default=True, help="Images per shard.")
@click.option("--holdout", type=click.IntRange(min=0, max=13), default=0, show_default=True,
              help="Keep the last N photographs (by name) out of --out, for validation.")
@click.option("--holdout-out", default=None, type=LocationType(file_okay=False),
              help="Folder for the held-out shard (needed with --holdout).")
def sample(out, maxcount, holdout, holdout_out):
    """Write the embedded sample of real photographs as WebDataset shards."""
    from pipelines.shards import write_sample

    if holdout and not holdout_out:
        raise click.UsageError("--holdout needs --holdout-out, the folder for the held-out shard")
    for prefix, folder, result in write_sample(out, maxcount=maxcount, holdout=holdout, holdout_out=holdout_out):
        echo_summary(prefix, result.summary())
        say(f"wrote {folder}")


@main.command(context_settings=CONTEXT)
@SHARDS
@click.option("--overwrite", is_flag=True, help="Write the index of every shard, also where one exists.")
@QUIET
def index(**options):
    """Write a DALI .idx beside each shard that has none, local or on object storage.

    The training order reads each image by its offset; without an .idx, every node scans the
    tar headers once (by range requests on object storage).
    """
    from pipelines.index import run_index

    result = run_index(config_of(IndexConfig, options))
    say(f"indexed {len(result['written'])} of {result['shards']} shards ({result['skipped']} had an index)")


@main.command(context_settings=CONTEXT)
@config_file_option("-c", "--config")
@SHARDS
@click.option("--tokenizer", required=True, type=click.Path(dir_okay=False),
              help="Tokenizer file: OpenAI's encoder.pkl, a dVAE state dict, a train-dvae checkpoint or a "
                   "BEiT v2 VQ-KD .pth.")
@click.option("--out", required=True, type=LocationType(file_okay=False),
              help="Folder (or s3:// / gs:// prefix) for the token Parquet files.")
@click.option("--recipe", type=click.Choice(sorted(RECIPES)), default=None,
              help="The paper whose views to draw: beit (crops from 8%, 112-px Lanczos tokenizer view) or beitv2 "
                   "(crops from 20%, the model's 224-px bicubic view) [default: beit for a dVAE, beitv2 for VQ-KD].")
@setting(TokenizeConfig, "--views", type=click.IntRange(min=1), help="Views per image.")
@click.option("--min-scale", type=Real(min=0, min_open=True, max=1), default=None,
              help="Smallest crop area, as a fraction of the image [default: the recipe's, 0.08 or 0.2].")
@SEED
@setting(TokenizeConfig, "--batch-size", type=click.IntRange(min=1),
         help="Images per batch (each gives --views tokenizer inputs).")
@click.option("--min-size", type=click.IntRange(min=0), default=None,
              help="Reject images whose shorter side is under N pixels [default: the tokenizer's input size]; "
                   "0 keeps every decodable image and upscales small views.")
@click.option("--no-target-jitter", "target_jitter", is_flag=True, flag_value=False, default=True,
              help="Tokenize views without colour jitter; pretrain then draws fresh jitter each epoch.")
@click.option("--overwrite", is_flag=True, help="Replace token files made with another tokenizer or recipe.")
@click.option("--strict", is_flag=True,
              help="Exit non-zero if any sample was rejected; a shard with a rejected sample is not written.")
@click.option("--compile", is_flag=True,
              help="Compile the tokenizer with torch.compile (slow to start; faster over a long run on a GPU).")
@MAX_PIXELS
@click.option("--batch-pixels", type=click.IntRange(min=1), default=None,
              help="Decoded pixels one batch may hold: a batch ends early rather than pass it, and a larger image "
                   "is rejected, before any is decoded [default: 536,870,912, about 1.6 GB of 8-bit RGB].")
@NUM_THREADS
@DEVICE
@PRECISION
@setting(TokenizeConfig, "--engine", type=click.Choice(ENGINES),
         help="plain: this process (or each torchrun or srun task, taking every N-th shard). ray: a pool of Ray "
              "workers, one per GPU, each holding a tokenizer and a DALI pipeline and taking one shard at a time; the "
              "shard of a worker that died is started again. Both write the same rows.")
@click.option("--ray-address", default=None,
              help="With --engine ray: the cluster to join, auto (the one this machine belongs to, or RAY_ADDRESS) or "
                   "HOST:PORT; there the shards, --tokenizer and --out must be where every node reads them [default: "
                   "a private Ray on this machine, on 127.0.0.1 only, stopped when the command ends].")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="With --engine ray: how many workers [default: one per GPU of the cluster (--gpus-per-worker "
                   "each), or 1 where it has none].")
@click.option("--gpus-per-worker", type=Real(min=0), default=None,
              help="With --engine ray: GPUs each worker reserves [default: 1 where the cluster has GPUs, else 0].")
@setting(TokenizeConfig, "--cpus-per-worker", type=Real(min=0), help="With --engine ray: CPUs each worker reserves.")
@setting(TokenizeConfig, "--max-retries", type=click.IntRange(min=0),
         help="With --engine ray: how many times a shard is started again after its worker died; then it is named "
              "as failed, the other shards finish, the command exits non-zero, and a rerun does the rest.")
@QUIET
def tokenize(**options):
    """Tokenize every image's views once and write one Parquet file per shard."""
    from pipelines.tokenize_shards import run_tokenize

    cfg = config_of(TokenizeConfig, options)
    result = run_tokenize(cfg)
    if main_process():
        echo_summary("tokenize", result.summary())
        for r in result.rejects[:20]:
            say(f"  rejected {r['shard']}:{r['key']}: {r['reason']}", err=True)
        if len(result.rejects) > 20:
            say(f"  ... {len(result.rejects) - 20} more in {cfg.out}/summary.json", err=True)
        for failed in result.failed:
            say(f"  failed {failed}", err=True)
        if cfg.engine == "ray":
            done = result.shards - result.skipped - len(result.failed)
            say(f"tokenize: ray: {done} shards done, {result.retried} retried, {len(result.failed)} failed")
        if not result.failed:
            say(f"wrote {cfg.out}")
    if result.failed:
        raise click.ClickException(f"{len(result.failed)} shard{'s' if len(result.failed) > 1 else ''} failed (a "
                                   "worker died on each start); run the same command again to finish")
    if cfg.strict and result.rejects:
        held = len({r["shard"] for r in result.rejects})
        raise click.ClickException(f"{len(result.rejects)} samples were rejected (--strict); the {held} shards that "
                                   "hold them were not written")


@main.command(context_settings=CONTEXT)
@SHARDS
@click.option("--tokens", required=True, type=LocationType(exists=True, file_okay=False),
              help="Folder of token Parquet files written by beit-data tokenize.")
@setting(PlanConfig, "--batch-size", type=click.IntRange(min=1),
         help="Images per rank per micro-batch, as in pretrain.")
@setting(PlanConfig, "--grad-accum", type=click.IntRange(min=1), help="Micro-batches per step, as in pretrain.")
@setting(PlanConfig, "--world-size", type=click.IntRange(min=1),
         help="Ranks of the run: they split each global step.")
@setting(PlanConfig, "--global-batch", type=click.IntRange(min=1),
         help="Images per global step (sets --batch-size to it / ranks / --grad-accum).")
@setting(PlanConfig, "--epochs", type=click.IntRange(min=1), help="Epochs to print.")
@setting(PlanConfig, "--start-epoch", type=click.IntRange(min=0), help="First epoch to print.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Print at most N steps of each epoch.")
@click.option("--rank", type=click.IntRange(min=0), default=None, help="Print this rank only (default: every rank).")
@click.option("--skip-missing", is_flag=True, help="Skip shards that have no token file, as pretrain does.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per batch: epoch, rank, step, keys, views.")
@PARTITIONS
@MIX_SHARDS
@SEED
def plan(as_json, **options):
    """Print the keys and stored views of every batch that pretrain will see, without decoding images.

    Batches come ordered by epoch, global step and rank, from the same code as the training stream:
    use the run's --batch-size (or --global-batch), --world-size, --grad-accum, --partitions,
    --mix-shards and --seed. A global step holds the same images on any --world-size: the ranks
    only split it.
    """
    from pipelines.plan import format_batch, run_plan

    planned = run_plan(config_of(PlanConfig, options))
    if planned.note:
        say(f"plan: {planned.note}", err=True)
    for batch in planned:
        say(json.dumps(batch.as_dict()) if as_json else format_batch(batch))


@main.command(context_settings=CONTEXT)
@click.argument("tokens", type=LocationType())
@click.option("--shards", default=None, help="Shards to check coverage against (and to find images for --render).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON document.")
@click.option("--render", default=None, metavar="KEY", help="Draw the view of this key as a PNG.")
@setting(InspectConfig, "--view", type=click.IntRange(min=0), help="View to draw with --render.")
@click.option("--tokenizer", default=None, type=click.Path(dir_okay=False),
              help="Tokenizer with a decoder, to add the reconstruction panel to --render.")
@click.option("--out", default=None, type=LocationType(dir_okay=False), help="PNG file for --render.")
@click.option("--histogram", default=None, type=LocationType(dir_okay=False),
              help="Also draw token frequencies to this PNG (linear and log scales, dead codes marked).")
@setting(InspectConfig, "--max-code-share", type=Real(0, 1, min_open=True),
         help="Warn when one code holds more than this share of the tokens.")
@setting(InspectConfig, "--max-dead-codes", type=Real(0, 1),
         help="Warn when more than this share of the codebook never occurs.")
def inspect(as_json, **options):
    """Summarise, validate and draw token Parquet files (exit 1 when validation finds errors)."""
    from pipelines.inspect_tokens import format_summary, run_inspect

    cfg = config_of(InspectConfig, options)
    result = run_inspect(cfg)
    if cfg.render is not None:
        say(f"wrote {cfg.out}")
        return
    if as_json:
        say(json.dumps(result, indent=1))
    else:
        say(format_summary(result))
        if cfg.histogram:
            say(f"wrote {cfg.histogram}")
    if result["errors"]:
        raise SystemExit(1)


# The commands that train and use models.


@main.command("train-dvae", context_settings=CONTEXT)
@config_file_option("-c", "--config-file")
@click.option("--shards", default=None, help=SHARDS_HELP + " Required unless --resume finds them recorded.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Checkpoint file to write.")
@setting(TrainDVAEConfig, "--config", type=click.Choice(DVAE_CONFIGS),
         help="Architecture: tiny (n_hid 16, vocab 512) or dalle (OpenAI's sizes).")
@setting(TrainDVAEConfig, "--vocab-size", type=click.IntRange(min=2, max=MAX_VOCAB),
         help="Codebook size, in place of the --config's (512 for tiny, 8192 for dalle): a few photographs "
              "use a few codes (make demo: 16), a large set thousands.")
@setting(TrainDVAEConfig, "--steps", type=click.IntRange(min=1), help="Training steps.")
@setting(TrainDVAEConfig, "--batch-size", type=click.IntRange(min=1), help="Images per step.")
@setting(TrainDVAEConfig, "--lr", type=Real(min=0, min_open=True), help="Peak learning rate (cosine decay).")
@setting(TrainDVAEConfig, "--checkpoint-every", type=click.IntRange(min=1), help="Save a checkpoint every N steps.")
@click.option("--resume", is_flag=True,
              help="Continue training the checkpoint at --out, with the settings it records (a flag given again "
                   "must agree, but for how the run goes).")
@click.option("--extend", is_flag=True,
              help="With --resume: train to a larger --steps than the run was started with, finished or not; its "
                   "schedules are recomputed to end there.")
@click.option("--overwrite", is_flag=True, help="Replace an existing checkpoint at --out.")
@SEED
@DEVICE
@PRECISION
@QUIET
def train_dvae(**options):
    """Train a discrete VAE tokenizer on your own shards (DALL-E recipe, Gumbel-softmax)."""
    from pipelines.checkpoint import recorded_dvae_settings
    from pipelines.train_dvae import run_train_dvae

    recorded = recorded_dvae_settings(Location(options["out"])) if options["resume"] else {}
    report = run_train_dvae(config_of(TrainDVAEConfig, with_recorded(options, recorded)))
    echo_summary("held-out report", {k: report[k] for k in
                                     ("psnr", "psnr_mean_colour", "perplexity", "codes_used", "steps", "seconds")})
    say(f"wrote {options['out']}")
    for warning in report["warnings"]:
        say(f"train-dvae: warning: {warning}", err=True)


BETA = Real(0, 1, max_open=True)  # each of AdamW's betas
CHANNEL = Real(0, 1)  # a channel's mean, in [0,1] pixel units

# pretrain's optimizer and schedule (timm's factories), in the order --help lists them.
OPTIMIZER_OPTIONS = [
    setting(PretrainConfig, "--opt",
            help="The optimizer, by its name in timm's factory (timm.optim.create_optimizer_v2: adamw, adam, sgd, "
                 "momentum, lamb, lion, ...; lookahead_adamw wraps it), over the same parameter groups (no weight "
                 "decay on biases, norms, LayerScale and the model's no_weight_decay()). An unknown name is refused "
                 "before the run starts."),
    setting(PretrainConfig, "--opt-eps", type=Real(min=0, min_open=True),
            help="The optimizer's epsilon, for those that take one."),
    setting(PretrainConfig, "--opt-betas", "--adam-betas", name="betas", type=(BETA, BETA),
            help="The optimizer's beta1 and beta2, for those that take them (BEiT v2's 1600-epoch recipe lowers "
                 "beta2 to 0.98); --adam-betas is its older name."),
    setting(PretrainConfig, "--momentum", type=Real(0, 1, max_open=True),
            help="The momentum of the optimizers that take one (sgd, momentum, ...)."),
    setting(PretrainConfig, "--weight-decay", type=Real(min=0), help="Weight decay."),
    setting(PretrainConfig, "--sched", type=click.Choice(SCHEDULES),
            help="The learning-rate schedule, stepped per optimizer step. cosine: BEiT's (linear warmup per step, "
                 "then a cosine to --min-lr), as every run before; step, tanh, poly and constant: timm's "
                 "(timm.scheduler.create_scheduler_v2), warming up linearly from 0; none: --lr throughout, no warmup."),
    click.option("--lr", type=Real(min=0, min_open=True), default=None,
                 help="Peak learning rate, not rescaled [recipe]."),
    setting(PretrainConfig, "--min-lr", type=Real(min=0), help="Learning rate at the end of the cosine (tanh, poly)."),
    click.option("--warmup-epochs", type=Real(min=0), default=None, help="Linear warmup, per step [recipe]."),
    click.option("--warmup-steps", type=click.IntRange(min=0), default=None,
                 help="Warmup steps; when given, it wins over --warmup-epochs (for short and test runs)."),
    setting(PretrainConfig, "--decay-epochs", type=Real(min=0, min_open=True),
            help="--sched step: epochs between two decays of the learning rate (rounded to whole steps)."),
    setting(PretrainConfig, "--decay-rate", type=Real(min=0, min_open=True),
            help="--sched step: the factor of each decay; --sched poly: the power."),
]

# pretrain's held-out figures and k-NN probe, in the order --help lists them.
QUALITY_OPTIONS = [
    click.option("--val-shards", default=None, help="Held-out shards (not read by training): masked-token loss, "
                                                     "top-1/top-5 and perplexity on them."),
    click.option("--val-tokens", default=None, type=LocationType(exists=True, file_okay=False),
                 help="The token Parquet files of --val-shards, made by the same tokenizer."),
    setting(PretrainConfig, "--val-every", type=click.IntRange(min=1),
            help="Evaluate the held-out set at step 0, every N steps and at the end."),
    setting(PretrainConfig, "--val-images", type=click.IntRange(min=1),
            help="Size of the fixed held-out set, over all ranks."),
    click.option("--probe-every", type=click.IntRange(min=1), default=None,
                 help="Run a k-NN probe on rank 0 every N steps (off by default); needs --probe-train and "
                      "--probe-val."),
    click.option("--probe-train", default=None, help="Labeled shards (.cls) the probe's k-NN votes with."),
    click.option("--probe-val", default=None, help="Labeled shards the probe is scored on."),
    click.option("--probe-layers", default=None, callback=layer_numbers,
                 help="Blocks (1-based, comma-separated) whose features the probe averages [default: the last]."),
]


def pretrain_options(command):
    """pretrain's options, in the order ``--help`` lists them."""
    options = [
        config_file_option("-c", "--config"),
        click.option("--shards", default=None, help=SHARDS_HELP + " Required unless --resume finds them recorded."),
        click.option("--tokens", default=None, type=LocationType(exists=True, file_okay=False),
                     help="Folder of token Parquet files written by beit-data tokenize."),
        setting(PretrainConfig, "--targets", type=click.Choice(TARGETS),
                help="stored: the views and tokens of --tokens. online: a fresh view of every image each epoch, "
                     "tokenized in the loop by --tokenizer (the reference recipe, to compare with; no --tokens)."),
        click.option("--tokenizer", default=None, type=click.Path(dir_okay=False),
                     help="With --targets online: the tokenizer file, as tokenize takes it."),
        click.option("--out", required=True, type=LocationType(file_okay=False),
                     help="Run folder (or s3:// / gs:// prefix): checkpoints and logs."),
        click.option("--recipe", type=click.Choice(sorted(RECIPES)), default=None,
                     help="The paper's settings for the options marked [recipe]: beit (800 epochs) or beitv2 (1600 "
                          "epochs, the extra head) [default: the one the tokens were made with; online, beit for a "
                          "dVAE --tokenizer and beitv2 for VQ-KD]."),
        click.option("--model", default=None,
                     help="beit_mim_{tiny,base,large}_patch16_224, or beitv2_mim_* for BEiT v2's extra head [recipe]."),
        click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs to train [recipe]."),
        click.option("--steps", type=click.IntRange(min=1), default=None, help="Steps to train (overrides --epochs)."),
        setting(PretrainConfig, "--batch-size", type=click.IntRange(min=1),
                help="Images per rank per micro-batch; a step's global batch is this x ranks x --grad-accum."),
        setting(PretrainConfig, "--grad-accum", type=click.IntRange(min=1),
                help="Micro-batches per optimizer step (timm's --grad-accum-steps, unilm's --update_freq): "
                     "the paper's 2048 on one GPU is --batch-size 256 --grad-accum 8."),
        *OPTIMIZER_OPTIONS,
        click.option("--drop-path", type=Real(0, 1, max_open=True), default=None,
                     help="Stochastic depth rate [recipe]."),
        click.option("--layer-scale", type=Real(min=0), default=None,
                     help="LayerScale initial value; 0 turns LayerScale off [recipe]."),
        setting(PretrainConfig, "--clip-grad", type=Real(min=0),
                help="Clip the gradient's norm to this; 0 turns clipping off (as in DINO and iBOT)."),
        setting(PretrainConfig, "--num-masked", type=click.IntRange(1, PATCHES),
                help=f"Patches masked per image, in blocks (BEiT: 75 of {PATCHES}; BEiT-3 masks 40%, 78)."),
        setting(PretrainConfig, "--mean", type=(CHANNEL,) * 3,
                help="The per-channel mean (R G B, in [0,1] pixel units) that normalises the model's input: the "
                     "training views, the held-out set and the probe. The export records it in its pretrained_cfg, "
                     "so timm fine-tunes with it (unilm's default without --imagenet_default_mean_and_std is "
                     "0.5 0.5 0.5). The tokenizer is not affected: it normalises [0,1] pixels itself."),
        setting(PretrainConfig, "--std", type=(Real(min=0, min_open=True),) * 3,
                help="The per-channel standard deviation (R G B) that normalises the model's input, as --mean."),
        setting(PretrainConfig, "--checkpoint-every", type=click.IntRange(min=1),
                help="Save the latest checkpoint, RUN/checkpoint.pt (what --resume takes), every N steps, at the end "
                     "and where an epoch's is kept; each replaces the one before."),
        setting(PretrainConfig, "--keep-checkpoints", type=click.IntRange(min=0),
                help="Also keep the N newest checkpoints, as RUN/checkpoints/step-SSSSSSSS.pt (timm's "
                     "--checkpoint-hist), to export, probe or roll back to; older ones are deleted once a newer one is "
                     "whole. 0: none (the latest and the epochs' of --checkpoint-every-epochs stay). A kept checkpoint "
                     "costs no second write on a local disk (a hard link) and no second upload to object storage (a "
                     "server-side copy)."),
        setting(PretrainConfig, "--checkpoint-every-epochs", type=click.IntRange(min=0),
                help="Keep the checkpoint that ends every N-th epoch for good, as "
                     "RUN/checkpoints/step-SSSSSSSS-epoch-EEEE.pt (unilm's --save_ckpt_freq). 100 suits ImageNet: an "
                     "800-epoch ViT-B run keeps 8 of about 1.1 GB (weights and AdamW's moments), among them the "
                     "300 epochs of BEiT's ablations; unilm's 20 would keep 40. 0: none."),
        setting(PretrainConfig, "--log-every", type=click.IntRange(min=1), help="Log every N steps."),
        setting(PretrainConfig, "--log-to", type=TrackersType(),
                help="Where the figures go besides RUN/log.jsonl (always written), a comma list of: tensorboard "
                     "(RUN/tb), csv (RUN/summary.csv, a row a logged step, as timm's), wandb, mlflow (the extras "
                     "beit-data[wandb] and beit-data[mlflow], set up by their own environment: WANDB_MODE, "
                     "WANDB_PROJECT, MLFLOW_TRACKING_URI, ...); none for log.jsonl alone. May change on --resume; "
                     "a resumed run logs on into the same W&B and MLflow runs (RUN/trackers.json)."),
        click.option("--resume", is_flag=False, flag_value="yes", default=False, type=ResumeType(),
                     help="Continue the run in --out from its checkpoint, exactly, with the settings its config.json "
                          "records (a flag given again must agree, but for how the run goes). --resume auto resumes "
                          "where --out holds a run and starts one where not (for requeued jobs)."),
        click.option("--extend", is_flag=True,
                     help="With --resume: train the run to a larger --steps (or --epochs) than it was started with, "
                          "finished or not; the learning rate's cosine is recomputed to end there."),
        click.option("--stop-after", type=click.IntRange(min=1), default=None,
                     help="Stop after N steps of this invocation, with a checkpoint (for time-limited jobs)."),
        click.option("--skip-missing", is_flag=True, help="Skip shards that have no token file, instead of failing."),
        click.option("--compile", is_flag=True, help="Compile the model with torch.compile."),
        *QUALITY_OPTIONS,
        click.option("--record-batches", is_flag=True,
                     help="Each rank writes the keys of every step it trains to RUN/batches-rankR.jsonl, for audits."),
        PARTITIONS, MIX_SHARDS, NUM_THREADS, SEED, DEVICE, PRECISION, QUIET,
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command(context_settings=CONTEXT)
@pretrain_options
def pretrain(**options):
    """Pretrain a BEiT MIM model on images and their precomputed visual tokens (torchrun-ready)."""
    from pipelines.pretrain import run_pretrain

    result = run_pretrain(config_of(PretrainConfig, resumed_options(options)))
    if main_process():
        echo_summary("pretrain", result.summary())
        if result.holdout:
            last = result.holdout[-1]
            say("held-out masked-token accuracy: " + " -> ".join(
                f"step {r['step']} top-1 {100 * r['val_top1']:.1f}% top-5 {100 * r['val_top5']:.1f}% "
                f"(loss {r['val_loss']:.3f})" for r in result.holdout)
                + f"; always predicting the most common code: top-1 {100 * last['val_majority']:.1f}%")
        for warning in result.warnings():
            say(f"pretrain: warning: {warning}", err=True)
    if result.stopped:  # the conventional exit status of a process ended by that signal
        raise SystemExit(128 + int(getattr(signal, result.stopped)))


@main.command(context_settings=CONTEXT)
@click.argument("model", type=LocationType(exists=True))
@click.option("--step", type=click.IntRange(min=0), default=None,
              help="With a run folder: the checkpoint it keeps at this step (RUN/checkpoints/step-S*.pt) instead of "
                   "its latest.")
@click.option("--train-shards", required=True, help="Labeled shards (.cls members) the k-NN votes with.")
@click.option("--val-shards", required=True, help="Labeled shards the probe is scored on.")
@setting(ProbeConfig, "--k", type=click.IntRange(min=1), help="Neighbours of the k-NN.")
@setting(ProbeConfig, "--temperature", type=Real(min=0, min_open=True),
         help="Temperature T of the k-NN's exp(cos / T) votes.")
@click.option("--layers", default=None, callback=layer_numbers,
              help="Blocks (1-based, comma-separated) whose mean patch tokens are averaged [default: the last].")
@click.option("--linear", is_flag=True, help="Also fit a logistic-regression probe on the cached features.")
@setting(ProbeConfig, "--batch-size", type=click.IntRange(min=1), help="Images per forward pass.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON document.")
@NUM_THREADS
@DEVICE
@QUIET
def probe(as_json, **options):
    """k-NN (and linear) probe of a frozen encoder: MODEL is a pretrain run folder or an exported encoder.

    Images are centre-cropped at 224; features are mean-pooled patch tokens (bf16 on a GPU).
    """
    from pipelines.probe import format_probe, run_probe

    result = run_probe(config_of(ProbeConfig, options))
    if result is not None:  # rank 0 under torchrun or srun
        say(json.dumps(result, indent=1) if as_json else format_probe(result))


@main.command(context_settings=CONTEXT)
@click.argument("run", type=LocationType(exists=True, file_okay=False))
@click.option("--step", type=click.IntRange(min=0), default=None,
              help="The checkpoint the run keeps at this step (RUN/checkpoints/step-S*.pt; pretrain "
                   "--keep-checkpoints, --checkpoint-every-epochs) instead of its latest, RUN/checkpoint.pt.")
@click.option("--out", required=True, type=LocationType(),
              help="A folder timm opens as local-dir:OUT (config.json, model.safetensors), or one .pth or "
                   ".safetensors file with a JSON beside it; local, or an s3:// or gs:// URL.")
@click.option("--overwrite", is_flag=True, help="Replace an existing export.")
def export(**options):
    """Write a pretrain run's encoder (its latest checkpoint, or a kept one: --step) as weights that timm's Beit
    loads, with the mean and std it saw."""
    from pipelines.export import run_export

    cfg = config_of(ExportConfig, options)
    info = run_export(cfg)
    say(f"wrote {info.get('folder') or info['checkpoint_path']}")
    if "folder" in info:
        say(f"fine-tune it with: timm.create_model('local-dir:{info['folder']}', pretrained=True, num_classes=N)")
        return
    kwargs = ", ".join(f"{k}={v!r}" for k, v in info["timm_kwargs"].items())
    say(f"load it with: timm.create_model({info['timm_model']!r}, {kwargs}, checkpoint_path="
        f"{info['checkpoint_path']!r}, pretrained_cfg_overlay=JSON['pretrained_cfg'])")


if __name__ == "__main__":
    sys.exit(main(prog_name="beit-data"))
