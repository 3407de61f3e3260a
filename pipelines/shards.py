"""``beit-data shards``: write WebDataset shards (and DALI indexes) from image files or Parquet
image datasets (what is read: ``pipelines.shard_sources``), and a held-out set beside them.

A run replaces its output folders whole or not at all: it is written into a hidden folder
inside each and swapped in when complete (``_Output``), so a failure leaves an earlier run
where it was, and nothing where there was none."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

import webdataset as wds

from beit_common import BeitDataError, Location, ensure_writable_dir, folder_lock, output_location, write_text_atomic
from beit_data.images import ImageError
from beit_data.progress import progress_bar
from beit_data.shard_index import write_index
from beit_data.shards import REJECTS_REPORT, SHARDS_REPORT, Reject
from pipelines.config import ShardsConfig
from pipelines.shard_sources import (
    Item,
    ListedImage,
    class_map_digest,
    collect_images,
    held_out,
    load_class_map,
    open_source,
    read_image,
    write_order,
)

__all__ = ["ShardsConfig", "ShardsResult", "ListedImage", "collect_images", "write_order", "run_shards",
           "load_class_map", "class_map_digest"]

@dataclass
class ShardsResult:
    """What ``run_shards`` wrote."""

    images: int = 0
    shards: list[Path] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    shuffled: bool = False
    seed: int = 0
    holdout: ShardsResult | None = None  # the held-out set, with ``holdout_per_class``
    warnings: list[str] = field(default_factory=list)  # what the run did otherwise than asked

    def summary(self) -> dict:
        summary = {"images": self.images, "shards": len(self.shards), "rejects": len(self.rejects),
                   "shuffled": self.shuffled}
        if self.holdout is not None:
            summary.update(holdout_images=self.holdout.images, holdout_shards=len(self.holdout.shards))
        return summary


def _sample(key: str, item: Item, data: bytes, ext: str, class_index: dict[str, int], digest: str) -> dict:
    """One WebDataset sample: the image, its ``.json`` provenance and, with a class, its ``.cls``
    and class name, with the identity of the class map its id belongs to."""
    meta = {"source": item.source}
    sample = {"__key__": key, ext: data}
    if item.cls is not None:
        meta.update({"class": item.cls, "class_map": digest})
        sample["cls"] = str(class_index[item.cls]).encode()
    sample["json"] = json.dumps(meta).encode()
    return sample


def _write_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1))


def _write_reports(out: Path, result: ShardsResult) -> None:
    """``classes.json`` (trees only), ``rejects.json`` and ``shards.json``, each written atomically."""
    if result.classes:
        _write_json(out / "classes.json", result.classes)
    _write_json(out / REJECTS_REPORT, [{"path": r.key, "reason": r.reason} for r in result.rejects])
    classes = {"classes": result.classes, "class_map": class_map_digest(result.classes)} if result.classes else {}
    _write_json(out / SHARDS_REPORT, {"shuffle": result.shuffled, "seed": result.seed, "images": result.images,
                                      "shards": [p.name for p in result.shards], **classes})


REPORTS = (SHARDS_REPORT, REJECTS_REPORT, "classes.json")
WORK = ".beit-data-shards"  # OUT/.beit-data-shards-PID: a run being written, swapped in when complete
EARLIER = "earlier"  # in the work folder: an earlier run's files while the new ones move in


def _is_ours(path: Path) -> bool:
    """A file a shards run writes: a shard, an index, a report, or an older version's temporary shard."""
    return path.suffix in (".tar", ".idx") or path.name in REPORTS or \
        (path.name.startswith(".") and path.name.endswith(".tar.tmp"))


def _move_in_order(name: str) -> tuple:
    """``rejects.json`` first and ``shards.json`` last: a folder caught between the two is an
    unfinished run, which tokenize refuses (``check_finished_folders``); indexes before shards."""
    return name == SHARDS_REPORT, name != REJECTS_REPORT, name.endswith(".tar"), name


def _move_aside_order(name: str) -> tuple:
    """``shards.json`` first and ``rejects.json`` last, for the same reason."""
    return name != SHARDS_REPORT, name == REJECTS_REPORT, name


def _open_shard(path: str) -> BinaryIO:
    return open(path, "wb")


class _Output:
    """One output folder, replaced whole or not at all.

    Checked before anything is written (``check``: no side effects). The run is written into
    a hidden work folder inside it: the same file system and permissions, and a folder that is
    a symbolic link or a mount point stays what it is. When every set is complete, ``commit``
    moves the earlier run's files aside into the work folder and the new ones in (each a
    rename); ``finish`` deletes the work folder and the earlier files with it. Until
    ``finish``, ``abort`` puts the folder back as it was.
    """

    def __init__(self, folder: Path, overwrite: bool):
        self.folder, self.overwrite = folder, overwrite
        self.work = folder / f"{WORK}-{os.getpid()}"
        self.earlier: list[str] = []
        self.made: list[Path] = []  # the folders this run created, deepest first
        self.moved: list[tuple[Path, Path]] = []  # (from, to), each rename of commit, in order

    def check(self) -> None:
        """Refuse a folder that is not empty, without ``overwrite``, or that holds anything no
        shards run wrote; a work folder a killed run left does not count.

        Raises:
            BeitDataError: Before anything is written.
        """
        present = sorted(p for p in self.folder.iterdir() if not p.name.startswith(WORK)) \
            if self.folder.is_dir() else []
        if not present:
            return
        if not self.overwrite:
            raise BeitDataError(f"{self.folder} is not empty ({len(present)} files, such as {present[0].name}): every "
                                f"--shards {self.folder} would read what is there too; pass `overwrite` to replace an "
                                "earlier shards run, or choose an empty folder")
        others = [p for p in present if not _is_ours(p)]
        if others:
            raise BeitDataError(f"{self.folder} holds {others[0].name}, which no shards run wrote; `overwrite` "
                                "replaces shards and their reports only: choose another folder")
        self.earlier = [p.name for p in present]

    def begin(self, stack: ExitStack) -> None:
        """Make the folder (proven writable) and the work folder, held for this run (a second run
        into the folder is refused); remove the work folders of killed runs."""
        missing = self.folder
        while not missing.exists() and missing.parent != missing:
            self.made.append(missing)
            missing = missing.parent
        ensure_writable_dir(self.folder)
        for stale in sorted(self.folder.glob(f"{WORK}-*")):
            with folder_lock(stale, "beit-data shards"):  # refused while the run writing it lives
                shutil.rmtree(stale)
        self.work.mkdir()
        stack.enter_context(folder_lock(self.work, "beit-data shards"))

    def commit(self) -> None:
        """Swap the new run in: the earlier files aside, the new ones in, each a rename.

        Raises:
            BeitDataError: When a rename fails; what was moved is moved back.
        """
        new = sorted((p.name for p in self.work.iterdir() if _is_ours(p)), key=_move_in_order)
        aside = self.work / EARLIER
        moves = [(self.folder / n, aside / n) for n in sorted(self.earlier, key=_move_aside_order)]
        moves += [(self.work / n, self.folder / n) for n in new]
        try:
            aside.mkdir()
            for source, target in moves:
                os.rename(source, target)
                self.moved.append((source, target))
        except OSError as exc:
            self.abort()
            raise BeitDataError(f"cannot move the new shards into {self.folder}: {exc.strerror or exc}; it holds "
                                "what it held before") from None

    def finish(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    def abort(self) -> None:
        """Undo ``commit`` as far as it went, delete the work folder, and the folders this run made."""
        for source, target in reversed(self.moved):
            with suppress(OSError):
                os.rename(target, source)
        self.moved = []
        shutil.rmtree(self.work, ignore_errors=True)
        for folder in self.made:
            with suppress(OSError):
                folder.rmdir()  # only while empty

    def in_message(self, text: str) -> str:
        """A message about a file in the work folder, naming its place in the folder instead."""
        return text.replace(str(self.work), str(self.folder))


class _ShardSet:
    """One folder of shards being written into its work folder, each shard's ``.idx`` written
    when the shard is complete (a set that gets no sample writes reports only)."""

    def __init__(self, output: _Output, config: ShardsConfig, prefix: str, classes: list[str]):
        self.output = output
        self.result = ShardsResult(classes=classes, shuffled=config.shuffle, seed=config.seed)
        self.in_shard, self.writer, self.file = 0, None, None
        self.pattern, self.maxcount = str(output.work / f"{prefix}-%06d.tar"), config.maxcount

    def _open(self, path: str) -> BinaryIO:
        self.file = _open_shard(path)
        return self.file

    def _finish(self, path: str) -> None:
        self.file.close()
        self.file = None
        if not self.in_shard:
            os.remove(path)
            return
        write_index(Location(path))
        self.result.shards.append(self.output.folder / Path(path).name)
        self.in_shard = 0

    def _failed(self, exc: OSError) -> BeitDataError:
        """A full disk or a lost folder, naming the shard being written."""
        name = Path(self.writer.fname).name if self.writer is not None and self.writer.fname else "a shard"
        return BeitDataError(f"cannot write {self.output.folder / name}: {exc.strerror or exc}")

    def write(self, sample: dict) -> None:
        try:
            if self.writer is None:  # opened with the first sample: a set that gets none leaves no file
                self.writer = wds.ShardWriter(self.pattern, maxcount=self.maxcount, verbose=0, post=self._finish,
                                              opener=self._open)
            self.writer.write(sample)
        except OSError as exc:
            raise self._failed(exc) from None
        self.result.images += 1
        self.in_shard += 1

    def close(self) -> ShardsResult:
        try:
            if self.writer is not None:
                self.writer.close()
        except OSError as exc:
            raise self._failed(exc) from None
        _write_reports(self.output.work, self.result)
        return self.result

    def abandon(self) -> None:
        """Drop the shard being written without flushing it (the disk may be full): tarfile's
        stream is marked closed, so that nothing writes it again when it is collected."""
        tar = getattr(self.writer, "tarstream", None)
        if tar is not None:
            tar.tarstream.fileobj.closed = True
            tar.tarstream.closed = True
        if self.file is not None:
            with suppress(OSError, ValueError):
                self.file.close()


def _outputs(config: ShardsConfig) -> tuple[_Output, _Output | None]:
    """The output folders, checked: where they are, that the held-out one is apart, that each
    is empty or holds an earlier shards run to replace (``overwrite``).

    Raises:
        BeitDataError: Before anything is written.
    """
    out = output_location(config.out, "shards", remote=False)
    folder = None
    if config.holdout_per_class:
        folder = output_location(config.holdout_out or f"{out}-holdout", "held-out shards", remote=False)
        if folder.resolve() == out.resolve() or out.resolve() in folder.resolve().parents:
            raise BeitDataError(f"`holdout_out` {folder} is in `out` {out}: the held-out shards need a folder of "
                                "their own, or every --shards OUT would read them too")
    outputs = (_Output(out, config.overwrite), _Output(folder, config.overwrite) if folder is not None else None)
    for output in filter(None, outputs):
        output.check()
    return outputs


def run_shards(config: ShardsConfig) -> ShardsResult:
    """Write every decodable image into shards, with a ``.idx`` beside each shard, and with
    ``holdout_per_class`` the held-out images into shards of their own (``result.holdout``).

    Images go in a seeded random order unless ``config.shuffle`` is off; keys count up in
    write order, over both sets (a key names one image of the run). Image bytes are stored
    unchanged. A file or row that is not a decodable JPEG, PNG or WebP is skipped and listed
    in ``rejects.json`` with its reason; every other image is written.

    Every setting and source is checked before anything is written. The run is written into a
    hidden folder inside each output folder and swapped in when it is complete (``_Output``):
    a failure (a damaged Parquet file, a full disk, an interrupt) leaves each folder as it
    was, an earlier run in it (``overwrite``) included.

    Raises:
        BeitDataError: For an output folder that is not empty (without ``overwrite``) or not
            local, a source without images or that lists a file twice, a failed write, or when
            every image was rejected (the reasons are in ``rejects.json`` then, where the
            folder held no earlier run, and no shard is left).
    """
    out, holdout = _outputs(config)
    source = open_source(config)
    if not source.labels:
        raise BeitDataError(f"no files in {', '.join(map(str, config.sources))}")
    chosen, warning = held_out(source.labels, config.holdout_per_class, config.seed) \
        if config.holdout_per_class else (set(), None)
    outputs = [o for o in (out, holdout) if o is not None]
    with ExitStack() as stack:
        try:
            for output in outputs:
                output.begin(stack)
            result = _write_sets(config, source, chosen, outputs)
            if not result.images and any(o.earlier for o in outputs):
                raise _all_rejected(result, out, kept=True)
            for output in outputs:
                output.commit()
        except BaseException as exc:
            for output in outputs:
                output.abort()
            if isinstance(exc, BeitDataError):
                raise BeitDataError(out.in_message(holdout.in_message(str(exc)) if holdout else str(exc))) from None
            raise
        for output in outputs:
            output.finish()
    if not result.images:
        raise _all_rejected(result, out, kept=False)
    result.warnings = [warning] if warning else []
    return result


def _write_sets(config: ShardsConfig, source, chosen: set[int], outputs: list[_Output]) -> ShardsResult:
    """Write the items into the work folders: the held-out ones (``chosen``) into the second."""
    sets = [_ShardSet(outputs[0], config, config.prefix, source.classes)]
    if len(outputs) > 1:
        sets.append(_ShardSet(outputs[1], config, "holdout", source.classes))
    class_index = {name: i for i, name in enumerate(source.classes)}
    digest, written = class_map_digest(source.classes), 0
    owed: dict = {}  # per class, held-out images rejected: the next ones of the class take their place
    try:
        for item in progress_bar(source.items, total=len(source.labels), desc="shards", unit="img",
                                 disable=not config.progress):
            held = item.index in chosen or owed.get(item.cls, 0) > 0
            target = sets[-1] if held else sets[0]
            try:
                data, ext = read_image(item.read(), config.max_pixels, config.min_size)
            except (OSError, ImageError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                target.result.rejects.append(Reject(key=item.where, reason=reason))
                if item.index in chosen:
                    owed[item.cls] = owed.get(item.cls, 0) + 1
                continue
            if held and item.index not in chosen:
                owed[item.cls] -= 1
            target.write(_sample(f"{written:09d}", item, data, ext, class_index, digest))
            written += 1
        result, *rest = [s.close() for s in sets]
    except BaseException:
        for s in sets:
            s.abandon()
        raise
    result.holdout = rest[0] if rest else None
    return result


def _all_rejected(result: ShardsResult, out: _Output, kept: bool) -> BeitDataError:
    first = result.rejects[0] if result.rejects else result.holdout.rejects[0]
    where = (f"the earlier shards in {out.folder} are kept; write into an empty folder for every reason in "
             "rejects.json") if kept else f"every reason is in {out.folder / REJECTS_REPORT}"
    return BeitDataError(f"no image was written: all {len(result.rejects)} files were rejected (first: {first.key}: "
                         f"{first.reason}); {where}")


def write_sample(out: Location, *, maxcount: int = 8, holdout: int = 0,
                 holdout_out: Location | None = None) -> Iterator[tuple[str, Path, ShardsResult]]:
    """The embedded photographs as shards in ``out``, the last ``holdout`` (by name) in
    ``holdout_out``: ``(prefix, folder, result)`` of each part as it is written."""
    import tempfile

    from beit_data.sample import sample_images, write_sample_list

    photos = sample_images()
    parts = [(out, photos[:len(photos) - holdout], "sample")]
    if holdout:
        parts.append((holdout_out, photos[len(photos) - holdout:], "holdout"))
    with tempfile.TemporaryDirectory() as tmp:
        for folder, chosen, prefix in parts:
            listing = write_sample_list(Location(f"{tmp}/{prefix}.txt"), chosen)
            yield prefix, Path(folder), run_shards(ShardsConfig(sources=[listing], out=folder, maxcount=maxcount,
                                                                prefix=prefix, progress=False))
