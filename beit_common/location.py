"""Where a file or folder lives: one kind of value for a local path, an object URL and a command.

A ``Location`` is the string a user gave (so it prints, sorts, hashes and serialises as that
string), resolved once into its kind: a local path, an ``s3://``, ``gs://`` or ``http(s)://``
URL, or a WebDataset ``pipe:COMMAND`` whose standard output is the file. Everything that
differs between the kinds (naming, joining, reading, writing) is answered here and in
``beit_common.storage``; the rest of the project passes locations along without asking which
kind they are. Names read from elsewhere (an object listing, a tar) join a folder only through
``inside``, and every URL printed or stored goes through ``redact``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from beit_common.errors import BeitDataError

__all__ = ["Location", "URL_SCHEMES", "redact", "redacted", "inside"]

URL_SCHEMES = ("s3", "gs", "gcs", "http", "https")


class Location(str):
    """A local path, an object URL or a ``pipe:`` command, as the string it was given.

    Attributes:
        kind: ``"local"``, ``"url"`` or ``"pipe"``.
    """

    kind: str

    def __new__(cls, value: str | os.PathLike) -> Location:
        if isinstance(value, Location):
            return value
        self = super().__new__(cls, os.fspath(value) if isinstance(value, os.PathLike) else str(value))
        scheme, sep, _ = self.partition("://")
        self.kind = "pipe" if self.startswith("pipe:") else "url" if sep and scheme.lower() in URL_SCHEMES \
            else "local"
        return self

    def __reduce__(self):
        return Location, (str(self),)

    @property
    def scheme(self) -> str:
        """``s3``, ``gs``, ``http``... for a URL; ``file`` for a local path, ``pipe`` for a command."""
        return {"local": "file", "pipe": "pipe"}.get(self.kind) or self.partition("://")[0].lower()

    @property
    def is_local(self) -> bool:
        return self.kind == "local"

    @property
    def seekable(self) -> bool:
        """Whether it can be read at any offset: a command's output is read from its start only."""
        return self.kind != "pipe"

    @property
    def path(self) -> Path:
        """The local path (refused for a URL or a command)."""
        if self.kind != "local":
            raise BeitDataError(f"{redact(self)} is not a local path")
        return Path(self)

    @property
    def name(self) -> str:
        """The file name. For a ``pipe:`` command, that of the last word naming a ``.tar``
        (``pipe:aws s3 cp s3://b/train-000001.tar -`` -> ``train-000001.tar``)."""
        text = str(self)
        if self.kind == "pipe":
            words = [w for w in text[5:].split() if ".tar" in w]
            if not words:
                raise BeitDataError(f"{text}: a pipe: command must name its .tar file (its name pairs it with its "
                                    "tokens)")
            text = words[-1]
        if self.kind == "local":
            return Path(text).name
        return text.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]

    @property
    def stem(self) -> str:
        name = self.name
        return name.rsplit(".", 1)[0] if "." in name[1:] else name

    def __truediv__(self, name: str) -> Location:
        """``self/name``: a URL keeps its ``//``, a local path is joined as a path."""
        if self.kind == "url":
            return Location(f"{self.rstrip('/')}/{name}")
        if self.kind == "pipe":
            raise BeitDataError(f"{self}: a pipe: command is not a folder")
        return Location(Path(self) / name)

    @property
    def parent(self) -> Location:
        if self.kind == "url":
            return Location(self.rstrip("/").rsplit("/", 1)[0])
        return Location(Path(self).parent)

    def sibling(self, suffix: str) -> Location | None:
        """The file beside this one with ``suffix`` for its extension (``x.tar`` -> ``x.idx``);
        ``None`` for a ``pipe:`` command, which has no place beside it."""
        if self.kind == "pipe":
            return None
        if self.kind == "url":
            head, _, name = self.rpartition("/")
            return Location(f"{head}/{name.rsplit('.', 1)[0] if '.' in name else name}{suffix}")
        return Location(Path(self).with_suffix(suffix))

    def identity(self) -> str:
        """What makes two locations the same file: the resolved path, or the text of a URL."""
        return str(Path(self).resolve()) if self.kind == "local" else str(self)


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
