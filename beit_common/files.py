"""Files beit-data writes: atomically, into folders proven writable, under a lock, never elsewhere.

Every file is written under a temporary name and renamed (a local file) or uploaded in one
call (an object): a killed process leaves the old file or none, never half of one, and its
temporary file is removed at the next start of the same run. A temporary name carries the
host and the pid of its writer (``temp_name``), so that on a file system several nodes share,
each node removes only what its own dead processes left. ``output_location`` refuses
what cannot be written to (a ``pipe:`` command, a URL where only a local path will do).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from beit_common import cache, storage
from beit_common.errors import BeitDataError
from beit_common.location import Location

__all__ = ["upload", "probe_writable", "write_atomic", "write_text_atomic", "save_atomic", "copy_atomic",
           "remove_file", "ensure_writable_dir", "output_location", "output_file", "temp_name", "temp_writer",
           "remove_stale_temps", "remove_stale_uploads", "shared_file_system", "describe_file", "folder_lock", "umask",
           "LOCK_NAME"]


def upload(local: str | os.PathLike, url: str, chunk_size: int | None = None) -> None:
    """Put a finished local file at ``url`` in one call: a single PUT, or (past ``chunk_size``,
    s3fs's 50 MiB by default) a multipart upload that is completed only after its last part, so
    the object appears whole or not at all."""
    fs, path = storage.filesystem(url)
    with storage.remote_errors(url, "upload"):
        fs.put_file(str(local), path, **({"chunksize": chunk_size} if chunk_size else {}))
        fs.invalidate_cache(path)


def probe_writable(prefix: str) -> None:
    """Write and delete one small object under ``prefix``: a missing bucket, missing credentials
    or a denied write show before any work is done."""
    import socket
    import uuid

    probe = Location(prefix) / f".beit-data-write-test-{socket.gethostname()}-{uuid.uuid4().hex[:12]}"
    fs, path = storage.filesystem(probe)
    with storage.remote_errors(prefix, "writing"):
        fs.pipe_file(path, b"")
        fs.rm_file(path)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path | str:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    A process killed mid-write leaves the old file (or none), never half a file. For an object
    storage URL, ``tmp`` is a local file that is then uploaded in one call (``upload``). A local
    file gets the permissions ``open`` would give it (``0666`` less the umask), whatever
    ``write`` created ``tmp`` with: safetensors, for one, writes ``0600``.

    Raises:
        BeitDataError: When the write fails (a full disk, no permission), naming ``path``;
            the temporary file is removed and ``path`` is left as it was.
    """
    remote = not Location(path).is_local
    if remote:  # written here, then uploaded whole: the object appears complete or not at all
        tmp = cache.temp_file(path)
    else:
        path = Path(path)
        tmp = path.with_name(temp_name(path.name))
    try:
        write(tmp)
        if remote:
            upload(tmp, str(path))
        else:
            os.chmod(tmp, 0o666 & ~umask())
            os.replace(tmp, path)
    except OSError as exc:
        raise BeitDataError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # the folder itself went away; there is nothing left to clean
    return path


def umask() -> int:
    """This process's umask, read (from ``/proc`` on Linux) without setting it: setting and
    restoring it would race the other threads' file creations."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def save_atomic(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename: a kill never leaves half a file."""
    import torch

    def save(tmp: Path) -> None:
        # Through a file object, so that a full disk raises OSError (ENOSPC) rather than an
        # "unexpected pos" error from torch's own writer.
        with open(tmp, "wb") as f:
            try:
                torch.save(obj, f)
            except RuntimeError as exc:  # torch's writer fails again while closing after an OSError
                if isinstance(exc.__context__, OSError):
                    raise exc.__context__ from None
                raise

    return write_atomic(path, save)


def copy_atomic(source: str | os.PathLike, target: str | os.PathLike) -> Path | str:
    """Make ``target`` a copy of the finished file ``source``, appearing whole, without writing
    its bytes again where the storage allows.

    A local ``target`` is a hard link to ``source`` made under a temporary name and renamed
    (where the file system has no hard links, or not across those folders, a copy under that
    name); an object is copied by the server in one call, so it appears whole or not at all.
    A linked ``source`` must never be rewritten in place, only replaced by a rename, as
    ``write_atomic`` does: the link keeps the bytes it was made of.

    Raises:
        BeitDataError: When it cannot be made, naming ``target``; ``target`` is left as it was.
    """
    source, target = Location(source), Location(target)
    if target.is_local:
        return write_atomic(target, lambda tmp: _link_or_copy(source.path, tmp))
    if source.is_local:
        upload(source, str(target))
        return target
    fs, path = storage.filesystem(target)
    with storage.remote_errors(target, "copy"):
        fs.copy(storage.filesystem(source)[1], path)
        fs.invalidate_cache(path)
    return target


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except FileNotFoundError:
        raise
    except OSError:  # no hard links on this file system (FAT, many FUSE mounts), across devices, or too many
        shutil.copyfile(source, target)


def remove_file(location: str | os.PathLike) -> None:
    """Delete a file or an object, whole; one that is already gone is no error."""
    location = Location(location)
    if location.is_local:
        location.path.unlink(missing_ok=True)
        return
    fs, path = storage.filesystem(location)
    with storage.remote_errors(location, "deleting"):
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass
        fs.invalidate_cache(path)


def output_location(location: str | os.PathLike, what: str, *, remote: bool = True) -> Path | str:
    """Where ``what`` is to be written: a local ``Path``, or an object-storage URL where ``remote``.

    Raises:
        BeitDataError: For a ``pipe:`` command (a shell command is never run to write), or a URL
            where only a local path will do, in one line naming ``what``.
    """
    location = Location(location)
    if location.kind == "pipe":
        raise BeitDataError(f"`out` {location}: {what} is not written through a pipe: command; give a folder or a "
                            "file")
    if location.kind == "url":
        if not remote:
            raise BeitDataError(f"`out` {location}: {what} is written to a local path only; write it here and copy "
                                "it to object storage")
        return location
    return Path(location)


def output_file(location: str | os.PathLike, what: str, *, remote: bool = True,
                overwrite: bool = True) -> Path | str:
    """Where the file ``what`` is to be written, with its folder made and proven writable.

    Raises:
        BeitDataError: For a location ``output_location`` refuses, an existing file without
            ``overwrite``, or a folder that cannot be written.
    """
    location = output_location(location, what, remote=remote)
    if not overwrite and storage.exists(location):
        raise BeitDataError(f"{location} exists; pass `overwrite` to replace it")
    ensure_writable_dir(Location(location).parent)
    return location


def temp_name(name: str) -> str:
    """``.NAME.tmp-HOST-PID``: the name ``write_atomic`` writes ``name`` under until it is whole.
    Whose it is goes in the name: a later start removes it once that process is gone, which only
    its own host can tell."""
    return f".{name}.tmp-{socket.gethostname()}-{os.getpid()}"


def temp_writer(name: str) -> tuple[str | None, int] | None:
    """The host and pid that wrote the temporary file ``name``: ``.X.tmp-HOST-PID`` (``temp_name``),
    ``.X.tmp-HOST-PID-RANDOM.part`` (an upload on its way, ``cache.temp_file``) or the older
    ``.X.tmp-PID`` (host None: written on this one); None for a name of neither form. Host names
    may hold ``-`` and ``.``: the fields are read from the right."""
    if ".tmp-" not in name:
        return None
    tag = name.rsplit(".tmp-", 1)[1]
    if tag.endswith(".part"):
        tag = tag[: -len(".part")].rpartition("-")[0]
    host, _, pid = tag.rpartition("-")
    return (host or None, int(pid)) if pid.isdigit() else None


def remove_stale_temps(folder: str | os.PathLike, name: str = "*") -> list[Path]:
    """Remove the temporary files that killed processes of this host left in ``folder`` (``temp_name``:
    written by ``write_atomic``, or an upload's ``cache.temp_file``), of ``name`` only where given;
    returns what was removed. Another host's are left to it: on a file system nodes share, only the
    writer's host can tell whether its process is gone."""
    removed = []
    if not Location(folder).is_local:
        return removed  # an object is uploaded whole from a local file: none is left half-written
    folder, host = Path(folder), socket.gethostname()
    for tmp in folder.glob(f".{name}.tmp-*") if folder.is_dir() else ():
        writer = temp_writer(tmp.name)
        if writer is not None and writer[0] in (None, host) and not _alive(writer[1]):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def remove_stale_uploads() -> list[Path]:
    """Remove the local copies of objects on their way up (``$BEIT_DATA_CACHE/uploads``) that killed
    processes of this host left: each is a whole file's size."""
    return remove_stale_temps(cache.cache_root() / "uploads")  # where there is none, none is made


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# File systems that several machines mount: what one node writes there, the others read.
SHARED_FILE_SYSTEMS = frozenset({"nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "smbfs", "ceph",
                                 "glusterfs", "fuse.glusterfs", "cephfs", "fuse.ceph-fuse", "wekafs", "fuse.juicefs",
                                 "fuse.gcsfuse", "fuse.s3fs", "fuse.mountpoint-s3", "fuse.rclone", "pvfs2",
                                 "orangefs", "panfs", "afs", "quobyte"})


def shared_file_system(path: str | os.PathLike, mounts: str | None = None) -> str | None:
    """The type of the file system under ``path`` where other machines mount it too (``nfs4``,
    ``lustre``...), or None for one of this machine's own (a disk, a tmpfs), from the mount table
    (``/proc/self/mounts``, or ``mounts``: its text). ``path`` need not exist yet."""
    if mounts is None:
        try:
            mounts = Path("/proc/self/mounts").read_text()
        except OSError:
            return None
    target = os.path.abspath(path)
    best, kind = "", None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind if kind in SHARED_FILE_SYSTEMS else None


def ensure_writable_dir(folder: str | os.PathLike) -> Path | str:
    """Create ``folder`` if needed and prove a file can be written in it.

    Raises:
        BeitDataError: With the operating system's reason, before any work is done.
    """
    if not Location(folder).is_local:  # a prefix: one small object written and deleted
        probe_writable(folder)
        return Location(folder)
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".beit-data-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise BeitDataError(f"cannot write to output folder {folder}: {exc.strerror or exc}") from None
    return folder


def describe_file(path: str | os.PathLike) -> str:
    """What a file looks like from its first bytes, for error messages: ``a text file``, ``a zip archive``..."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if not head:
        return "an empty file"
    kinds = ((b"PK\x03\x04", "a zip archive"), (b"PAR1", "a Parquet file"), (b"\xff\xd8\xff", "a JPEG image"),
             (b"\x89PNG", "a PNG image"), (b"\x80", "a Python pickle"), (b"{", "a JSON or text file"))
    for magic, kind in kinds:
        if head.startswith(magic):
            return kind
    if head[257:262] == b"ustar":
        return "a tar archive"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return f"binary data starting {head[:8].hex()}"
    return f"a text file starting {head[:24].decode('utf-8', 'replace')!r}"


LOCK_NAME = ".beit-data.lock"


@contextmanager
def folder_lock(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` while the block runs; refuse if another run holds it.

    The lock is an ``flock`` on ``folder/.beit-data.lock``: the kernel releases it when the
    process ends, however it ends, so a crashed run never leaves a stale lock. It is only as
    good as the file system's ``flock``: local disks and most cluster file systems.

    Object storage has no lock that its holder's death releases, so for a prefix the lock is
    a local file named after the URL (under ``$BEIT_DATA_CACHE/locks``): it keeps a second run
    on the same machine out, not a run on another machine.

    Raises:
        BeitDataError: Naming the run that holds the folder.
    """
    if not Location(folder).is_local:
        path = cache.cache_dir("locks") / f"{cache.cache_key(folder)}.lock"
    else:
        path = Path(folder) / LOCK_NAME
    try:
        handle = open(path, "a+")
    except OSError as exc:
        raise BeitDataError(f"cannot write to output folder {folder}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise BeitDataError(f"{folder} is in use by another beit-data run ({holder}); wait for it to finish "
                                "or choose another output folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{what}, pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        yield
    finally:
        handle.close()
