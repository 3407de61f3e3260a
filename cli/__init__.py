"""The ``beit-data`` command line: a thin click group over the ``pipelines`` stages.

Each command declares its options once, named as its config's settings: the options go to the
config through one mapping (``options.config_of``), the stage's ``run_*()`` runs it, and the
command prints its summary. torch and DALI are imported inside the commands, so
``beit-data --help`` is instant. The data commands are in ``cli.data``, the training ones in
``cli.train``.
"""

from __future__ import annotations

import os
import re

import click

# MKL picks kernels by memory alignment unless told not to, which moves the last bits of a
# float32 sum between runs; exact resume on the CPU compares losses bit for bit. It must be
# set before torch loads, which the commands do later.
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")

from beit_common import BeitDataError, __version__, os_error, redact  # noqa: E402

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


from cli import data, train  # noqa: E402, F401  (registers the commands)
