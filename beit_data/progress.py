"""Progress bars that suit both a terminal and a log file."""

from __future__ import annotations

import sys

__all__ = ["progress_bar"]


def progress_bar(iterable=None, **kwargs):
    """tqdm that redraws often on a terminal and every 30 s into a log file or CI output."""
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(iterable, mininterval=0.5 if interactive else 30.0, dynamic_ncols=interactive, **kwargs)
