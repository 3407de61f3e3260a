"""Where beit-data reads and writes: local paths, object storage and WebDataset ``pipe:`` commands.

A location is a local path, an ``s3://``, ``gs://`` or ``http(s)://`` URL (read through fsspec:
s3fs, gcsfs, and fsspec's HTTP file system over aiohttp), or a ``pipe:COMMAND`` whose standard
output is the file (WebDataset's convention; it can only be read from the start).

Credentials and endpoints come the usual way: for S3, the AWS environment variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL``,
``AWS_MAX_ATTEMPTS``...) and ``~/.aws/config`` / ``~/.aws/credentials``; for GCS, Google's
application default credentials. Transient errors (``SlowDown``, 5xx, a dropped connection)
are retried with backoff by botocore and s3fs; HTTP reads are retried here.

Writes to object storage go to a local temporary file first and are then uploaded in one
call: a single PUT, or a multipart upload that is completed only after its last part. So an
object appears whole under its final name, or not at all, as a local file does by rename.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence

from beit_common import BeitDataError

__all__ = ["URL_SCHEMES", "is_url", "is_pipe", "is_remote", "join", "basename", "stem", "sibling", "filesystem",
           "remote_errors", "stat", "exists", "read_bytes", "read_text_if_there", "read_ranges", "read_many",
           "list_files", "glob", "upload", "open_stream", "open_random", "arrow_source", "cache_dir",
           "cache_key", "temp_file", "is_prefix", "map_concurrently", "download", "probe_writable", "Mirror",
           "EXTRAS", "redact", "redacted", "inside"]

URL_SCHEMES = ("s3", "gs", "gcs", "http", "https")
# The pip extra that brings each scheme's file system.
EXTRAS = {"s3": "s3", "gs": "gcs", "gcs": "gcs", "http": "http", "https": "http"}
HTTP_ATTEMPTS = 5  # HTTP reads: tries in all, with backoff 0.2, 0.4, 0.8, 1.6 s between them


def is_url(location: str | os.PathLike) -> bool:
    scheme, sep, _ = str(location).partition("://")
    return bool(sep) and scheme.lower() in URL_SCHEMES


def is_pipe(location: str | os.PathLike) -> bool:
    return str(location).startswith("pipe:")


def is_remote(location: str | os.PathLike) -> bool:
    return is_url(location) or is_pipe(location)


def join(base: str | os.PathLike, name: str) -> str | Path:
    """``base/name``: a URL stays a string (``Path`` would fold its ``//``), a local path a ``Path``."""
    if is_url(base):
        return f"{str(base).rstrip('/')}/{name}"
    return Path(base) / name


def basename(location: str | os.PathLike) -> str:
    """The file name of a location. For a ``pipe:`` command, that of the last word naming a ``.tar``
    (``pipe:aws s3 cp s3://b/train-000001.tar -`` -> ``train-000001.tar``)."""
    text = str(location)
    if is_pipe(text):
        words = [w for w in text[5:].split() if ".tar" in w]
        if not words:
            raise BeitDataError(f"{text}: a pipe: command must name its .tar file (its name pairs it with its tokens)")
        text = words[-1]
    if is_url(text) or is_pipe(location):
        return text.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return Path(text).name


def stem(location: str | os.PathLike) -> str:
    name = basename(location)
    return name.rsplit(".", 1)[0] if "." in name[1:] else name


def sibling(location: str | os.PathLike, suffix: str) -> str | Path | None:
    """The file beside ``location`` with ``suffix`` for its extension (``x.tar`` -> ``x.idx``);
    ``None`` for a ``pipe:`` command, which has no place beside it."""
    if is_pipe(location):
        return None
    if is_url(location):
        text = str(location)
        head, _, name = text.rpartition("/")
        return f"{head}/{name.rsplit('.', 1)[0] if '.' in name else name}{suffix}"
    return Path(location).with_suffix(suffix)


_URL = re.compile(r"\b(?:https?|s3|gs|gcs)://[^\s'\"`]+", re.IGNORECASE)
# Query parameters that carry a secret: presigned S3 and GCS URLs, SAS tokens, API keys.
_SECRET_PARAM = re.compile(r"signature|credential|token|secret|password|passwd|^sig$|^key$|apikey|api_key|"
                           r"awsaccesskeyid|^auth", re.IGNORECASE)
REDACTED = "REDACTED"


def redact(text: str) -> str:
    """``text`` with the secrets of every URL in it replaced: the user and password before the
    host, and query parameters that carry a signature, credential, token or key. For messages,
    logs and stored configs: what is printed or written never holds a credential."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    def clean(match: re.Match) -> str:
        url = match.group(0)
        try:
            parts = urlsplit(url)
        except ValueError:
            return url
        netloc = parts.netloc
        if "@" in netloc:
            netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            if any(_SECRET_PARAM.search(k) for k, _ in pairs):
                query = urlencode([(k, REDACTED if _SECRET_PARAM.search(k) else v) for k, v in pairs], safe="/:")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))

    return _URL.sub(clean, str(text))


def redacted(value):
    """``value`` (a config: strings in dicts, lists and tuples) with every URL's secrets redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redacted(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redacted(v) for v in value)
    return value


def filesystem(url: str):
    """``(fsspec file system, path inside it)`` for a URL.

    Raises:
        BeitDataError: When the scheme's package is not installed, naming the extra.
    """
    import fsspec.core

    scheme = str(url).partition("://")[0].lower()
    try:
        return fsspec.core.url_to_fs(str(url))
    except ImportError:
        raise BeitDataError(f"{url}: reading {scheme}:// needs an extra: pip install 'beit-data[{EXTRAS[scheme]}]'"
                            ) from None


def _message(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


@contextmanager
def remote_errors(location: str | os.PathLike, doing: str = "", *, local: bool = False) -> Iterator[None]:
    """Turn a file system's errors into one line naming ``location``: a missing bucket or object,
    missing credentials, a denied request, an object that changed while it was read. Errors
    about a local path pass unchanged, unless ``local``."""
    if not (local or is_remote(location)):
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


def _retrying(url: str, call: Callable, *args, **kwargs):
    """``call(*args, **kwargs)``, tried again after a transient HTTP failure (a dropped
    connection, a 5xx). S3 and GCS clients retry on their own."""
    if not str(url).lower().startswith("http"):
        return call(*args, **kwargs)
    for attempt in range(HTTP_ATTEMPTS):
        try:
            return call(*args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as exc:
            status = getattr(exc, "status", None)
            dropped = isinstance(exc, (ConnectionError, TimeoutError)) or "aiohttp" in type(exc).__module__
            transient = (status is not None and (status >= 500 or status == 429)) or (status is None and dropped)
            if not transient or attempt == HTTP_ATTEMPTS - 1:
                raise
            time.sleep(0.2 * 2 ** attempt)


def stat(location: str | os.PathLike, *, fresh: bool = True) -> dict:
    """``{"size": bytes, "etag": str | None}``. With ``fresh``, asked of the server; otherwise
    an object listed a moment ago (``expand_shards`` lists a prefix once) costs no request."""
    if not is_url(location):
        return {"size": os.path.getsize(location), "etag": None}
    fs, path = filesystem(str(location))
    with remote_errors(location):
        if fresh:
            fs.invalidate_cache(path)
        info = _retrying(str(location), fs.info, path)
    if info.get("type") == "directory":
        raise BeitDataError(f"{location}: is a prefix (a folder), not an object")
    etag = info.get("ETag") or info.get("etag") or info.get("generation")
    if info.get("size") is None:
        raise BeitDataError(f"{location}: the server gives no size for it (no Content-Length)")
    return {"size": int(info["size"]), "etag": str(etag).strip('"') if etag else None}


def exists(location: str | os.PathLike) -> bool:
    if not is_url(location):
        return os.path.exists(location)
    fs, path = filesystem(str(location))
    with remote_errors(location):
        if str(location).lower().startswith("http"):  # fsspec's exists() says False for a 503 too
            try:
                _retrying(str(location), fs.info, path)
                return True
            except FileNotFoundError:
                return False
        return bool(fs.exists(path))  # from a listing of the prefix made in this run, where there is one


def read_bytes(location: str | os.PathLike) -> bytes:
    if not is_url(location):
        with open(location, "rb") as f:
            return f.read()
    fs, path = filesystem(str(location))
    with remote_errors(location):
        return _retrying(str(location), fs.cat_file, path)


def _whole(location: str | os.PathLike, data: bytes, offset: int, size: int) -> bytes:
    """``data``, after checking that the range came back whole."""
    if len(data) != size:
        raise BeitDataError(f"{location}: {len(data)} bytes at offset {offset}, not {size}: it has changed "
                            "since it was indexed (or the server ignores Range requests)")
    return data


def read_ranges(location: str | os.PathLike, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    """The bytes at each ``(offset, size)``: a local file by ``pread``, an object by concurrent
    range requests, one per range.

    Raises:
        BeitDataError: When a range comes back short (the file shrank) or the object is gone.
    """
    if is_url(location):
        return read_many([(str(location), offset, size) for offset, size in ranges])
    with open(location, "rb", buffering=0) as f:
        return [_whole(location, os.pread(f.fileno(), size, offset), offset, size) for offset, size in ranges]


def read_many(requests: Sequence[tuple[str, int, int]], etags: Sequence[str | None] | None = None) -> list[bytes]:
    """The bytes at each ``(url, offset, size)``, by concurrent range requests: one call per file
    system for all of them, so a batch's images arrive together.

    Args:
        etags: The ETag each object had when the run started. On S3 and HTTP each request is
            then pinned to it (``If-Match``): an object replaced since is refused, never read
            at offsets that belonged to the old one.

    Raises:
        BeitDataError: When a range comes back short, an object is gone or has changed, naming it.
    """
    out: list[bytes | None] = [None] * len(requests)
    by_fs: dict[int, tuple[object, list[int], list[str]]] = {}
    for j, (url, _, _) in enumerate(requests):
        fs, path = filesystem(url)
        by_fs.setdefault(id(fs), (fs, [], []))
        by_fs[id(fs)][1].append(j)
        by_fs[id(fs)][2].append(path)
    for fs, idx, paths in by_fs.values():
        first = requests[idx[0]][0]
        starts = [requests[j][1] for j in idx]
        ends = [requests[j][1] + requests[j][2] for j in idx]
        pins = [etags[j] for j in idx] if etags is not None else None
        with remote_errors(first):
            if pins is not None and any(pins) and _pinnable(fs):
                got = _pinned_ranges(fs, paths, starts, ends, pins)
            else:
                got = fs.cat_ranges(paths, starts, ends, on_error="return")
        for j, data in zip(idx, got):
            url, offset, size = requests[j]
            if isinstance(data, BaseException):
                if _precondition_failed(data):
                    raise BeitDataError(f"{url} changed during the run (its ETag is no longer {etags[j]}); a shard "
                                        "must stay as it was tokenized")
                with remote_errors(url):
                    if not url.lower().startswith("http"):  # s3fs and gcsfs have retried it already
                        raise data
                    data = _retrying(url, fs.cat_file, filesystem(url)[1], offset, offset + size)
            out[j] = _whole(url, data, offset, size)
    return out


def _pinnable(fs) -> bool:
    """Whether range reads on ``fs`` can carry ``If-Match`` (S3 and HTTP; not gcsfs)."""
    return type(fs).__name__ in ("S3FileSystem", "HTTPFileSystem")


def _precondition_failed(exc: BaseException) -> bool:
    """An ``If-Match`` that did not hold: HTTP 412, which s3fs turns into an EINVAL OSError."""
    return getattr(exc, "status", None) == 412 or (
        isinstance(exc, OSError) and "pre-condition" in str(exc).lower())


def _pinned_ranges(fs, paths: list[str], starts: list[int], ends: list[int], etags: list[str | None]) -> list:
    """``cat_ranges`` with each request pinned to its object's ETag; a failed request is retried
    with backoff unless it failed for good (gone, denied, changed). Returns the bytes, or the
    exception, of each."""
    import asyncio

    from fsspec.asyn import sync

    async def fetch(path: str, start: int, end: int, etag: str | None) -> bytes:
        if type(fs).__name__ == "HTTPFileSystem":
            return await fs._cat_file(path, start=start, end=end,
                                      **({"headers": {"If-Match": f'"{etag}"'}} if etag else {}))
        bucket, key, _ = fs.split_path(path)
        pin = {"IfMatch": f'"{etag}"'} if etag else {}
        resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}", **pin)
        try:
            return await resp["Body"].read()
        finally:
            resp["Body"].close()

    etags = [e if e and not e.startswith("W/") else None for e in etags]  # a weak ETag cannot pin a range

    async def one(*request) -> bytes:
        for attempt in range(HTTP_ATTEMPTS):
            try:
                return await fetch(*request)
            except (FileNotFoundError, PermissionError):
                raise
            except Exception as exc:
                status = getattr(exc, "status", None)
                final = _precondition_failed(exc) or (status is not None and status < 500 and status != 429)
                if final or attempt == HTTP_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(0.2 * 2 ** attempt)

    async def every() -> list:
        return await asyncio.gather(*(one(*r) for r in zip(paths, starts, ends, etags)), return_exceptions=True)

    return sync(fs.loop, every)


def read_text_if_there(location: str | os.PathLike, limit: int | None = None) -> str | None:
    """A small file's text (its first ``limit`` bytes), or ``None`` where there is no such file:
    one request for an object, not an existence check and then a read."""
    try:
        if not is_url(location):
            with open(location, "rb") as f:
                data = f.read(-1 if limit is None else limit)
        else:
            fs, path = filesystem(str(location))
            with remote_errors(location):
                try:
                    data = _retrying(str(location), fs.cat_file, path, 0, limit)
                except FileNotFoundError:
                    return None
    except FileNotFoundError:
        return None
    return data.decode("utf-8", errors="strict")


def list_files(prefix: str, suffix: str) -> list[str]:
    """The objects directly under a remote prefix whose names end in ``suffix``, sorted, as URLs."""
    fs, path = filesystem(prefix)
    protocol = str(prefix).partition("://")[0]
    with remote_errors(prefix, "listing"):
        fs.invalidate_cache(path)
        try:
            entries = _retrying(prefix, fs.ls, path.rstrip("/"), detail=True)
        except FileNotFoundError:
            if "/" not in path.strip("/") or prefix.lower().startswith("http"):
                raise
            _retrying(prefix, fs.ls, path.split("/", 1)[0])  # the bucket is there: an empty prefix
            entries = []
    return _urls(protocol, [e["name"] for e in entries if e.get("type") != "directory" and e["name"].endswith(suffix)])


def _urls(protocol: str, names: Sequence[str]) -> list[str]:
    """A file system's names (``bucket/key``) as sorted URLs."""
    return sorted(n if is_url(n) else f"{protocol}://{n}" for n in names)


def glob(pattern: str) -> list[str]:
    fs, path = filesystem(pattern)
    protocol = str(pattern).partition("://")[0]
    with remote_errors(pattern, "listing"):
        fs.invalidate_cache()
        found = _retrying(pattern, fs.glob, path)
        if not found and not pattern.lower().startswith("http"):  # a missing bucket globs to nothing: say so
            _retrying(pattern, fs.ls, path.split("/", 1)[0])
    return _urls(protocol, found)


def is_prefix(url: str) -> bool:
    """Whether a URL names a folder-like prefix (it ends in ``/``, or objects lie under it)."""
    if str(url).endswith("/"):
        return True
    if str(url).lower().startswith("http"):
        return False
    fs, path = filesystem(url)
    with remote_errors(url):
        fs.invalidate_cache(path)
        return bool(_retrying(url, fs.isdir, path))


def upload(local: str | os.PathLike, url: str, chunk_size: int | None = None) -> None:
    """Put a finished local file at ``url`` in one call: a single PUT, or (past ``chunk_size``,
    s3fs's 50 MiB by default) a multipart upload that is completed only after its last part, so
    the object appears whole or not at all."""
    fs, path = filesystem(url)
    with remote_errors(url, "upload"):
        fs.put_file(str(local), path, **({"chunksize": chunk_size} if chunk_size else {}))
        fs.invalidate_cache(path)


def download(url: str, local: str | os.PathLike) -> None:
    fs, path = filesystem(url)
    with remote_errors(url, "download"):
        fs.get_file(path, str(local))


def probe_writable(prefix: str) -> None:
    """Write and delete one small object under ``prefix``: a missing bucket, missing credentials
    or a denied write show before any work is done."""
    import socket
    import uuid

    probe = join(prefix, f".beit-data-write-test-{socket.gethostname()}-{uuid.uuid4().hex[:12]}")
    fs, path = filesystem(str(probe))
    with remote_errors(prefix, "writing"):
        fs.pipe_file(path, b"")
        fs.rm_file(path)


# Request size for reading an object through: the tar readers of tokenize, probe and
# train-dvae, and the tar-header scan (a request's latency, not its size, is what a scan of
# thousands of headers costs).
STREAM_BLOCK = 8 * 2**20


@contextmanager
def open_stream(location: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file read from the start: a local file, an object read ahead in 8 MiB requests,
    or a ``pipe:`` command's standard output (WebDataset's ``gopen``, which raises if the command
    fails)."""
    if is_pipe(location):
        from webdataset.gopen import gopen

        with remote_errors(location, "pipe"):
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
        with remote_errors(location, "pipe"):
            stream.close()  # read to the end: raises when the command failed
    elif is_url(location):
        fs, path = filesystem(str(location))
        with remote_errors(location):
            f = fs.open(path, "rb", block_size=STREAM_BLOCK, cache_type="readahead")
        with f:
            yield f
    else:
        with remote_errors(location, local=True):
            f = open(location, "rb")
        with f:
            yield f


def open_random(location: str | os.PathLike) -> BinaryIO:
    """A seekable binary file; an object is read ahead by range requests of ``STREAM_BLOCK`` bytes."""
    if is_pipe(location):
        raise BeitDataError(f"{location}: a pipe: command cannot be read at random")
    if not is_url(location):
        return open(location, "rb")
    fs, path = filesystem(str(location))
    with remote_errors(location):
        return fs.open(path, "rb", block_size=STREAM_BLOCK, cache_type="readahead")


def arrow_source(location: str | os.PathLike) -> tuple[str, object]:
    """``(path, filesystem)`` for pyarrow's readers: ``filesystem`` is ``None`` for a local path,
    else the URL's fsspec file system wrapped for pyarrow."""
    if not is_url(location):
        return str(location), None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = filesystem(str(location))
    return path, PyFileSystem(FSSpecHandler(fs))


REMOTE_WORKERS = 32  # requests in flight when many small objects are read (footers, indexes)


def map_concurrently(function: Callable, items: Sequence, *, concurrent: bool | None = None,
                     workers: int = REMOTE_WORKERS) -> list:
    """``[function(x) for x in items]`` in order, the first error raised; in threads when
    ``concurrent`` (by default: where some items are URLs), for calls that wait on the network."""
    if concurrent is None:
        concurrent = any(is_url(x) for x in items if isinstance(x, (str, os.PathLike)))
    if len(items) < 2 or not concurrent:
        return [function(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(workers, len(items))) as pool:
        return list(pool.map(function, items))


def cache_dir(*parts: str) -> Path:
    """``$BEIT_DATA_CACHE`` (default ``~/.cache/beit-data``)/parts, created."""
    root = Path(os.environ.get("BEIT_DATA_CACHE") or Path.home() / ".cache" / "beit-data")
    folder = root.joinpath(*parts)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def cache_key(*parts: object) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:24]


def temp_file(like: str | os.PathLike) -> Path:
    """A fresh local temporary file for an object on its way up."""
    fd, name = tempfile.mkstemp(prefix=f".{basename(like)}.", suffix=".part", dir=cache_dir("uploads"))
    os.close(fd)
    return Path(name)


def inside(folder: Path, name: str, source: str) -> Path:
    """``folder / name`` for a name read from ``source`` (an object listing, a tar), refused
    unless it stays inside ``folder``: no absolute name, no ``..`` that climbs out of it.

    Raises:
        BeitDataError: Naming ``source`` and ``name``.
    """
    root = folder.resolve()
    target = (root / name).resolve()
    if os.path.isabs(name) or not name or target == root or root not in target.parents:
        raise BeitDataError(f"{source}: the name {name!r} would be written outside {folder}; refused (no name read "
                            "from a listing or a tar may leave the folder it is written into)")
    return target


class Mirror:
    """A local folder that stands for an object-storage prefix: a run writes (and appends to
    its logs) locally, and ``push`` uploads each file that changed since the last push, one
    whole object each. ``pull`` brings the prefix's files down first, for a resumed run.

    Args:
        url: The prefix.
        local: The folder that mirrors it.
        skip: Names never uploaded (locks, temporary files).
    """

    def __init__(self, url: str, local: Path, skip: Sequence[str] = ()):
        self.url = str(url).rstrip("/")
        self.local = local
        self.skip = set(skip)
        self._pushed: dict[str, tuple[int, int]] = {}

    def _files(self) -> list[Path]:
        return sorted(p for p in self.local.rglob("*") if p.is_file() and p.name not in self.skip
                      and not p.name.startswith("."))

    def reset(self) -> None:
        """Empty the local folder (left over from an earlier run of this prefix)."""
        import shutil

        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True, exist_ok=True)
        self._pushed.clear()

    def pull(self, names: Sequence[str] | None = None) -> None:
        """Download the prefix's files (or just ``names``) into the empty local folder."""
        from beit_common import write_atomic

        self.reset()
        if names is None:
            fs, path = filesystem(self.url)
            with remote_errors(self.url, "listing"):
                fs.invalidate_cache()
                names = [n[len(path.rstrip("/")) + 1:] for n in fs.find(path)]
        targets = [inside(self.local, name, self.url) for name in names]  # all checked before any is written
        for name, target in zip(names, targets):
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(target, lambda tmp, name=name: download(f"{self.url}/{name}", tmp))
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
