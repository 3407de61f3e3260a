"""beit-data's data side: shards, views, masking, DALI pipelines, the token format, the training stream."""

from beit_common import BeitDataError, __version__

__all__ = ["BeitDataError", "__version__"]
