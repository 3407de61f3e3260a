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
import tarfile
from pathlib import Path
from typing import Callable

from beit_common import BeitDataError, Location, cache, storage, write_text_atomic
from beit_common.ranges import read_ranges
from beit_data.shards import (
    IndexedSample,
    Member,
    duplicate_keys,
    is_utf8,
    iter_samples,
    sample_members,
    split_key,
)

__all__ = ["INDEX_VERSION", "StaleIndex", "scan_index", "read_index", "stale_index", "index_count", "index_path",
           "write_index", "read_images", "shard_fingerprint", "check_fingerprint"]

INDEX_VERSION = "v1.2"


_REBUILD = "; rebuild it with beit-data index --overwrite"


class StaleIndex(BeitDataError):
    """A ``.idx`` that does not list the members of the tar beside it."""


def scan_index(shard: Location, reject: Callable[[str, str], None] | None = None) -> list[IndexedSample]:
    """The shard's samples from its tar headers; seeks past the member data, never reads it.

    A tar cut off mid-member gives the samples complete before the cut, as ``iter_samples``
    reads them. Members whose names are not UTF-8 are left out (``reject`` hears of them). An
    object is scanned by range requests once; the result is kept in the local cache
    (``$BEIT_DATA_CACHE/tar-index``) under its URL, ETag and size, so a changed object is
    scanned again.

    Raises:
        BeitDataError: For a file that is not a tar (an empty one included), naming it.
    """
    if not shard.seekable:
        raise BeitDataError(f"{shard}: a pipe: command cannot be indexed (it is read from the start only)")
    info = storage.stat(shard)
    cached = cache.cache_file(shard, info, "tar-index", ".idx")
    if cached is not None and cached.exists() and reject is None:
        return _parse_index(cached.read_text(), cached)
    size = info["size"]
    if size == 0:
        raise BeitDataError(f"{shard}: unreadable tar: it is empty (0 bytes); write it again or leave it out")
    samples: list[IndexedSample] = []
    with storage.remote_errors(shard, "scanning the tar headers"), storage.open_random(shard) as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except (tarfile.TarError, EOFError) as exc:
            raise BeitDataError(f"{shard}: unreadable tar: {exc}; write it again or leave it out") from None
        with tar:
            _scan_members(tar, size, samples, reject)
    if cached is not None and samples and not _unindexable(samples):
        write_text_atomic(cached, _index_text(samples))
    return samples


def _scan_members(tar: tarfile.TarFile, size: int, samples: list[IndexedSample], reject) -> None:
    """Append the complete samples of ``tar`` (``size`` bytes) to ``samples``, from its headers."""
    try:
        for key, ext, info in sample_members(tar, reject):
            new = not samples or samples[-1].key != key or ext in samples[-1].members
            if info.offset_data + _padded(info.size) > size:
                if not new:  # the sample is cut off: tokenize's sequential read leaves it out too
                    samples.pop()
                return
            if new:
                samples.append(IndexedSample(key, {}))
            samples[-1].members[ext] = Member(info.offset_data, info.size, info.name)
    except (tarfile.TarError, EOFError):
        pass  # a damaged header after the complete members


def _padded(size: int) -> int:
    """A member's data with the padding to the next 512-byte block, as a sequential read needs it."""
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


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
        raise BeitDataError(f"{idx} is not a DALI index (wds2idx {INDEX_VERSION}){_REBUILD}") from None
    if version != INDEX_VERSION or int(count) != listed:
        raise BeitDataError(f"{idx} is not a complete DALI index (wds2idx {INDEX_VERSION}): header {lines[0]!r}, "
                            f"{len(samples)} samples{_REBUILD}")
    return samples


def read_index(shard: Location) -> list[IndexedSample]:
    """The shard's samples and member offsets, from its ``.idx`` where there is one, else its tar headers."""
    if not shard.seekable:  # no index beside a command: one read of the whole stream
        index: list[IndexedSample] = []
        for _ in iter_samples(shard, index=index):
            pass
        return index
    listed = _listed_index(shard)
    if listed is not None:
        _check_headers(shard, listed)
        return listed
    try:
        return scan_index(shard)
    except (tarfile.TarError, OSError) as exc:
        raise BeitDataError(f"{shard}: unreadable tar: {exc}") from None


def _listed_index(shard: Location) -> list[IndexedSample] | None:
    """The samples the ``.idx`` beside ``shard`` lists, or ``None`` where it has none."""
    idx = index_path(shard)
    try:
        text = None if idx is None else storage.read_text_if_there(idx)
    except UnicodeDecodeError:
        raise BeitDataError(f"{idx} is not a DALI index (wds2idx {INDEX_VERSION}): it is binary{_REBUILD}") from None
    return None if text is None else _parse_index(text, idx)


def _check_headers(shard: Location, listed: list[IndexedSample]) -> None:
    """Refuse an index that does not agree with its tar where a few images lie: the tar header
    before the image data of the first, middle and last samples (three 512-byte reads at once).
    A tar written again with other images gives them other sizes, so a stale index seldom
    passes; ``stale_index`` compares every member.

    Raises:
        StaleIndex: Naming the index and ``beit-data index --overwrite``.
    """
    picked = {id(s): s for s in (listed[0], listed[len(listed) // 2], listed[-1])} if listed else {}
    members = [s.members[s.image_ext or next(iter(s.members))] for s in picked.values() if s.members]
    size = storage.stat(shard, fresh=False)["size"] if members else 0
    if any(m.offset < tarfile.BLOCKSIZE or m.offset + m.size > size for m in members):
        raise _stale(shard)
    blocks = read_ranges(shard, [(m.offset - tarfile.BLOCKSIZE, tarfile.BLOCKSIZE) for m in members])
    for member, block in zip(members, blocks):
        try:
            header = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError:
            raise _stale(shard) from None
        # A name longer than its header's field is cut there, maybe inside a character: a prefix is enough.
        if header.size != member.size or (is_utf8(header.name) and not member.name.startswith(header.name)):
            raise _stale(shard)


def _stale(shard: Location) -> StaleIndex:
    return StaleIndex(f"{index_path(shard)} does not list the members of {shard} (the tar was written again after it "
                      f"was indexed); rebuild it: beit-data index --overwrite --shards {shard}")


def stale_index(shard: Location, members: list[IndexedSample] | None = None) -> StaleIndex | None:
    """The error for a ``.idx`` that does not list the members of the tar beside it (a stale index
    beside a tar written again), or ``None``.

    The index is compared with what ``beit-data index --overwrite`` would write (the tar headers):
    after that, this never finds it stale, so its advice cannot loop. Where ``members`` (a read
    of the whole tar) agrees with the index, the headers are not scanned.
    """
    if not shard.seekable:
        return None
    listed = _listed_index(shard)
    if listed is None or (members is not None and _members_digest(listed) == _members_digest(members)):
        return None
    if _members_digest(listed) == _members_digest(scan_index(shard)):
        return None
    return _stale(shard)


def read_images(samples: list[tuple[Location, str]]) -> dict[tuple[Location, str], bytes]:
    """The image of each ``(shard, key)`` that has one, read by its offset in its shard (one range
    request per image for an object, all of a shard's at once; a ``pipe:`` shard is read through)."""
    out: dict[tuple[Location, str], bytes] = {}
    for shard in dict.fromkeys(s for s, _ in samples):
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


def shard_fingerprint(shard: Location, index: list[IndexedSample] | None = None, *,
                      size: int | None = None) -> dict:
    """A cheap identity of a shard's contents, recorded in its token file.

    Its size in bytes and a sha256 over every member's name, offset and size, taken from the
    ``.idx`` (or the tar headers), never from the images: one ``stat`` and one index read per
    shard. A shard rewritten in another order, or with other images, gets another one. A
    ``pipe:`` shard passes the ``index`` and ``size`` its one sequential read found.
    """
    digest = _members_digest(read_index(shard) if index is None else index)
    if size is None and shard.seekable:  # a pipe: command's size is not known
        size = storage.stat(shard)["size"]
    return {"bytes": size, "members": digest}


def _members_digest(samples: list[IndexedSample]) -> str:
    digest = hashlib.sha256()
    for sample in samples:
        for member in sample.members.values():
            digest.update(f"{member.name} {member.offset} {member.size}\n".encode())
    return digest.hexdigest()


def check_fingerprint(shard: Location, recorded: dict | None, token_file: Location, *,
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
        StaleIndex: Where the members differ because the shard's ``.idx`` is stale (the fix is
            ``beit-data index --overwrite``, not tokenizing again).
        BeitDataError: Naming the shard and the token file.
    """
    hint = f"; tokenize it again (overwrite) so that {token_file.name} matches it"
    if not recorded:
        raise BeitDataError(f"{token_file} records no fingerprint of its shard (made by an older beit-data){hint}")
    if not shard.seekable and index is None:
        return
    if size is None and shard.seekable:
        size = storage.stat(shard, fresh=full)["size"]
    if size is not None and recorded["bytes"] is not None and size != recorded["bytes"]:
        changed = f"{shard} has changed since it was tokenized ({size} bytes, {recorded['bytes']} then)"
        if stale_index(shard) is not None:  # the index first: tokenize refuses a shard whose .idx is stale
            raise StaleIndex(f"{changed}, and {index_path(shard).name} no longer lists its members: run beit-data "
                             f"index --overwrite --shards {shard}, then{hint[1:]}")
        raise BeitDataError(changed + hint)
    idx = index_path(shard)
    if (full or index is not None or (idx is not None and storage.exists(idx))) and \
            shard_fingerprint(shard, index, size=size)["members"] != recorded["members"]:
        raise stale_index(shard) or BeitDataError(f"{shard} has changed since it was tokenized (its members "
                                                  f"differ){hint}")


def index_count(shard: Location) -> int | None:
    """The sample count in the shard's ``.idx`` header (its first bytes), or ``None`` without an index."""
    idx = index_path(shard)
    try:
        text = None if idx is None else storage.read_text_if_there(idx, limit=64)
    except UnicodeDecodeError:
        return None
    header = (text or "").split("\n")[0].split()
    return int(header[1]) if len(header) == 2 and header[1].isdigit() else None


def index_path(shard: Location) -> Location | None:
    """The DALI index that belongs beside a shard: ``x.tar`` -> ``x.idx`` (``None`` for ``pipe:``)."""
    return shard.sibling(".idx")


def _unindexable(samples: list[IndexedSample]) -> str | None:
    """The first member name an index line cannot hold: its fields are separated by white space."""
    return next((m.name for s in samples for m in s.members.values() if len(m.name.split()) != 1), None)


def _index_text(samples: list[IndexedSample]) -> str:
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for sample in samples:
        lines.append(" ".join(f"{ext} {m.offset} {m.size} {m.name}" for ext, m in sample.members.items()))
    return "\n".join(lines) + "\n"


def write_index(shard: Location, reject: Callable[[str, str], None] | None = None) -> Location:
    """Write the DALI ``wds2idx`` (format v1.2) index beside ``shard`` (a file or an object), atomically.

    Each line after the header lists, for one sample, ``ext offset size name`` per member,
    where ``offset`` is the byte offset of the member's data. Members whose names are not
    UTF-8 are left out, as every reader leaves them out (``reject`` hears of them).
    """
    samples = scan_index(shard, reject)
    if not samples:
        raise BeitDataError(f"{shard}: no sample to index (a tar without members, or only members every reader "
                            "leaves out); write it again or leave it out")
    bad = _unindexable(samples)
    if bad is not None:
        raise BeitDataError(f"{shard}: member {bad!r} has white space in its name, which a DALI index cannot hold; "
                            "rename the members (beit-data reads the shard from its tar headers meanwhile)")
    return write_text_atomic(index_path(shard), _index_text(samples))


