"""The ``beit-data`` command line: a thin click group over the ``pipelines`` stages.

Each command parses its options, builds its stage's config, calls ``run_*()`` and prints a
summary. torch and DALI are imported inside the commands, so ``beit-data --help`` is instant.
"""

from __future__ import annotations

import json
import sys

import click

from beit_data import BeitDataError, __version__

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

SHARDS_OPTION = click.option(
    "--shards", "shards", required=True,
    help="Shards: a brace pattern (data/train-{000000..000099}.tar), a directory or a glob.",
)
SEED_OPTION = click.option("--seed", type=int, default=0, show_default=True, help="Seed of every random choice.")
BATCH_OPTION = click.option("--batch-size", type=click.IntRange(min=1), show_default=True, default=64,
                            help="Images per batch.")
QUIET_OPTION = click.option("--quiet", is_flag=True, help="Hide progress bars.")


class Group(click.Group):
    """Turns a ``BeitDataError`` into a one-line message and a non-zero exit."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BeitDataError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=Group, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="beit-data")
def main():
    """beit-data: tokenize image shards once, then pretrain BEiT on precomputed targets."""


def echo_summary(title: str, summary: dict) -> None:
    click.echo(f"{title}: " + ", ".join(f"{k} {v}" for k, v in summary.items()))


@main.command(context_settings=CONTEXT)
@click.argument("sources", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the shards.")
@click.option("--maxcount", type=click.IntRange(min=1), default=10000, show_default=True,
              help="Images per shard.")
@click.option("--prefix", default="shard", show_default=True, help="Shard file-name prefix.")
@QUIET_OPTION
def shards(sources, out, maxcount, prefix, quiet):
    """Write WebDataset shards and DALI .idx files from image folders or path lists.

    Each SOURCE is a flat folder of images, an ImageFolder tree (class sub-folders become
    .cls members and classes.json) or a text file with one image path per line.
    """
    from pipelines.shards import ShardsConfig, run_shards

    result = run_shards(ShardsConfig(sources=sources, out=out, maxcount=maxcount, prefix=prefix,
                                     progress=not quiet))
    echo_summary("shards", result.summary())
    for reject in result.rejects:
        click.echo(f"  rejected {reject.key}: {reject.reason}", err=True)
    click.echo(f"wrote {out}")


@main.command(context_settings=CONTEXT)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the sample shards.")
@click.option("--maxcount", type=click.IntRange(min=1), default=8, show_default=True,
              help="Images per shard.")
def sample(out, maxcount):
    """Write the embedded sample of real photographs as WebDataset shards."""
    import tempfile

    from beit_data.sample import write_sample_list
    from pipelines.shards import ShardsConfig, run_shards

    with tempfile.TemporaryDirectory() as tmp:
        listing = write_sample_list(f"{tmp}/sample.txt")
        result = run_shards(ShardsConfig(sources=[listing], out=out, maxcount=maxcount,
                                         prefix="sample", progress=False))
    echo_summary("sample", result.summary())
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
