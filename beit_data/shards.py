"""WebDataset shards: resolving shard specs, reading samples, writing shards and DALI indexes.

A sample is the run of tar members that share a key, the part of the member's base name
before its first dot (the WebDataset and DALI rule). The image member is one of
``IMAGE_EXTS``; ``cls``, ``json`` and ``txt`` members are optional. img2dataset output
(``KEY.jpg``/``KEY.txt``/``KEY.json`` with ``.parquet`` and ``_stats.json`` beside the tars)
reads as it is.
"""

from __future__ import annotations

import glob
import hashlib
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

from braceexpand import braceexpand

from beit_common import BeitDataError, write_text_atomic

__all__ = [
    "IMAGE_EXTS",
    "Sample",
    "Reject",
    "expand_shards",
    "split_key",
    "iter_samples",
    "member_key",
    "Member",
    "IndexedSample",
    "scan_index",
    "read_index",
    "index_count",
    "shard_fingerprint",
    "check_fingerprint",
    "write_index",
    "index_path",
    "read_images",
    "iter_images",
]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
INDEX_VERSION = "v1.2"


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


def expand_shards(spec: str | Sequence[str]) -> list[Path]:
    """Resolve a shard spec into an ordered list of existing ``.tar`` paths.

    Args:
        spec: A brace pattern (``data/train-{000000..000099}.tar``), a directory (every
            ``.tar`` in it), a glob, a plain path, or a sequence of these.

    Raises:
        BeitDataError: If a named shard does not exist or the spec matches nothing.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    paths: list[Path] = []
    for item in map(str, specs):
        if os.path.isdir(item):
            paths += sorted(Path(item).glob("*.tar"))
            continue
        for expanded in braceexpand(item):
            if glob.has_magic(expanded):
                paths += sorted(Path(p) for p in glob.glob(expanded))
            elif os.path.isfile(expanded):
                paths.append(Path(expanded))
            else:
                raise BeitDataError(f"shard not found: {expanded}")
    if not paths:
        raise BeitDataError(f"shard spec matches no .tar files: {' '.join(map(str, specs))}")
    seen: set[Path] = set()
    return [p for p in paths if not (p in seen or seen.add(p))]


def split_key(name: str) -> tuple[str, str]:
    """Split a member name into (key, extension) at the first dot of its base name."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :].lower()


def member_key(info: tarfile.TarInfo) -> tuple[str, str] | None:
    """``(key, ext)`` of a tar member that belongs to a sample, or ``None`` for one that does not.

    The one rule for every reader: regular files only, and no hidden files or WebDataset
    ``__meta__`` members.
    """
    if not info.isreg():
        return None
    key, ext = split_key(info.name)
    if not key or key.endswith("/") or "/__" in f"/{key}":
        return None
    return key, ext


def sample_members(tar: tarfile.TarFile) -> Iterator[tuple[str, str, tarfile.TarInfo]]:
    """``(key, ext, info)`` for each member of ``tar`` that belongs to a sample, in tar order."""
    for info in tar:
        found = member_key(info)
        if found is not None:
            yield (*found, info)


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


def scan_index(shard: str | Path) -> list[IndexedSample]:
    """The shard's samples from its tar headers; seeks past the member data, never reads it.

    A tar cut off mid-member gives the members before the cut, as ``iter_samples`` reads them.
    """
    samples: list[IndexedSample] = []
    size = os.path.getsize(shard)
    with tarfile.open(shard, mode="r:") as tar:
        try:
            for key, ext, info in sample_members(tar):
                if info.offset_data + info.size > size:
                    break  # its data is cut off
                if not samples or samples[-1].key != key:
                    samples.append(IndexedSample(key, {}))
                samples[-1].members[ext] = Member(info.offset_data, info.size, info.name)
        except (tarfile.TarError, EOFError):
            pass  # a damaged header after the complete members
    return samples


def _parse_index(text: str, idx: Path) -> list[IndexedSample]:
    lines = text.splitlines()
    try:
        version, count = lines[0].split()
        samples, listed = [], 0
        for line in lines[1:]:
            fields = line.split()
            listed += 1
            key = split_key(fields[3])[0]
            if not key or key.endswith("/") or "/__" in f"/{key}":
                continue  # the member rule of every reader: no hidden or __meta__ members
            members = {ext: Member(int(off), int(size), name)
                       for ext, off, size, name in zip(fields[::4], fields[1::4], fields[2::4], fields[3::4])}
            samples.append(IndexedSample(key, members))
    except (IndexError, ValueError):
        raise BeitDataError(f"{idx} is not a DALI index (wds2idx {INDEX_VERSION})") from None
    if version != INDEX_VERSION or int(count) != listed:
        raise BeitDataError(f"{idx} is not a complete DALI index (wds2idx {INDEX_VERSION}): header {lines[0]!r}, "
                            f"{len(samples)} samples")
    return samples


def read_index(shard: str | Path) -> list[IndexedSample]:
    """The shard's samples and member offsets, from its ``.idx`` where there is one, else its tar headers."""
    idx = index_path(shard)
    if idx.exists():
        try:
            return _parse_index(idx.read_text(), idx)
        except UnicodeDecodeError:
            raise BeitDataError(f"{idx} is not a DALI index (wds2idx {INDEX_VERSION}): it is binary") from None
    try:
        return scan_index(shard)
    except (tarfile.TarError, OSError) as exc:
        raise BeitDataError(f"{shard}: unreadable tar: {exc}") from None


def read_images(samples: list[tuple[Path, str]]) -> dict[tuple[Path, str], bytes]:
    """The image of each ``(shard, key)`` that has one, read by its offset in its shard."""
    out: dict[tuple[Path, str], bytes] = {}
    for shard in dict.fromkeys(s for s, _ in samples):
        wanted = {k for s, k in samples if s == shard}
        with open(shard, "rb") as f:
            for sample in read_index(shard):
                if sample.key in wanted and sample.image_ext:
                    member = sample.members[sample.image_ext]
                    out[shard, sample.key] = os.pread(f.fileno(), member.size, member.offset)
    return out


def shard_fingerprint(shard: str | Path, index: list[IndexedSample] | None = None) -> dict:
    """A cheap identity of a shard's contents, recorded in its token file.

    Its size in bytes and a sha256 over every member's name, offset and size, taken from the
    ``.idx`` (or the tar headers), never from the images: one ``stat`` and one index read per
    shard. A shard rewritten in another order, or with other images, gets another one.
    """
    digest = hashlib.sha256()
    for sample in read_index(shard) if index is None else index:
        for member in sample.members.values():
            digest.update(f"{member.name} {member.offset} {member.size}\n".encode())
    return {"bytes": os.path.getsize(shard), "members": digest.hexdigest()}


def check_fingerprint(shard: str | Path, recorded: dict | None, token_file: str | Path, *, full: bool = True,
                      index: list[IndexedSample] | None = None) -> None:
    """Refuse a shard that is no longer the one its token file was made from.

    Args:
        recorded: The fingerprint in the token file's metadata.
        full: Compare the member hash too; otherwise only the size, and the hash where the
            shard has a ``.idx`` (the cheap check at the start of a run).

    Raises:
        BeitDataError: Naming the shard and the token file.
    """
    hint = f"; tokenize it again (overwrite) so that {Path(token_file).name} matches it"
    if not recorded:
        raise BeitDataError(f"{token_file} records no fingerprint of its shard (made by an older beit-data){hint}")
    size = os.path.getsize(shard)
    if size != recorded["bytes"]:
        raise BeitDataError(f"{shard} has changed since it was tokenized ({size} bytes, "
                            f"{recorded['bytes']} then){hint}")
    if (full or index is not None or index_path(shard).exists()) and \
            shard_fingerprint(shard, index)["members"] != recorded["members"]:
        raise BeitDataError(f"{shard} has changed since it was tokenized (its members differ){hint}")


def index_count(shard: str | Path) -> int | None:
    """The sample count in the shard's ``.idx`` header, or ``None`` without an index: reads one line."""
    idx = index_path(shard)
    if not idx.exists():
        return None
    with idx.open() as f:
        header = f.readline().split()
    return int(header[1]) if len(header) == 2 and header[1].isdigit() else None


def iter_samples(shard: str | Path, rejects: list[Reject] | None = None) -> Iterator[Sample]:
    """Yield the samples of one shard, in tar order.

    A sample without an image member, or a tar cut off mid-member, does not raise: it is
    appended to ``rejects`` (when given) with its key and reason, and every complete sample
    before it is still yielded.
    """
    shard = str(shard)
    current: Sample | None = None

    def reject(key: str, reason: str) -> None:
        if rejects is not None:
            rejects.append(Reject(key=key, reason=reason, shard=shard))

    def finish(sample: Sample) -> Iterator[Sample]:
        if sample.image_ext is None:
            found = ", ".join(sorted(sample.members)) or "nothing"
            reject(sample.key, f"no image member ({'/'.join(IMAGE_EXTS)}); found {found}")
        else:
            yield sample

    try:
        with tarfile.open(shard, mode="r|*") as stream:
            for key, ext, info in sample_members(stream):
                if current is not None and current.key != key:
                    yield from finish(current)
                    current = None
                if current is None:
                    current = Sample(key=key)
                current.members[ext] = stream.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        cut = current.key if current is not None else "<start>"
        reject(cut, f"tar cut off or unreadable at this sample: {exc}")
        return
    if current is not None:
        yield from finish(current)


def index_path(shard: str | Path) -> Path:
    """The DALI index path that belongs beside a shard: ``x.tar`` -> ``x.idx``."""
    return Path(shard).with_suffix(".idx")


def write_index(shard: str | Path) -> Path:
    """Write the DALI ``wds2idx`` (format v1.2) index beside ``shard``, atomically.

    Each line after the header lists, for one sample, ``ext offset size name`` per member,
    where ``offset`` is the byte offset of the member's data.
    """
    samples = scan_index(shard)
    if not samples:
        raise BeitDataError(f"shard has no members to index: {shard}")
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for sample in samples:
        lines.append(" ".join(f"{ext} {m.offset} {m.size} {m.name}" for ext, m in sample.members.items()))
    text = "\n".join(lines) + "\n"
    return write_text_atomic(index_path(shard), text)


def iter_images(shard: str | Path, rejects: list[Reject] | None = None, *, min_size: int = 1):
    """Yield ``(sample, ImageInfo)`` for each sample of ``shard`` whose image passes the probe.

    Samples with no image, a damaged image, or a side shorter than ``min_size`` pixels go to
    ``rejects`` with their reason.
    """
    from beit_data.images import ImageError, probe_image

    for sample in iter_samples(shard, rejects):
        try:
            info = probe_image(sample.image)
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
