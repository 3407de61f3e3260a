"""WebDataset shards: shard specs, the member rule, and their samples read in tar order.

A sample is the run of tar members that share a key, the part of the member's base name
before its first dot (the WebDataset and DALI rule). The image member is one of
``IMAGE_EXTS``; ``cls``, ``json`` and ``txt`` members are optional. img2dataset output
(``KEY.jpg``/``KEY.txt``/``KEY.json`` with ``.parquet`` and ``_stats.json`` beside the tars)
reads as it is. A key names one image: ``duplicate_keys`` finds the keys that do not.
Where each sample lies in its shard (the DALI ``.idx`` index) and a shard's fingerprint are
``beit_data.shard_index``'s.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple, Sequence

from beit_common import BeitDataError, Location, storage
from beit_common.listing import expand

__all__ = ["IMAGE_EXTS", "Sample", "Reject", "Member", "IndexedSample", "expand_shards", "split_key", "member_key",
           "sample_members", "is_utf8", "escaped_name", "iter_samples", "iter_images", "duplicate_keys",
           "duplicate_reason", "without_duplicates", "SHARDS_REPORT", "REJECTS_REPORT", "check_finished_folders"]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SHARDS_REPORT, REJECTS_REPORT = "shards.json", "rejects.json"  # what ``beit-data shards`` writes beside its shards


@dataclass
class Sample:
    """One WebDataset sample: its key and its members' bytes by extension."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)

    @property
    def image_ext(self) -> str | None:
        return next((e for e in IMAGE_EXTS if e in self.members), None)

    @property
    def image(self) -> bytes | None:
        ext = self.image_ext
        return None if ext is None else self.members[ext]


@dataclass(frozen=True)
class Reject:
    """A sample, file or shard that was left out, and why."""

    key: str
    reason: str
    shard: str = ""

    def as_dict(self) -> dict:
        return {"shard": self.shard, "key": self.key, "reason": self.reason}


class Member(NamedTuple):
    offset: int  # of the member's data in the tar
    size: int
    name: str


@dataclass(frozen=True)
class IndexedSample:
    """Where one sample's members lie in its shard, by extension."""

    key: str
    members: dict[str, Member]

    @property
    def image_ext(self) -> str | None:
        return next((e for e in IMAGE_EXTS if e in self.members), None)


def expand_shards(spec: str | Sequence[str]) -> list[Location]:
    """Resolve a shard spec into an ordered list of existing ``.tar`` shards.

    Args:
        spec: A brace pattern (``data/train-{000000..000099}.tar``), a directory (every
            ``.tar`` in it), a glob, a plain path, or a sequence of these. Each may be an
            ``s3://``, ``gs://`` or ``http(s)://`` URL (a prefix ending in ``/`` or naming a
            folder is listed; HTTP servers cannot be listed), or a WebDataset ``pipe:`` command
            (``pipe:aws s3 cp s3://b/train-{000000..000009}.tar -``), read from the start only.

    Raises:
        BeitDataError: If a named shard does not exist or the spec matches nothing.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    paths = [shard for item in specs for shard in expand(str(item), ".tar", "shard")]
    if not paths:
        raise BeitDataError(f"shard spec matches no .tar files: {' '.join(map(str, specs))}")
    return list(dict.fromkeys(paths))


def check_finished_folders(shards: Sequence[Location]) -> None:
    """Refuse shards from a local folder that a ``beit-data shards`` run began and did not finish.

    That run moves its ``rejects.json`` in first and its ``shards.json`` last (and moves an
    earlier run's out in the other order), so a folder holding the one without the other may
    hold part of a set. Folders on object storage are not checked (``shards`` writes local ones).

    Raises:
        BeitDataError: Naming the folder and the fix.
    """
    for folder in sorted({path.parent for s in shards if (path := s.local_path()) is not None}):
        if (folder / REJECTS_REPORT).is_file() and not (folder / SHARDS_REPORT).is_file():
            raise BeitDataError(f"{folder} has the {REJECTS_REPORT} of a beit-data shards run but no {SHARDS_REPORT}: "
                                "that run did not finish, and its shards may be part of the set; run beit-data "
                                "shards into it again with --overwrite")


def split_key(name: str) -> tuple[str, str]:
    """Split a member name into (key, extension) at the first dot of its base name."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :].lower()


def member_key(info: tarfile.TarInfo) -> tuple[str, str] | None:
    """``(key, ext)`` of a tar member that belongs to a sample, or ``None`` for one that does not.

    The one rule for every reader: regular files with UTF-8 names only, and no hidden files or
    WebDataset ``__meta__`` members.
    """
    if not info.isreg() or not is_utf8(info.name):
        return None
    key, ext = split_key(info.name)
    if not key or key.endswith("/") or "/__" in f"/{key}":
        return None
    return key, ext


def sample_members(tar: tarfile.TarFile, reject: Callable[[str, str], None] | None = None
                   ) -> Iterator[tuple[str, str, tarfile.TarInfo]]:
    """``(key, ext, info)`` for each member of ``tar`` that belongs to a sample, in tar order.

    A member whose name is not UTF-8 belongs to none: no key, token file or ``.idx`` can hold
    its name. With ``reject``, each run of such members is reported once as ``reject(key, reason)``,
    the key escaped (``caf\\xe9``).
    """
    last_bad = None
    for info in tar:
        found = member_key(info)
        if found is not None:
            yield (*found, info)
        elif reject is not None and info.isreg() and not is_utf8(info.name):
            name = escaped_name(info.name)
            if split_key(name)[0] != last_bad:
                last_bad = split_key(name)[0]
                reject(last_bad, f"member name {name} is not UTF-8 (other bytes shown as \\xNN); rename it in UTF-8")


def is_utf8(name: str) -> bool:
    """Whether a member name came from UTF-8 bytes: tarfile decodes other bytes to lone surrogates."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def escaped_name(name: str) -> str:
    """A member name that is not UTF-8, printable: its other bytes as ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def duplicate_keys(samples: Sequence[Sample | IndexedSample]) -> dict[str, int]:
    """Keys that name more than one sample, with how many: a key must name one image."""
    counts: dict[str, int] = {}
    for sample in samples:
        counts[sample.key] = counts.get(sample.key, 0) + 1
    return {k: n for k, n in counts.items() if n > 1}


def duplicate_reason(count: int) -> str:
    return f"duplicate key: {count} samples of the shard have it, and a key must name one image"


def iter_samples(shard: Location, rejects: list[Reject] | None = None,
                 index: list[IndexedSample] | None = None) -> Iterator[Sample]:
    """Yield the samples of one shard, in tar order, in one sequential read.

    Members with one key make one sample while they follow each other and none repeats; a key
    seen again later (or a member repeated) starts another sample under the same key, which
    ``duplicate_keys`` finds. A sample without an image member, or a tar cut off mid-member,
    does not raise: it is appended to ``rejects`` (when given) with its key and reason, and
    every complete sample before it is still yielded. With ``index``, each sample's members and
    their offsets are appended to it as they are read (what ``scan_index`` would give). A shard
    that cannot be opened (a missing object, a failing ``pipe:`` command) raises ``BeitDataError``.
    """
    shard_name = str(shard)
    current: Sample | None = None

    def reject(key: str, reason: str) -> None:
        if rejects is not None:
            rejects.append(Reject(key=key, reason=reason, shard=shard_name))

    def finish(sample: Sample) -> Iterator[Sample]:
        if sample.image_ext is None:
            found = ", ".join(sorted(sample.members)) or "nothing"
            reject(sample.key, f"no image member ({'/'.join(IMAGE_EXTS)}); found {found}")
        else:
            yield sample

    with storage.open_stream(shard) as f:
        try:
            with tarfile.open(fileobj=f, mode="r|*") as stream:
                for key, ext, info in sample_members(stream, reject):
                    # A member that repeats one of the sample's is another sample under the same key.
                    if current is not None and (current.key != key or ext in current.members):
                        yield from finish(current)
                        current = None
                    if current is None:
                        current = Sample(key=key)
                        if index is not None:
                            index.append(IndexedSample(key, {}))
                    current.members[ext] = stream.extractfile(info).read()
                    if index is not None:
                        index[-1].members[ext] = Member(info.offset_data, info.size, info.name)
        except (tarfile.TarError, OSError, EOFError) as exc:
            cut = current.key if current is not None else "<start>"
            if index is not None and current is not None:
                index.pop()
            reject(cut, f"tar cut off or unreadable at this sample: {exc}")
            return
    if current is not None:
        yield from finish(current)


def iter_images(shard: Location, rejects: list[Reject] | None = None, *, min_size: int = 1,
                index: list[IndexedSample] | None = None, max_pixels: int | None = None,
                batch_pixels: int | None = None):
    """Yield ``(sample, ImageInfo)`` for each sample of ``shard`` whose image passes the probe.

    Samples with no image, a damaged image, more than ``max_pixels`` (or ``batch_pixels``)
    pixels, or a side shorter than ``min_size`` pixels go to ``rejects`` with their reason.
    """
    from beit_data.images import ImageError, probe_image

    for sample in iter_samples(shard, rejects, index):
        try:
            info = probe_image(sample.image, max_pixels=max_pixels, batch_pixels=batch_pixels)
        except ImageError as exc:
            if rejects is not None:
                rejects.append(Reject(key=sample.key, reason=str(exc), shard=str(shard)))
            continue
        if min(info.width, info.height) < min_size:
            if rejects is not None:
                rejects.append(Reject(key=sample.key, shard=str(shard), reason=(
                    f"image too small: {info.width}x{info.height}, shorter side under {min_size}")))
            continue
        yield sample, info


def without_duplicates(shard, members: list, rows: list[dict], tokens, rejects: list[Reject]):
    """Rows, tokens and rejects with every sample of a key that names several samples rejected:
    which of them a key means cannot be known, so none is kept."""
    repeated = duplicate_keys(members)
    if not repeated:
        return rows, tokens, rejects
    keep = [i for i, row in enumerate(rows) if row["key"] not in repeated]
    rejects = [r for r in rejects if r.key not in repeated] + [
        Reject(key=key, reason=duplicate_reason(count), shard=str(shard))
        for key, count in sorted(repeated.items()) for _ in range(count)]
    return [rows[i] for i in keep], tokens[keep], rejects
