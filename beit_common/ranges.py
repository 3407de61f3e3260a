"""Reading byte ranges of files: a local file by ``pread``, objects by concurrent range requests.

The training stream reads every image of a batch by its offset. ``RangeFile`` is one file
opened for that (a local file descriptor, or an object's URL and the ETag it had when the
run started); ``read_batch`` reads a batch's ranges over many such files: local ones by
``pread`` (the hot path, no request), objects by one concurrent call per file system, each
request pinned to its object's ETag where the store allows (``If-Match`` on S3 and HTTP), so
an object replaced during the run is refused rather than read at another object's offsets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from beit_common.errors import BeitDataError
from beit_common.location import Location
from beit_common.storage import filesystem, remote_errors

__all__ = ["RangeFile", "read_batch", "read_ranges"]

READ_ATTEMPTS = 5  # an object's body cut off mid-read is read again, with backoff


@dataclass
class RangeFile:
    """A file opened for range reads; ``close`` it when done (a local file holds a descriptor).

    Attributes:
        location: The file.
        etag: For an object, its ETag when the run started; its reads are pinned to it.
    """

    location: Location
    etag: str | None = None
    fd: int | None = None

    @classmethod
    def open(cls, location: str | os.PathLike, etag: str | None = None) -> RangeFile:
        location = Location(location)
        if not location.is_local:
            return cls(location, etag)
        with remote_errors(location, local=True):
            return cls(location, None, os.open(location, os.O_RDONLY))

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _whole(location: str, data: bytes, offset: int, size: int) -> bytes:
    """``data``, after checking that the range came back whole."""
    if len(data) != size:
        raise BeitDataError(f"{location}: {len(data)} bytes at offset {offset}, not {size}: it has changed "
                            "since it was indexed (or the server ignores Range requests)")
    return data


def read_batch(requests: Sequence[tuple[RangeFile, int, int]]) -> list[bytes]:
    """The bytes at each ``(file, offset, size)``: local files by ``pread``, objects by concurrent
    range requests, one call per file system for all of them, so a batch's images arrive together.

    Raises:
        BeitDataError: When a range comes back short, an object is gone or has changed, naming it.
    """
    out: list[bytes | None] = [None] * len(requests)
    by_fs: dict[int, tuple[object, list[int], list[str]]] = {}
    for j, (file, offset, size) in enumerate(requests):
        if file.fd is not None:
            if file.fd < 0:
                raise BeitDataError(f"{file.location}: read after it was closed")
            out[j] = _whole(file.location, os.pread(file.fd, size, offset), offset, size)
            continue
        fs, path = filesystem(file.location)
        by_fs.setdefault(id(fs), (fs, [], []))
        by_fs[id(fs)][1].append(j)
        by_fs[id(fs)][2].append(path)
    for fs, idx, paths in by_fs.values():
        files = [requests[j][0] for j in idx]
        starts = [requests[j][1] for j in idx]
        ends = [requests[j][1] + requests[j][2] for j in idx]
        with remote_errors(files[0].location):
            got = _pinned_ranges(fs, paths, starts, ends, [f.etag for f in files])
        for j, file, data in zip(idx, files, got):
            if isinstance(data, BaseException):
                if _precondition_failed(data):
                    raise BeitDataError(f"{file.location} changed during the run (its ETag is no longer "
                                        f"{file.etag}); a shard must stay as it was tokenized")
                with remote_errors(file.location):
                    raise data
            out[j] = _whole(file.location, data, requests[j][1], requests[j][2])
    return out


def read_ranges(location: str | os.PathLike, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    """The bytes at each ``(offset, size)`` of one file (see ``read_batch``)."""
    file = RangeFile.open(location)
    try:
        return read_batch([(file, offset, size) for offset, size in ranges])
    finally:
        file.close()


def _precondition_failed(exc: BaseException) -> bool:
    """An ``If-Match`` that did not hold: HTTP 412, which s3fs turns into an EINVAL OSError."""
    return getattr(exc, "status", None) == 412 or (
        isinstance(exc, OSError) and "pre-condition" in str(exc).lower())


def _pinned_ranges(fs, paths: list[str], starts: list[int], ends: list[int], etags: list[str | None]) -> list:
    """The bytes, or the exception, of each range: concurrent requests, each pinned to its
    object's ETag on S3 and HTTP (gcsfs ranges are not pinned: a changed object is caught at
    the stream's next look at it). The clients retry transient failures: botocore and gcsfs
    their own, HTTP's session (``storage._http_client``) every request."""
    import asyncio

    from fsspec.asyn import sync

    kind = type(fs).__name__
    etags = [e if e and not e.startswith("W/") and kind in ("S3FileSystem", "HTTPFileSystem") else None
             for e in etags]  # a weak ETag cannot pin a range

    async def fetch(path: str, start: int, end: int, etag: str | None) -> bytes:
        if etag is None:
            return await fs._cat_file(path, start=start, end=end)
        if kind == "HTTPFileSystem":
            return await fs._cat_file(path, start=start, end=end, headers={"If-Match": f'"{etag}"'})
        bucket, key, _ = fs.split_path(path)
        for attempt in range(READ_ATTEMPTS):  # botocore retries the request; a body cut off is read again here
            resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}",
                                     IfMatch=f'"{etag}"')
            try:
                return await resp["Body"].read()
            except Exception as exc:
                cut = isinstance(exc, (ConnectionError, asyncio.TimeoutError)) or "aiohttp" in type(exc).__module__ \
                    or type(exc).__name__ in ("ResponseStreamingError", "IncompleteReadError")
                if not cut or attempt == READ_ATTEMPTS - 1:
                    raise
            finally:
                resp["Body"].close()
            await asyncio.sleep(0.2 * 2 ** attempt)

    async def every() -> list:
        return await asyncio.gather(*(fetch(*r) for r in zip(paths, starts, ends, etags)), return_exceptions=True)

    return sync(fs.loop, every)
