"""``beit-data index``: a DALI ``.idx`` beside each shard, local or on object storage."""

from __future__ import annotations

from beit_common import BeitDataError, storage
from beit_data.progress import progress_bar
from beit_data.shard_index import index_path, write_index
from beit_data.shards import expand_shards
from pipelines.config import IndexConfig

__all__ = ["IndexConfig", "run_index"]

INDEX_WORKERS = 16  # shards scanned at once on object storage


def run_index(cfg: IndexConfig) -> dict:
    """Write a DALI ``.idx`` beside each shard of ``cfg.shards`` that has none (with ``overwrite``,
    beside every one), local or on object storage. The training order reads images by these
    offsets; without them each node scans the tar headers once.

    Returns:
        ``{"shards": N, "written": [...], "skipped": M}``.
    """
    shards, overwrite, progress = expand_shards(cfg.shards), cfg.overwrite, cfg.progress
    if not all(s.seekable for s in shards):
        raise BeitDataError("pipe: shards cannot be indexed (they are read from the start only); index the files "
                            "or objects the commands read")
    bar = progress_bar(total=len(shards), desc="index", unit="shard", disable=not progress)

    def one(shard) -> str | None:  # many shards at once on object storage: each scan waits on requests
        done = None
        if overwrite or not storage.exists(index_path(shard)):
            done = str(write_index(shard))
        bar.update()
        return done

    written = [w for w in storage.map_concurrently(one, shards, workers=INDEX_WORKERS) if w is not None]
    bar.close()
    return {"shards": len(shards), "written": written, "skipped": len(shards) - len(written)}
