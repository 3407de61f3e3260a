"""Where a file or folder lives: one kind of value for a local path, an object URL and a command.

A ``Location`` is the string a user gave (so it prints, sorts, hashes and serialises as that
string), resolved once into its kind: a local path, an ``s3://``, ``gs://`` or ``http(s)://``
URL, or a WebDataset ``pipe:COMMAND`` whose standard output is the file. Everything that
differs between the kinds (naming, joining, reading, writing) is answered here and in
``beit_common.storage``; the rest of the project passes locations along without asking which
kind they are. Names read from elsewhere (an object listing, a tar) join a folder only through
``inside``, and every URL or command printed or stored goes through ``redact``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from beit_common.errors import BeitDataError

__all__ = ["Location", "URL_SCHEMES", "resolve_locations", "redact", "redacted", "inside"]

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

    def beside(self, name: str) -> Location | None:
        """The file ``name`` in this one's folder; ``None`` for a ``pipe:`` command, which has no folder."""
        return None if self.kind == "pipe" else self.parent / name

    def locate(self, name: str) -> Location:
        """Where ``name``, read in a file of this folder, points: an absolute path, a URL or a
        command as it is, a relative path under this folder."""
        if os.path.isabs(name) or Location(name).kind != "local":
            return Location(name)
        return self / name

    def local_path(self) -> Path | None:
        """The path on this machine, or ``None`` for a URL or a command, which have none."""
        return Path(self) if self.kind == "local" else None

    def identity(self) -> str:
        """What makes two locations the same file: the resolved path, or the text of a URL."""
        return str(Path(self).resolve()) if self.kind == "local" else str(self)

    def reference(self, *, beside: bool = False) -> str:
        """How a file written elsewhere names this one: a local file by its resolved path, or by
        its name alone with ``beside`` (for a file in the same folder: the two can move together);
        an object by its URL, with its credentials redacted."""
        if self.kind != "local":
            return redact(self)
        return self.name if beside else self.identity()


def resolve_locations(config, *names: str) -> None:
    """Turn the settings ``names`` of ``config`` (a frozen dataclass) into ``Location`` values:
    a string or path, or each item of a list or tuple of them; ``None`` stays ``None``. The
    configs call it as they are built: what a user typed becomes a location once, and the code
    below them takes ``Location``."""
    for name in names:
        value = getattr(config, name)
        if value is None or isinstance(value, Location):
            continue
        if isinstance(value, (str, os.PathLike)):
            value = Location(value)
        else:
            value = (list if isinstance(value, list) else tuple)(map(Location, value))
        object.__setattr__(config, name, value)


_URL = re.compile(r"\b(?:https?|s3|gs|gcs)://[^\s'\"`]+", re.IGNORECASE)
# Query parameters that carry a secret: presigned S3 and GCS URLs, SAS tokens, API keys.
_SECRET_PARAM = re.compile(r"signature|credential|token|secret|password|passwd|^sig$|^key$|apikey|api_key|"
                           r"awsaccesskeyid|^auth", re.IGNORECASE)
REDACTED = "REDACTED"

# A ``pipe:`` command runs to the end of its line: a message that names one goes on with the
# command's own error text (which repeats its arguments) on the same line.
_PIPE = re.compile(r"(?<!\w)pipe:[^\n]*")
_WORD = r"""'[^']*'|"[^"]*"|[^\s'"]+"""  # one shell word, quoted or bare
# The words that, as a part of an option, variable or header name, say that its value is a
# secret (``--password``, ``X_TOKEN``, ``X-Api-Key``, ``api_key``); ``tokens`` is no such part.
_SECRET_PARTS = frozenset({"password", "passwd", "pass", "pwd", "secret", "token", "key", "apikey", "auth",
                           "authorization", "credential", "credentials", "sig", "signature", "bearer", "cookie"})
_USER_OPTION = re.compile(rf"(?<![\w-])(?P<name>-u|-U|--user|--proxy-user)(?P<sep>=|\s*)(?P<value>{_WORD})")
_HEADER = re.compile(r"""(?P<quote>['"])?(?P<name>[A-Za-z][\w-]*):[ \t]*(?P<value>(?(quote)[^'"\n]*|"""
                     r"""(?:(?:Bearer|Basic|Token|Digest|Negotiate)[ \t]+)?[^\s'"]+))""")
_OPTION = re.compile(rf"(?<![\w-])(?P<name>--?[A-Za-z][\w-]*)(?P<sep>=|\s+(?!-))(?P<value>{_WORD})")
_ASSIGNMENT = re.compile(r"""(?<![\w-])(?P<name>[A-Za-z_][\w.-]*)=(?P<value>'[^']*'|"[^"]*"|[^\s'"&;|]+)""")


def _secret_name(name: str) -> bool:
    return any(part in _SECRET_PARTS for part in re.split(r"[-_.]+", name.lower()))


def _redact_command(command: str) -> str:
    """A ``pipe:`` command with the values of its credential arguments replaced: ``-u user:pass``,
    auth-looking headers (``Authorization: Bearer ...``, ``X-Api-Key: ...``), secret-named options
    (``--password X``, ``--oauth2-bearer X``) and assignments (``X_TOKEN=...``, ``token=...``)."""

    def value(match: re.Match) -> str:
        text = match.group("value")
        quote = text[0] if text[:1] in ("'", '"') and text[-1:] == text[0] and len(text) > 1 else ""
        return match.group(0)[:match.start("value") - match.start(0)] + f"{quote}{REDACTED}{quote}"

    def user(match: re.Match) -> str:
        return value(match) if ":" in match.group("value") else match.group(0)

    def named(match: re.Match) -> str:
        return value(match) if _secret_name(match.group("name").lstrip("-")) else match.group(0)

    def header(match: re.Match) -> str:
        if not _secret_name(match.group("name")) or match.group("value") == REDACTED:
            return match.group(0)
        return match.group(0)[:match.start("value") - match.start(0)] + REDACTED

    for pattern, clean in ((_USER_OPTION, user), (_HEADER, header), (_OPTION, named), (_ASSIGNMENT, named)):
        command = pattern.sub(clean, command)
    return command


def redact(text: str) -> str:
    """``text`` with every credential in it replaced by ``REDACTED``: in each URL, the user and
    password before the host and the query parameters that carry a signature, credential,
    token or key; in each ``pipe:`` command (to the end of its line), the values of its
    credential arguments (``_redact_command``). For messages, logs and stored configs: what is
    printed or written never holds a credential."""
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

    text = _URL.sub(clean, str(text))
    return _PIPE.sub(lambda m: _redact_command(m.group(0)), text) if "pipe:" in text else text


def redacted(value):
    """``value`` (a config: strings in dicts, lists and tuples) with every credential redacted (``redact``)."""
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
