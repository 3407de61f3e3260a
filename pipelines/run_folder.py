"""A pretrain run's folder: local, or a local mirror of an object-storage prefix, locked for the run.

A run writes its checkpoint and logs into a local folder. For an ``s3://`` or ``gs://`` ``out``,
that folder mirrors the prefix (``Mirror``): a resumed run downloads the checkpoint first (rank
0: the logs too), and rank 0 uploads what changed at every checkpoint, the checkpoint last. The
checkpoints a run keeps (``checkpoint_history``) stay on the prefix alone: the server copies
them there from the uploaded checkpoint, and no node downloads them.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator, Sequence

from beit_common import (
    LOCK_NAME,
    BeitDataError,
    Location,
    cache,
    ensure_writable_dir,
    folder_lock,
    remove_stale_temps,
    storage,
    write_atomic,
)
from beit_common.files import upload
from beit_common.location import inside
from pipelines.checkpoint import CHECKPOINT, checkpoint_path
from pipelines.checkpoint_history import KEPT
from pipelines.config import RuntimeConfig
from pipelines.runtime import DistInfo

__all__ = ["Mirror", "run_folder", "recorded_settings"]


class Mirror:
    """A local folder that stands for an object-storage prefix: a run writes (and appends to
    its logs) locally, and ``push`` uploads each file that changed since the last push, one
    whole object each. ``pull`` brings the prefix's files down first, for a resumed run.

    Args:
        url: The prefix.
        local: The folder that mirrors it.
        skip: Names never uploaded (locks, temporary files).
        remote: Folders of the prefix that stay there alone, never downloaded nor uploaded.
    """

    def __init__(self, url: Location, local: Path, skip: Sequence[str] = (), remote: Sequence[str] = ()):
        self.url = str(url).rstrip("/")
        self.local = local
        self.skip = set(skip)
        self.remote = set(remote)
        self._pushed: dict[str, tuple[int, int]] = {}

    def _files(self) -> list[Path]:
        return sorted(p for p in self.local.rglob("*") if p.is_file() and p.name not in self.skip
                      and not p.name.startswith(".") and not self._remote(self._name(p)))

    def _remote(self, name: str) -> bool:
        return name.split("/", 1)[0] in self.remote

    def reset(self) -> None:
        """Empty the local folder (left over from an earlier run of this prefix)."""
        import shutil

        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True, exist_ok=True)
        self._pushed.clear()

    def pull(self, names: Sequence[str] | None = None) -> None:
        """Download the prefix's files (or just ``names``), but its ``remote`` folders, into the
        empty local folder."""
        self.reset()
        if names is None:
            fs, path = storage.filesystem(self.url)
            with storage.remote_errors(self.url, "listing"):
                fs.invalidate_cache()
                names = [n[len(path.rstrip("/")) + 1:] for n in fs.find(path)]
            names = [n for n in names if not self._remote(n)]
        targets = [inside(self.local, name, self.url) for name in names]  # all checked before any is written
        for name, target in zip(names, targets):
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(target, lambda tmp, name=name: storage.download(f"{self.url}/{name}", tmp))
        self._pushed = {self._name(p): self._state(p) for p in self._files()}

    def _name(self, path: Path) -> str:
        return path.relative_to(self.local).as_posix()

    @staticmethod
    def _state(path: Path) -> tuple[int, int]:
        st = path.stat()
        return st.st_size, st.st_mtime_ns

    def push(self, last: Sequence[str] = ()) -> list[str]:
        """Upload the files that changed since the last push; ``last`` (the checkpoint) after
        the others. Returns the names uploaded."""
        files = self._files()
        files.sort(key=lambda p: p.name in last)
        sent = []
        for path in files:
            name, state = self._name(path), self._state(path)
            if self._pushed.get(name) != state:
                upload(path, f"{self.url}/{name}")
                self._pushed[name] = state
                sent.append(name)
        return sent


@contextmanager
def run_folder(cfg: RuntimeConfig, dist: DistInfo) -> Iterator[tuple[Path, Mirror | None]]:
    """The run folder, locked by rank 0 for the run; a new folder is removed again if the run
    fails before it holds anything.

    For an object-storage ``out``, each rank works in a local folder that mirrors the prefix
    (``Mirror``): a resumed run downloads the checkpoint first (rank 0: the logs too), and rank
    0 uploads what changed at every checkpoint, the checkpoint last.
    """
    target = cfg.out
    ckpt = checkpoint_path(target)
    has_checkpoint = storage.exists(ckpt)
    if has_checkpoint and not cfg.resume:
        raise BeitDataError(f"{cfg.out} already holds a run; pass `resume` to continue it or choose another `out`")
    if cfg.resume and not has_checkpoint:
        raise BeitDataError(f"`resume`: no checkpoint at {ckpt}")
    mirror, out = None, target.local_path()
    if out is None:
        ensure_writable_dir(target)
        mirror = Mirror(target, cache.cache_dir("runs", cache.cache_key(target), f"rank{dist.rank}"),
                        skip=(LOCK_NAME,), remote=(KEPT,))
        out = mirror.local
    created = not out.exists()
    ensure_writable_dir(out)
    try:
        # The lock first: a second run into the same out must not touch this one's mirror.
        with folder_lock(cfg.out, "beit-data pretrain") if dist.rank == 0 else nullcontext():
            if dist.rank == 0:
                remove_stale_temps(out)  # a checkpoint half-written when the last run was killed
                remove_stale_temps(out / KEPT)  # or half-copied to be kept
            if mirror is not None and not cfg.resume:
                mirror.reset()
            elif mirror is not None:
                mirror.pull(None if dist.rank == 0 else [CHECKPOINT])  # the other ranks need the checkpoint alone
            yield out, mirror
    except BaseException:
        if created and dist.rank == 0 and out.exists() and {p.name for p in out.iterdir()} <= {LOCK_NAME}:
            shutil.rmtree(out, ignore_errors=True)
        raise


def recorded_settings(out: Location) -> dict:
    """The settings a run folder's ``config.json`` records (``{}`` where it holds none): what a
    resumed run takes for every setting not given again. Lists read back as the tuples they were."""
    text = storage.read_text_if_there(out / "config.json")
    if text is None:
        return {}
    try:
        settings = json.loads(text)
    except json.JSONDecodeError:
        raise BeitDataError(f"{out / 'config.json'} is not JSON; give every setting again") from None
    if "total_warmup_steps" not in settings:  # written before it: `warmup_steps` holds the steps it came to
        settings.pop("warmup_steps", None)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}

