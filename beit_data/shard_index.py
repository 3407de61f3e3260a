"""Where each sample lies in its shard, and what identifies a shard's contents.

The DALI ``.idx`` index (wds2idx format v1.2) lists, for each sample, ``ext offset size name``
per member, ``offset`` being that of the member's data in the tar. It is read where it is
beside the shard, else the tar headers are scanned (never the member data; an object's scan
is cached under its URL, ETag and size). ``read_images`` reads images by those offsets, and a
shard's fingerprint (its size and a hash of its members' names, offsets and sizes), recorded in
its token file, tells a shard rewritten since it was tokenized.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path

from beit_common import BeitDataError, Location, cache, storage, write_text_atomic
from beit_common.ranges import read_ranges
from beit_data.shards import IndexedSample, Member, duplicate_keys, iter_samples, sample_members, split_key

__all__ = ["INDEX_VERSION", "scan_index", "read_index", "index_count", "index_path", "write_index", "read_images",
           "shard_fingerprint", "check_fingerprint"]

INDEX_VERSION = "v1.2"


def scan_index(shard: str | os.PathLike) -> list[IndexedSample]:
    """The shard's samples from its tar headers; seeks past the member data, never reads it.

    A tar cut off mid-member gives the members before the cut, as ``iter_samples`` reads them.
    An object is scanned by range requests once; the result is kept in the local cache
    (``$BEIT_DATA_CACHE/tar-index``) under its URL, ETag and size, so a changed object is
    scanned again.
    """
    shard = Location(shard)
    if not shard.seekable:
        raise BeitDataError(f"{shard}: a pipe: command cannot be indexed (it is read from the start only)")
    info = storage.stat(shard)
    cached = cache.cache_file(shard, info, "tar-index", ".idx")
    if cached is not None and cached.exists():
        return _parse_index(cached.read_text(), cached)
    size = info["size"]
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


def read_index(shard: str | os.PathLike) -> list[IndexedSample]:
    """The shard's samples and member offsets, from its ``.idx`` where there is one, else its tar headers."""
    shard = Location(shard)
    if not shard.seekable:  # no index beside a command: one read of the whole stream
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


def read_images(samples: list[tuple[Location, str]]) -> dict[tuple[Location, str], bytes]:
    """The image of each ``(shard, key)`` that has one, read by its offset in its shard (one range
    request per image for an object, all of a shard's at once; a ``pipe:`` shard is read through)."""
    out: dict[tuple[Location, str], bytes] = {}
    for shard in dict.fromkeys(Location(s) for s, _ in samples):
        wanted = {k for s, k in samples if s == shard}
        if not shard.seekable:  # no random access: the stream, read once
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
        data = read_ranges(shard, [(m.offset, m.size) for _, m in found])
        out.update(((shard, key), d) for (key, _), d in zip(found, data))
    return out


def shard_fingerprint(shard: str | os.PathLike, index: list[IndexedSample] | None = None, *,
                      size: int | None = None) -> dict:
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
    if size is None and Location(shard).seekable:  # a pipe: command's size is not known
        size = storage.stat(shard)["size"]
    return {"bytes": size, "members": digest.hexdigest()}


def check_fingerprint(shard: str | os.PathLike, recorded: dict | None, token_file: str | os.PathLike, *,
                      full: bool = True,
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
    shard = Location(shard)
    hint = f"; tokenize it again (overwrite) so that {Location(token_file).name} matches it"
    if not recorded:
        raise BeitDataError(f"{token_file} records no fingerprint of its shard (made by an older beit-data){hint}")
    if not shard.seekable and index is None:
        return
    if size is None and shard.seekable:
        size = storage.stat(shard, fresh=full)["size"]
    if size is not None and recorded["bytes"] is not None and size != recorded["bytes"]:
        raise BeitDataError(f"{shard} has changed since it was tokenized ({size} bytes, "
                            f"{recorded['bytes']} then){hint}")
    idx = index_path(shard)
    if (full or index is not None or (idx is not None and storage.exists(idx))) and \
            shard_fingerprint(shard, index, size=size)["members"] != recorded["members"]:
        raise BeitDataError(f"{shard} has changed since it was tokenized (its members differ){hint}")


def index_count(shard: str | os.PathLike) -> int | None:
    """The sample count in the shard's ``.idx`` header (its first bytes), or ``None`` without an index."""
    idx = index_path(shard)
    try:
        text = None if idx is None else storage.read_text_if_there(idx, limit=64)
    except UnicodeDecodeError:
        return None
    header = (text or "").split("\n")[0].split()
    return int(header[1]) if len(header) == 2 and header[1].isdigit() else None


def index_path(shard: str | os.PathLike) -> Location | None:
    """The DALI index that belongs beside a shard: ``x.tar`` -> ``x.idx`` (``None`` for ``pipe:``)."""
    return Location(shard).sibling(".idx")


def _unindexable(samples: list[IndexedSample]) -> str | None:
    """The first member name an index line cannot hold: its fields are separated by white space."""
    return next((m.name for s in samples for m in s.members.values() if len(m.name.split()) != 1), None)


def _index_text(samples: list[IndexedSample]) -> str:
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for sample in samples:
        lines.append(" ".join(f"{ext} {m.offset} {m.size} {m.name}" for ext, m in sample.members.items()))
    return "\n".join(lines) + "\n"


def write_index(shard: str | os.PathLike) -> Location:
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


