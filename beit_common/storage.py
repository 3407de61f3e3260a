"""Reading and listing locations, whatever their kind: local paths, objects and ``pipe:`` commands.

Local paths and URLs alike go through fsspec (its local file system, s3fs, gcsfs, and its
HTTP file system over aiohttp), resolved once per location; a ``pipe:`` command is opened by
WebDataset's ``gopen``. Callers pass ``Location`` values (or strings, which become one) and
never ask which kind they hold. Range reads live in ``beit_common.ranges``, writes in
``beit_common.files``.

Credentials and endpoints come the usual way: for S3, the AWS environment variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL``,
``AWS_MAX_ATTEMPTS``...) and ``~/.aws/config`` / ``~/.aws/credentials``; for GCS, Google's
application default credentials. Every request to an object store is retried with backoff
on a transient failure (a dropped connection, a 5xx, a 429): S3's and GCS's by their
clients, HTTP's by the aiohttp session given to fsspec (``_http_client``).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence

from beit_common.cache import temp_file
from beit_common.errors import BeitDataError
from beit_common.location import Location, redact

__all__ = ["filesystem", "remote_errors", "stat", "size", "scan_is_cheap", "local_copy", "exists",
           "read_bytes", "read_text_if_there", "download", "local_folder", "open_stream", "open_random",
           "arrow_source", "map_concurrently", "EXTRAS"]

# The pip extra that brings each scheme's file system.
EXTRAS = {"s3": "s3", "gs": "gcs", "gcs": "gcs", "http": "http", "https": "http"}
HTTP_ATTEMPTS = 5  # HTTP requests: tries in all, with backoff 0.2, 0.4, 0.8, 1.6 s between them
# Request size for reading an object through: the tar readers of tokenize, probe and
# train-dvae, and the tar-header scan (a request's latency, not its size, is what a scan of
# thousands of headers costs).
STREAM_BLOCK = 8 * 2**20
REMOTE_WORKERS = 32  # requests in flight when many small objects are read (footers, indexes)


def filesystem(location: str | os.PathLike):
    """``(fsspec file system, path inside it)`` for a local path or a URL.

    Raises:
        BeitDataError: When the scheme's package is not installed, naming the extra.
    """
    import fsspec.core

    location = Location(location)
    if location.kind == "pipe":
        raise BeitDataError(f"{location}: a pipe: command is read from its start only")
    options = {"get_client": _http_client} if location.scheme in ("http", "https") else {}
    try:
        return fsspec.core.url_to_fs(str(location), **options)
    except ImportError:
        raise BeitDataError(f"{redact(location)}: reading {location.scheme}:// needs an extra: pip install "
                            f"'beit-data[{EXTRAS[location.scheme]}]'") from None


async def _http_client(**kwargs):
    """fsspec's aiohttp session, with every request retried: a dropped connection, a timeout, a
    5xx or a 429 is tried again with backoff (0.2, 0.4, 0.8, 1.6 s), ``HTTP_ATTEMPTS`` times in
    all, whatever asked for it (a range read, a HEAD, a read-ahead of a file)."""
    import asyncio

    import aiohttp

    async def retry(request, handler):
        for attempt in range(HTTP_ATTEMPTS):
            last = attempt == HTTP_ATTEMPTS - 1
            try:
                response = await handler(request)
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError):
                if last:
                    raise
            else:
                if last or not (response.status >= 500 or response.status == 429):
                    return response
                response.release()
            await asyncio.sleep(0.2 * 2 ** attempt)

    return aiohttp.ClientSession(middlewares=(retry,), **kwargs)


def _message(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


@contextmanager
def remote_errors(location: str | os.PathLike, doing: str = "", *, local: bool = False) -> Iterator[None]:
    """Turn a file system's errors into one line naming ``location``: a missing bucket or object,
    missing credentials, a denied request, an object that changed while it was read. Errors
    about a local path pass unchanged, unless ``local``."""
    if not (local or not Location(location).is_local):
        yield
        return
    where = f"{location}" + (f" ({doing})" if doing else "")
    try:
        yield
    except BeitDataError:
        raise
    except FileNotFoundError as exc:
        raise BeitDataError(f"{where}: not found ({_message(exc)})") from None
    except PermissionError as exc:
        raise BeitDataError(f"{where}: access denied ({_message(exc)}); check the credentials and the bucket "
                            "policy") from None
    except Exception as exc:  # botocore and aiohttp have error types of their own
        name = type(exc).__name__
        if name in ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"):
            raise BeitDataError(f"{where}: no credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                                "(or AWS_PROFILE, ~/.aws/credentials) for s3://, application default credentials "
                                "for gs://") from None
        if isinstance(exc, NotImplementedError):
            raise BeitDataError(f"{where}: not possible with this storage (HTTP servers are read-only here)") from None
        if name == "FileExpired":
            raise BeitDataError(f"{where}: the object changed while it was read (its ETag differs from the one "
                                "recorded)") from None
        if isinstance(exc, (OSError, ValueError)) or "botocore" in type(exc).__module__ \
                or "aiohttp" in type(exc).__module__:
            raise BeitDataError(f"{where}: {_message(exc)}") from None
        raise


def stat(location: str | os.PathLike, *, fresh: bool = True) -> dict:
    """``{"size": bytes, "etag": str | None}`` (no ETag for a local file; neither for a ``pipe:``
    command). With ``fresh``, asked of the server; otherwise an object listed a moment ago costs
    no request."""
    location = Location(location)
    if location.kind == "pipe":
        return {"size": None, "etag": None}
    if location.is_local:
        return {"size": os.path.getsize(location), "etag": None}
    fs, path = filesystem(location)
    with remote_errors(location):
        if fresh:
            fs.invalidate_cache(path)
        info = fs.info(path)
    if info.get("type") == "directory":
        raise BeitDataError(f"{location}: is a prefix (a folder), not an object")
    etag = info.get("ETag") or info.get("etag") or info.get("generation")
    if info.get("size") is None:
        raise BeitDataError(f"{location}: the server gives no size for it (no Content-Length)")
    return {"size": int(info["size"]), "etag": str(etag).strip('"') if etag else None}


def exists(location: str | os.PathLike) -> bool:
    location = Location(location)
    if location.is_local:
        return os.path.exists(location)
    fs, path = filesystem(location)
    with remote_errors(location):
        if location.scheme.startswith("http"):  # fsspec's exists() says False for a 503 too
            try:
                fs.info(path)
                return True
            except FileNotFoundError:
                return False
        return bool(fs.exists(path))  # from a listing of the prefix made in this run, where there is one


def read_bytes(location: str | os.PathLike) -> bytes:
    fs, path = filesystem(location)
    with remote_errors(location):
        return fs.cat_file(path)


def read_text_if_there(location: str | os.PathLike, limit: int | None = None) -> str | None:
    """A small file's text (its first ``limit`` bytes), or ``None`` where there is no such file:
    one request for an object, not an existence check and then a read."""
    fs, path = filesystem(location)
    with remote_errors(location):
        try:
            data = fs.cat_file(path, 0, limit)
        except (FileNotFoundError, IsADirectoryError):
            return None
    return data.decode("utf-8", errors="strict")


def download(url: str, local: str | os.PathLike) -> None:
    fs, path = filesystem(url)
    with remote_errors(url, "download"):
        fs.get_file(path, str(local))


@contextmanager
def open_stream(location: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file read from the start: a local file, an object read ahead in 8 MiB requests,
    or a ``pipe:`` command's standard output (WebDataset's ``gopen``, which raises if the command
    fails)."""
    location = Location(location)
    if location.kind != "pipe":
        with remote_errors(location, local=True):
            f = open_random(location)
        with f:
            yield f
        return
    from webdataset.gopen import gopen

    with remote_errors(location, "pipe", local=True):
        stream = gopen(str(location), "rb")
    try:
        yield stream
    except BaseException:  # closed before the end (or failed): its exit status says nothing then
        stream.proc.kill()
        try:
            stream.close()
        except Exception:
            pass
        raise
    with remote_errors(location, "pipe", local=True):
        stream.close()  # read to the end: raises when the command failed


@contextmanager
def local_copy(location: str | os.PathLike) -> Iterator[Path]:
    """A local path to the file's bytes while the block runs: the file itself, or an object
    downloaded to a temporary file that is removed afterwards (for readers that need a path).

    Raises:
        BeitDataError: ``not found`` when there is no such file.
    """
    location = Location(location)
    if location.is_local:
        if not os.path.isfile(location):
            raise BeitDataError(f"{location}: not found")
        yield location.path
        return
    tmp = temp_file(location)
    try:
        download(location, tmp)
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def local_folder(location: str | os.PathLike, names: Sequence[str]) -> Iterator[Path]:
    """A local folder holding the files ``names`` of the folder ``location`` while the block runs:
    the folder itself, or a temporary one they are downloaded into and that is removed afterwards
    (for readers that open a folder by its path)."""
    location = Location(location)
    if location.is_local:
        yield location.path
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="beit-data-folder-") as tmp:
        for name in names:
            download(location / name, Path(tmp) / name)
        yield Path(tmp)


def size(location: str | os.PathLike) -> int | None:
    """A file's size in bytes, ``None`` for a ``pipe:`` command (which has none to ask for)."""
    return stat(location)["size"]


def scan_is_cheap(location: str | os.PathLike) -> bool:
    """Whether reading a file's tar headers costs little (a local file) rather than many requests."""
    return Location(location).is_local


def open_random(location: str | os.PathLike) -> BinaryIO:
    """A seekable binary file; an object is read ahead by range requests of ``STREAM_BLOCK`` bytes."""
    location = Location(location)
    if location.is_local:
        return open(location, "rb")
    fs, path = filesystem(location)
    with remote_errors(location):
        return fs.open(path, "rb", block_size=STREAM_BLOCK, cache_type="readahead")


def arrow_source(location: str | os.PathLike) -> tuple[str, object]:
    """``(path, filesystem)`` for pyarrow's readers: ``filesystem`` is ``None`` for a local path
    (pyarrow's own reader), else the URL's fsspec file system wrapped for pyarrow."""
    location = Location(location)
    if location.is_local:
        return str(location), None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = filesystem(location)
    return path, PyFileSystem(FSSpecHandler(fs))


def map_concurrently(function: Callable, items: Sequence, *, concurrent: bool | None = None,
                     workers: int = REMOTE_WORKERS) -> list:
    """``[function(x) for x in items]`` in order, the first error raised; in threads when
    ``concurrent`` (by default: where some items are remote), for calls that wait on the network."""
    if concurrent is None:
        concurrent = any(not Location(x).is_local for x in items if isinstance(x, (str, os.PathLike)))
    if len(items) < 2 or not concurrent:
        return [function(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(workers, len(items))) as pool:
        return list(pool.map(function, items))
