"""``beit-data index``: a DALI ``.idx`` beside each shard, local or on object storage."""

from __future__ import annotations

import sys

from beit_common import BeitDataError, storage
from beit_data.progress import progress_bar
from beit_data.shard_index import StaleIndex, index_path, read_index, stale_index, write_index
from beit_data.shards import expand_shards
from pipelines.config import IndexConfig

__all__ = ["IndexConfig", "run_index"]

INDEX_WORKERS = 16  # shards scanned at once on object storage


def run_index(cfg: IndexConfig) -> dict:
    """Write a DALI ``.idx`` beside each shard of ``cfg.shards`` that has none (with ``overwrite``,
    beside every one), local or on object storage. The training order reads images by these
    offsets; without them each node scans the tar headers once.

    An index that is there is checked against its tar's headers (all of them in a local file,
    the last one in an object): one that no longer lists the tar's members (a tar written again
    since) is refused, after the missing ones are written, naming ``--overwrite``. Members whose names are not
    UTF-8 are left out of the index, with a line on stderr; tokenize lists them as rejects.

    Returns:
        ``{"shards": N, "written": [...], "skipped": M}``.

    Raises:
        BeitDataError: For a shard that is not a tar, or indexes that are stale.
    """
    shards, overwrite, progress = expand_shards(cfg.shards), cfg.overwrite, cfg.progress
    if not all(s.seekable for s in shards):
        raise BeitDataError("pipe: shards cannot be indexed (they are read from the start only); index the files "
                            "or objects the commands read")
    bar = progress_bar(total=len(shards), desc="index", unit="shard", disable=not progress)
    left_out: list[str] = []
    stale: list[str] = []

    def one(shard) -> str | None:  # many shards at once on object storage: each scan waits on requests
        done = None
        if overwrite or not storage.exists(index_path(shard)):
            done = str(write_index(shard, lambda key, reason: left_out.append(f"{shard.name}: {reason}")))
        elif _stale(shard):
            stale.append(str(index_path(shard)))
        bar.update()
        return done

    written = [w for w in storage.map_concurrently(one, shards, workers=INDEX_WORKERS) if w is not None]
    bar.close()
    if left_out:
        print(f"index: left out samples whose member names are not UTF-8: {len(left_out)} (first: {left_out[0]})",
              file=sys.stderr)
    if stale:
        raise BeitDataError(f"{len(stale)} of the shards' indexes no longer list the members of their tars (first: "
                            f"{min(stale)}; the tars were written again); rebuild them: beit-data index --overwrite "
                            f"--shards '{cfg.shards}'")
    return {"shards": len(shards), "written": written, "skipped": len(shards) - len(written)}


def _stale(shard) -> bool:
    """Whether the index beside ``shard`` no longer lists its members: each member against the tar
    headers where they are cheap to read (a local file), else the last one (``read_index``)."""
    if storage.scan_is_cheap(shard):
        return stale_index(shard) is not None
    try:
        read_index(shard)
    except StaleIndex:
        return True
    return False
