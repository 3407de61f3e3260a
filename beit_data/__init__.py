"""beit-data: precomputed visual-token targets and DALI loaders for fast BEiT pretraining."""

__version__ = "0.1.0"


class BeitDataError(Exception):
    """A user-facing error: bad input, a missing file, a refused overwrite.

    The CLI prints its message on one line and exits non-zero, without a traceback.
    """
