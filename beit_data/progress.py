"""Progress bars that suit both a terminal and a log file.

On a terminal, tqdm redraws its bar in place. Into a file, a pipe or a cluster's job log, each
update is one plain line instead (tqdm's redraws are ``\\r`` overwrites, which a file keeps
as one ever-growing line), every 30 s.
"""

from __future__ import annotations

import sys

__all__ = ["progress_bar", "PlainLines"]


class PlainLines:
    """A file for tqdm that writes each redraw as one plain line, and nothing for a bare newline."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").replace("\x1b[A", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable=None, **kwargs):
    """tqdm that redraws often on a terminal and writes a plain line every 30 s elsewhere."""
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    if interactive:
        return tqdm(iterable, mininterval=0.5, dynamic_ncols=True, **kwargs)
    # tqdm's monitor thread would redraw a slow bar every maxinterval (10 s): not into a log.
    return tqdm(iterable, mininterval=30.0, maxinterval=60.0, file=PlainLines(sys.stderr), **kwargs)
