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
from typing import Iterator, NamedTuple, Sequence, Union

from braceexpand import braceexpand

from beit_common import BeitDataError, storage, write_text_atomic

Shard = Union[Path, str]  # a local path, an object URL or a ``pipe:`` command

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
    "duplicate_keys",
    "duplicate_reason",
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


def expand_shards(spec: str | Sequence[str]) -> list[Shard]:
    """Resolve a shard spec into an ordered list of existing ``.tar`` shards.

    Args:
        spec: A brace pattern (``data/train-{000000..000099}.tar``), a directory (every
            ``.tar`` in it), a glob, a plain path, or a sequence of these. Each may be an
            ``s3://``, ``gs://`` or ``http(s)://`` URL (a prefix ending in ``/`` or naming a
            folder is listed; HTTP servers cannot be listed), or a WebDataset ``pipe:`` command
            (``pipe:aws s3 cp s3://b/train-{000000..000009}.tar -``), read from the start only.

    Returns:
        Local shards as ``Path``, URLs and ``pipe:`` commands as strings.

    Raises:
        BeitDataError: If a named shard does not exist or the spec matches nothing.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    paths: list[Shard] = []
    listings: dict[str, set[str]] = {}
    for item in map(str, specs):
        if storage.is_pipe(item):
            paths += list(braceexpand(item))
            continue
        if storage.is_url(item):
            paths += _expand_url(item, listings)
            continue
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
    seen: set = set()
    return [p for p in paths if not (p in seen or seen.add(p))]


def _expand_url(item: str, listings: dict[str, set[str]]) -> list[str]:
    """One URL spec's shards: each prefix is listed once, and named shards are checked against it."""
    http = item.lower().startswith("http")
    magic = "*[" if http else "*?["  # an HTTP URL's ? starts its query (a presigned URL's signature)
    if not any(c in item for c in "{" + magic) and storage.is_prefix(item):
        return storage.list_files(item.rstrip("/") + "/", ".tar")
    found = []
    for expanded in braceexpand(item):
        if any(c in expanded.partition("://")[2] for c in magic):
            found += storage.glob(expanded)
            continue
        parent = expanded.rsplit("/", 1)[0]
        if http:  # no listing over HTTP: each is asked for on its own
            if not storage.exists(expanded):
                raise BeitDataError(f"shard not found: {expanded}")
        else:
            if parent not in listings:
                listings[parent] = set(storage.list_files(parent + "/", ""))
            if expanded not in listings[parent]:
                raise BeitDataError(f"shard not found: {expanded}")
        found.append(expanded)
    return found


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


def scan_index(shard: Shard) -> list[IndexedSample]:
    """The shard's samples from its tar headers; seeks past the member data, never reads it.

    A tar cut off mid-member gives the members before the cut, as ``iter_samples`` reads them.
    An object is scanned by range requests once; the result is kept in the local cache
    (``$BEIT_DATA_CACHE/tar-index``) under its URL, ETag and size, so a changed object is
    scanned again.
    """
    if storage.is_pipe(shard):
        raise BeitDataError(f"{shard}: a pipe: command cannot be indexed (it is read from the start only)")
    cached = None
    if storage.is_url(shard):
        info = storage.stat(shard)
        cached = storage.cache_dir("tar-index") / f"{storage.cache_key(shard, info['etag'], info['size'])}.idx"
        if cached.exists():
            return _parse_index(cached.read_text(), cached)
        size = info["size"]
    else:
        size = os.path.getsize(shard)
    samples: list[IndexedSample] = []
    with storage.remote_errors(shard, "scanning the tar headers"), storage.open_random(shard) as f, \
            tarfile.open(fileobj=f, mode="r:") as tar:
        try:
            for key, ext, info in sample_members(tar):
                if info.offset_data + info.size > size:
                    break  # its data is cut off
                if not samples or samples[-1].key != key or ext in samples[-1].members:
                    samples.append(IndexedSample(key, {}))
                samples[-1].members[ext] = Member(info.offset_data, info.size, info.name)
        except (tarfile.TarError, EOFError):
            pass  # a damaged header after the complete members
    if cached is not None and samples and not _unindexable(samples):
        write_text_atomic(cached, _index_text(samples))
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


def read_index(shard: Shard) -> list[IndexedSample]:
    """The shard's samples and member offsets, from its ``.idx`` where there is one, else its tar headers."""
    if storage.is_pipe(shard):  # no index beside a command: one read of the whole stream
        index: list[IndexedSample] = []
        for _ in iter_samples(shard, index=index):
            pass
        return index
    idx = index_path(shard)
    try:
        text = storage.read_text_if_there(idx)
    except UnicodeDecodeError:
        raise BeitDataError(f"{idx} is not a DALI index (wds2idx {INDEX_VERSION}): it is binary") from None
    if text is not None:
        return _parse_index(text, idx)
    try:
        return scan_index(shard)
    except (tarfile.TarError, OSError) as exc:
        raise BeitDataError(f"{shard}: unreadable tar: {exc}") from None


def duplicate_keys(samples: Sequence[Sample | IndexedSample]) -> dict[str, int]:
    """Keys that name more than one sample, with how many: a key must name one image."""
    counts: dict[str, int] = {}
    for sample in samples:
        counts[sample.key] = counts.get(sample.key, 0) + 1
    return {k: n for k, n in counts.items() if n > 1}


def duplicate_reason(count: int) -> str:
    return f"duplicate key: {count} samples of the shard have it, and a key must name one image"


def read_images(samples: list[tuple[Shard, str]]) -> dict[tuple[Shard, str], bytes]:
    """The image of each ``(shard, key)`` that has one, read by its offset in its shard (one range
    request per image for an object, all of a shard's at once; a ``pipe:`` shard is read through)."""
    out: dict[tuple[Shard, str], bytes] = {}
    for shard in dict.fromkeys(s for s, _ in samples):
        wanted = {k for s, k in samples if s == shard}
        if storage.is_pipe(shard):  # no random access: the stream, read once
            out.update(((shard, s.key), s.image) for s in iter_samples(shard) if s.key in wanted and s.image)
            continue
        index = read_index(shard)
        repeated = {k: n for k, n in duplicate_keys(index).items() if k in wanted}
        if repeated:
            key = min(repeated)
            raise BeitDataError(f"{shard}: key {key} names {repeated[key]} samples; a key must name one image "
                                "(tokenize rejects such keys)")
        found = [(sample.key, sample.members[sample.image_ext]) for sample in index
                 if sample.key in wanted and sample.image_ext]
        data = storage.read_ranges(shard, [(m.offset, m.size) for _, m in found])
        out.update(((shard, key), d) for (key, _), d in zip(found, data))
    return out


def shard_fingerprint(shard: Shard, index: list[IndexedSample] | None = None, *, size: int | None = None) -> dict:
    """A cheap identity of a shard's contents, recorded in its token file.

    Its size in bytes and a sha256 over every member's name, offset and size, taken from the
    ``.idx`` (or the tar headers), never from the images: one ``stat`` and one index read per
    shard. A shard rewritten in another order, or with other images, gets another one. A
    ``pipe:`` shard passes the ``index`` and ``size`` its one sequential read found.
    """
    digest = hashlib.sha256()
    for sample in read_index(shard) if index is None else index:
        for member in sample.members.values():
            digest.update(f"{member.name} {member.offset} {member.size}\n".encode())
    if size is None and not storage.is_pipe(shard):  # a pipe: command's size is not known
        size = storage.stat(shard)["size"]
    return {"bytes": size, "members": digest.hexdigest()}


def check_fingerprint(shard: Shard, recorded: dict | None, token_file: str | Path, *, full: bool = True,
                      index: list[IndexedSample] | None = None, size: int | None = None) -> None:
    """Refuse a shard that is no longer the one its token file was made from.

    Args:
        recorded: The fingerprint in the token file's metadata.
        full: Compare the member hash too; otherwise only the size, and the hash where the
            shard has a ``.idx`` (the cheap check at the start of a run).
        index, size: What a sequential read of a ``pipe:`` shard found; such a shard is
            checked only with them (it cannot be asked for its size).

    Raises:
        BeitDataError: Naming the shard and the token file.
    """
    hint = f"; tokenize it again (overwrite) so that {storage.basename(token_file)} matches it"
    if not recorded:
        raise BeitDataError(f"{token_file} records no fingerprint of its shard (made by an older beit-data){hint}")
    pipe = storage.is_pipe(shard)
    if pipe and index is None:
        return
    if size is None and not pipe:
        size = storage.stat(shard, fresh=full)["size"]
    if size is not None and recorded["bytes"] is not None and size != recorded["bytes"]:
        raise BeitDataError(f"{shard} has changed since it was tokenized ({size} bytes, "
                            f"{recorded['bytes']} then){hint}")
    idx = index_path(shard)
    if (full or index is not None or (idx is not None and storage.exists(idx))) and \
            shard_fingerprint(shard, index, size=size)["members"] != recorded["members"]:
        raise BeitDataError(f"{shard} has changed since it was tokenized (its members differ){hint}")


def index_count(shard: Shard) -> int | None:
    """The sample count in the shard's ``.idx`` header (its first bytes), or ``None`` without an index."""
    idx = index_path(shard)
    try:
        text = None if idx is None else storage.read_text_if_there(idx, limit=64)
    except UnicodeDecodeError:
        return None
    header = (text or "").split("\n")[0].split()
    return int(header[1]) if len(header) == 2 and header[1].isdigit() else None


def iter_samples(shard: Shard, rejects: list[Reject] | None = None,
                 index: list[IndexedSample] | None = None) -> Iterator[Sample]:
    """Yield the samples of one shard, in tar order, in one sequential read.

    Members with one key make one sample while they follow each other and none repeats; a key
    seen again later (or a member repeated) starts another sample under the same key, which
    ``duplicate_keys`` finds. A sample without an image member, or a tar cut off mid-member,
    does not raise: it is appended to ``rejects`` (when given) with its key and reason, and
    every complete sample before it is still yielded. With ``index``, each sample's members and their offsets are
    appended to it as they are read (what ``scan_index`` would give). A shard that cannot be
    opened (a missing object, a failing ``pipe:`` command) raises ``BeitDataError``.
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
                for key, ext, info in sample_members(stream):
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


def index_path(shard: Shard) -> Path | str | None:
    """The DALI index that belongs beside a shard: ``x.tar`` -> ``x.idx`` (``None`` for ``pipe:``)."""
    return storage.sibling(shard, ".idx")


def _unindexable(samples: list[IndexedSample]) -> str | None:
    """The first member name an index line cannot hold: its fields are separated by white space."""
    return next((m.name for s in samples for m in s.members.values() if len(m.name.split()) != 1), None)


def _index_text(samples: list[IndexedSample]) -> str:
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for sample in samples:
        lines.append(" ".join(f"{ext} {m.offset} {m.size} {m.name}" for ext, m in sample.members.items()))
    return "\n".join(lines) + "\n"


def write_index(shard: Shard) -> Path | str:
    """Write the DALI ``wds2idx`` (format v1.2) index beside ``shard`` (a file or an object), atomically.

    Each line after the header lists, for one sample, ``ext offset size name`` per member,
    where ``offset`` is the byte offset of the member's data.
    """
    samples = scan_index(shard)
    if not samples:
        raise BeitDataError(f"shard has no members to index: {shard}")
    bad = _unindexable(samples)
    if bad is not None:
        raise BeitDataError(f"{shard}: member {bad!r} has white space in its name, which a DALI index cannot hold; "
                            "rename the members (beit-data reads the shard from its tar headers meanwhile)")
    return write_text_atomic(index_path(shard), _index_text(samples))


def iter_images(shard: Shard, rejects: list[Reject] | None = None, *, min_size: int = 1,
                index: list[IndexedSample] | None = None, max_pixels: int | None = None):
    """Yield ``(sample, ImageInfo)`` for each sample of ``shard`` whose image passes the probe.

    Samples with no image, a damaged image, more than ``max_pixels`` pixels, or a side shorter
    than ``min_size`` pixels go to ``rejects`` with their reason.
    """
    from beit_data.images import ImageError, probe_image

    for sample in iter_samples(shard, rejects, index):
        try:
            info = probe_image(sample.image, max_pixels=max_pixels)
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
