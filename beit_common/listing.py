"""Finding files: what is in a folder or under a prefix, and which files a pattern names."""

from __future__ import annotations

import glob as _glob
import os
from pathlib import Path
from typing import Sequence

from beit_common.errors import BeitDataError
from beit_common.location import Location
from beit_common.storage import exists, filesystem, remote_errors

__all__ = ["list_files", "expand"]


def list_files(folder: str | os.PathLike, suffix: str, what: str | None = None) -> list[Location]:
    """The files directly in ``folder`` (a local folder or a prefix) whose names end in
    ``suffix``, sorted.

    Raises:
        BeitDataError: ``{what} not found`` for a local folder that is not there, where ``what``
            is given (otherwise there is nothing in it). A prefix is never missing, only empty.
    """
    folder = Location(folder)
    if folder.is_local:
        if not Path(folder).is_dir():
            if what is not None:
                raise BeitDataError(f"{what} not found: {folder}")
            return []
        return sorted(Location(p) for p in Path(folder).glob(f"*{suffix}") if p.is_file())
    fs, path = filesystem(folder)
    with remote_errors(folder, "listing"):
        fs.invalidate_cache(path)
        try:
            entries = fs.ls(path.rstrip("/"), detail=True)
        except FileNotFoundError:
            if "/" not in path.strip("/") or folder.scheme.startswith("http"):
                raise
            fs.ls(path.split("/", 1)[0])  # the bucket is there: an empty prefix
            entries = []
    return _urls(folder, [e["name"] for e in entries if e.get("type") != "directory" and e["name"].endswith(suffix)])


def _urls(like: Location, names: Sequence[str]) -> list[Location]:
    """A file system's names (``bucket/key``) as sorted locations of ``like``'s scheme."""
    return sorted(Location(n if Location(n).kind == "url" else f"{like.scheme}://{n}") for n in names)


def _is_folder(location: Location) -> bool:
    """Whether a location names a folder (a URL ending in ``/``, or a prefix with objects under it)."""
    if location.is_local:
        return os.path.isdir(location)
    if location.endswith("/"):
        return True
    if location.scheme.startswith("http"):
        return False
    fs, path = filesystem(location)
    with remote_errors(location):
        fs.invalidate_cache(path)
        return bool(fs.isdir(path))


def expand(spec: str, suffix: str, what: str) -> list[Location]:
    """The files a spec names: a folder (its ``suffix`` files), a brace pattern, a glob or one
    file; local or URLs (a prefix is listed once, named objects are checked against one listing
    of their folder, HTTP servers, which cannot be listed, are asked object by object);
    ``pipe:`` commands brace-expanded as they are.

    Raises:
        BeitDataError: ``{what} not found: ...`` for a named file that is not there.
    """
    from braceexpand import braceexpand

    location = Location(spec)
    if location.kind == "pipe":
        return [Location(c) for c in braceexpand(spec)]
    magic = "*[" if location.scheme.startswith("http") else "*?["  # an HTTP URL's ? starts its query
    if not any(c in spec for c in "{" + magic) and _is_folder(location):
        return list_files(location, suffix)
    found: list[Location] = []
    listings: dict[str, set[str]] = {}
    for expanded in map(Location, braceexpand(spec)):
        body = expanded.partition("://")[2] if expanded.kind == "url" else expanded
        if any(c in body for c in magic):
            found += _glob_files(expanded)
        elif _named_file_exists(expanded, listings):
            found.append(expanded)
        else:
            raise BeitDataError(f"{what} not found: {expanded}")
    return found


def _glob_files(pattern: Location) -> list[Location]:
    if pattern.is_local:
        return sorted(Location(p) for p in _glob.glob(pattern))
    fs, path = filesystem(pattern)
    with remote_errors(pattern, "listing"):
        fs.invalidate_cache()
        found = fs.glob(path)
        if not found and not pattern.scheme.startswith("http"):  # a missing bucket globs to nothing: say so
            fs.ls(path.split("/", 1)[0])
    return _urls(pattern, found)


def _named_file_exists(location: Location, listings: dict[str, set[str]]) -> bool:
    if location.is_local or location.scheme.startswith("http"):
        return os.path.isfile(location) if location.is_local else exists(location)
    parent = location.parent
    if parent not in listings:
        listings[parent] = set(list_files(parent, ""))
    return location in listings[parent]
