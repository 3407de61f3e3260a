"""Options declared once: each is named as the config setting it sets, with the config's default.

``config_of`` builds a command's config from its options, all of them, by name: an option that
names no setting of the config is an error, so no option is dropped on the way. Options shared
by several commands are defined here once.
"""

from __future__ import annotations

import math
import re

import click

from beit_common import Location, redact
from beit_data.stream_config import StreamConfig
from pipelines.pretrain_config import RuntimeConfig
from pipelines.sections import Sectioned, default

__all__ = ["setting", "config_of", "say", "echo_summary", "main_process", "LocationType", "Real", "DeviceType",
           "layer_numbers", "MAX_SEED", "DISPLAY", "SHARDS", "SEED", "MIX_SHARDS", "PARTITIONS", "QUIET", "MAX_PIXELS",
           "DEVICE", "NUM_THREADS"]

# Options that only choose how a command prints, not what it does.
DISPLAY = ("as_json",)


def setting(config: type, *decls: str, name: str | None = None, **kwargs):
    """A click option for the config setting ``name`` (from the flag by default); its default,
    shown in ``--help``, is the config's."""
    name = name or decls[0].split("/")[0].lstrip("-").replace("-", "_")
    return click.option(*decls, name, default=default(config, name), show_default=True, **kwargs)


def config_of(config: type, params: dict):
    """``config`` from a command's options, each passed to the setting of its name."""
    settings = {k: v for k, v in params.items() if k not in DISPLAY}
    return config.from_flat(**settings) if issubclass(config, Sectioned) else config(**settings)


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
        return location if not location.is_local else Location(super().convert(value, param, ctx))


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


SHARDS = click.option(
    "--shards", "shards", required=True,
    help="Shards: a brace pattern (data/train-{000000..000099}.tar), a directory or a glob; local, or s3://, "
         "gs://, http(s):// URLs (a prefix is listed), or WebDataset pipe: commands.",
)
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
NUM_THREADS = setting(StreamConfig, "--num-threads", type=click.IntRange(min=1), help="DALI CPU threads.")
