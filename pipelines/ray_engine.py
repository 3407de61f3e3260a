"""The Ray engine of ``tokenize``: a Ray cluster for the run, and a pool of workers on it that take
one shard at a time and start a dead worker's shard again, a bounded number of times.

**A pool of plain actors, not Ray Data.** Each worker is a Ray actor that builds its
``ShardRunner`` (one tokenizer and one DALI pipeline) once and then takes one task a call; this
process hands the tasks out from a queue. Ray Data's actor pool (``map_batches`` with
``ActorPoolStrategy``) would do the handing out, but not the retries the way a fleet needs
them: its pools restart a crashed actor forever (``max_restarts=-1`` by default, and its pool
assumes so), a task's retries happen where the driver cannot count them, and a task that runs
out of them fails the whole dataset or, with ``max_errored_blocks``, is dropped without its
reason. A shard's work is its own file, written atomically, so Ray Data's blocks, streaming and
object store would carry nothing. Here each actor is made with ``max_restarts=0`` and
``max_task_retries=0``: when a worker dies, its shard is charged one start, queued again (up to
``max_retries`` times, then named as failed while the other shards finish) and a new worker
takes the dead one's place; every new worker follows a death charged to a shard, so the
restarts are bounded too.

**Safe by default.** Without an address, ``ray_cluster`` starts a private Ray for the run and
stops it when the run ends, however it ends (an error, SIGTERM, Ctrl-C): its servers listen on
127.0.0.1 only, it authenticates with a token made for the run and held in no file, and it
writes only under a temporary folder it removes (no ``~/.ray``, no ``/tmp/ray``). It never runs
``ray stop``, which would stop every Ray of the machine. Joining a cluster (``auto`` or
``HOST:PORT``) uses the cluster's own settings and leaves it running.

**No credential in what Ray records.** Ray keeps the driver's command line (as the job's
entrypoint), each actor's creation arguments and the errors tasks raise. Here the entrypoint
Ray records is the command line redacted, what the workers are built from (the job, and the
shards' locations, which may carry a password or a signed URL) reaches them as one object in
Ray's object store (an ``ObjectRef`` inside a list, so Ray neither inlines nor records it),
tasks carry indexes and redacted names, and a worker reports a failure as a redacted message
it returns rather than an exception Ray would keep. Object-storage credentials are never
passed at all: each worker's S3 or GCS client finds them in its own environment, as on any
node of a cluster.

Ray 2.60 has no public setting for two of these: the loopback node address of a private Ray
(``ray_constants.ENABLE_RAY_CLUSTER``, which the ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``
variable sets for the processes Ray starts) and the entrypoint it records
(``ray._private.utils.get_entrypoint_name``). Both are set for the length of ``ray.init``
only, the ``ray`` extra holds Ray to 2.60, and ``tests/system/test_ray_engine.py`` checks the
listening addresses and the job's record.

This is the only module that imports ``ray``, inside its functions.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, deque
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence
from unittest import mock

from beit_common import BeitDataError, Location, os_error, redact
from beit_common.files import shared_file_system

__all__ = ["INSTALL", "PoolSettings", "PoolOutcome", "Cluster", "require_ray", "check_out", "ray_cluster",
           "run_pool", "LOOPBACK"]

INSTALL = "pip install 'beit-data[ray]'"
LOOPBACK = "127.0.0.1"
# A private Ray's object store: the engine puts only small objects there (a job, the shards' results).
OBJECT_STORE_BYTES = 200 * 2**20
WAIT_S = 1.0  # ray.wait returns at least this often, so that SIGTERM and Ctrl-C are seen at once


def require_ray():
    """The ``ray`` module, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise BeitDataError(f"`engine` ray needs Ray, which is not installed: {INSTALL}") from None
    return ray


def check_out(out: Location, address: str | None) -> None:
    """Refuse an ``out`` on this machine's own disk when joining a cluster whose nodes may be other
    machines (an address that is not loopback, or ``auto``): a worker elsewhere would write its
    files onto its own disk. A folder on a file system every node mounts (NFS, Lustre...) is fine.

    Raises:
        BeitDataError: In one line, saying why and what to give instead.
    """
    path = out.local_path()
    if address is None or path is None or _loopback(address):
        return
    if shared_file_system(path) is None:
        raise BeitDataError(f"`out` {out} is on this machine's own disk, which other nodes of the cluster at "
                            f"`ray_address` {address} cannot write to: give an s3:// or gs:// prefix, or a folder on a "
                            "file system every node mounts (NFS, Lustre, GPFS...)")


def _loopback(address: str) -> bool:
    """Whether a Ray address names this machine by its loopback interface (``127.0.0.1:6379``,
    ``localhost:6379``, ``[::1]:6379``, ``ray://127.0.0.1:10001``): a cluster reached there has no
    other machine in it, since no other machine can reach it."""
    host = re.sub(r"^\w+:/+", "", address).rsplit(":", 1)[0].strip("[]")  # ray://HOST:PORT too
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class PoolSettings:
    """The pool's shape: ``workers`` (None: one per GPU of the cluster, or 1 where it has none),
    the GPUs and CPUs each reserves (None GPUs: 1 where the cluster has GPUs, else 0), and the
    starts of a task after the first, each after its worker died."""

    workers: int | None = None
    gpus_per_worker: float | None = None
    cpus_per_worker: float = 1.0
    max_retries: int = 3

    def resolved(self, cluster: Cluster) -> tuple[int, float]:
        """The workers to start and the GPUs each reserves, on ``cluster``."""
        gpus = self.gpus_per_worker if self.gpus_per_worker is not None else (1.0 if cluster.gpus else 0.0)
        if self.workers is not None:
            return self.workers, gpus
        return (max(1, int(cluster.gpus / gpus)) if gpus else 1), gpus


@dataclass(frozen=True)
class Cluster:
    """The Ray the run uses: its address, whether this run started it, its resources when joined,
    and how long starting (or joining) it took."""

    address: str
    private: bool
    cpus: float
    gpus: float
    start_s: float


@dataclass
class PoolOutcome:
    """What the pool did: the tasks started again after their worker died (``retried``), those
    given up on with why (``failed``), and where its time went (``seconds``: ``workers``, until the
    first workers were all ready; ``tasks``, from then until the last task was done)."""

    retried: int = 0
    failed: list[tuple[object, str]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


# ---- the cluster ----


@contextmanager
def ray_cluster(address: str | None) -> Iterator[Cluster]:
    """Ray for the length of the block: a private one on this machine (``address`` None), or the
    cluster at ``address`` (``auto``: the one this machine belongs to, or ``RAY_ADDRESS``), joined.
    On the way out, whatever ends the block, the private Ray is stopped and its folder removed, or
    the cluster is left; SIGTERM ends the block as an exit (status 143) does."""
    ray = require_ray()
    started = time.perf_counter()
    with ExitStack() as stack:
        if address is None:
            folder = stack.enter_context(_temporary_folder())
            stack.enter_context(_private_environment())
        # For a private Ray, ray.shutdown also stops the processes ray.init started, and no other
        # (also those of an init cut short); it does nothing before an init.
        stack.callback(ray.shutdown)
        if address is None:
            _init(ray, private=True, address="local", include_dashboard=False, _temp_dir=folder,
                  object_store_memory=OBJECT_STORE_BYTES)
        else:
            try:
                _init(ray, private=False, address=address)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise BeitDataError(f"cannot join the Ray cluster at `ray_address` {address}: "
                                    f"{redact(str(exc).splitlines()[0])}") from None
        stack.enter_context(_sigterm_exits())
        gcs = ray.get_runtime_context().gcs_address
        if address is None and not gcs.startswith(f"{LOOPBACK}:"):  # what _init makes sure of, checked
            raise BeitDataError(f"the private Ray started at {gcs}, not on {LOOPBACK} only: refused")
        resources = ray.cluster_resources()
        yield Cluster(gcs, address is None, resources.get("CPU", 0.0), resources.get("GPU", 0.0),
                      time.perf_counter() - started)


def _init(ray, private: bool, **kwargs) -> None:
    """``ray.init`` quietly (warnings only; the workers' output stays in their logs), recording the
    command line redacted as the job's entrypoint. A private Ray, or a cluster joined at a loopback
    address, is on loopback: Ray would otherwise take this machine's outward address for
    ``127.0.0.1``, which a private Ray must not listen on and a loopback cluster does not."""
    from ray._private import ray_constants
    from ray._private import utils as ray_utils

    entrypoint = redact(shlex.join(sys.argv))
    _reread_authentication()
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(ray_utils, "get_entrypoint_name", lambda: entrypoint))
        if private or _loopback(kwargs["address"]):
            stack.enter_context(mock.patch.object(ray_constants, "ENABLE_RAY_CLUSTER", False))
        ray.init(logging_level=logging.WARNING, log_to_driver=False, **kwargs)


@contextmanager
def _temporary_folder() -> Iterator[str]:
    # Under the system's temporary folder, not the run's: Ray's socket paths must stay short (107 bytes).
    folder = tempfile.mkdtemp(prefix="beit-ray-")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def _private_environment() -> Iterator[None]:
    """The environment the private Ray's processes start with, and this one runs in meanwhile: a
    node address on loopback (Ray's servers then bind to 127.0.0.1), and token authentication
    with a token made for this run, given in the environment so that none is written to
    ``~/.ray/auth_token``."""
    values = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
              "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _reread_authentication()


def _reread_authentication() -> None:
    """Have this process's Ray take its authentication mode and token from the environment again:
    it reads them when first imported and keeps them (as Ray's own ``ray get-auth-token`` does)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM (a preemption, ``scancel``, ``kill``) raises ``SystemExit(143)`` in this process while
    the block runs, so the block's way out stops what it started; ``ray.init`` put its own handler
    in, which is replaced, and the one before it is put back. Ray turns an exception a handler
    raises inside ``ray.wait`` into ``SystemExit(1)``: the status is given back its number."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def stop(signum, frame):
        received.append(signum)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except SystemExit:
        if received:
            raise SystemExit(128 + received[0]) from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---- the pool ----


class _Worker:
    """One Ray worker: builds what it runs once, from the object store, then runs one task a call.
    Nothing it raises reaches Ray (which would keep the traceback): a failure is a redacted
    message it returns."""

    def __init__(self, recipe: list):
        import ray

        self.work, self.error = None, None
        try:
            self.work = ray.get(recipe[0])()
        except BaseException as exc:  # noqa: B036 (reported by ready(), never raised to Ray)
            self.error = _said(exc)

    def ready(self) -> tuple[str | None, str | None]:
        """(the error that kept it from starting, or None; a line it has to say, or None)."""
        return self.error, getattr(self.work, "note", None)

    def run(self, task) -> tuple[str, object]:
        """("done", the task's result), ("error", a user's error, redacted) or ("crash", a traceback)."""
        try:
            return "done", self.work(task)
        except (BeitDataError, OSError) as exc:
            return "error", _said(exc)
        except Exception:
            return "crash", redact(traceback.format_exc())

    def sweep(self) -> None:
        if hasattr(self.work, "sweep"):
            self.work.sweep()


def _said(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        exc = os_error(exc)
    return redact(str(exc) if isinstance(exc, BeitDataError) else f"{type(exc).__name__}: {exc}")


def run_pool(tasks: Sequence, build: Callable[[], Callable], settings: PoolSettings, cluster: Cluster,
             on_done: Callable[[object, object], None], on_note: Callable[[str], None] = print) -> PoolOutcome:
    """Run each of ``tasks`` (each with a ``name``) on a pool of workers, each of which calls
    ``build()`` once and then runs one task a call; ``on_done(task, result)`` as each finishes, and
    ``on_note(line)`` for each line the workers have to say (the built object's ``note``), once.

    A worker that dies charges its task one start: the task is queued again, up to
    ``settings.max_retries`` times, then given up on (``failed``) while the rest finish, and a
    new worker takes the dead one's place. Once no task is left, each worker removes what killed
    processes of its host left half-written (the built object's ``sweep``).

    Raises:
        BeitDataError: A task's error (the tasks already running finish first), a worker that
            could not build what it runs, or workers that die while starting, ``max_retries``
            times in a row, or none of which fits the private Ray.
    """
    ray = require_ray()
    outcome, started = PoolOutcome(), time.perf_counter()
    workers, gpus = settings.resolved(cluster)
    workers = _fitting(min(workers, len(tasks)), gpus, settings.cpus_per_worker, cluster)
    actor = ray.remote(_Worker).options(num_cpus=settings.cpus_per_worker, num_gpus=gpus, max_restarts=0,
                                        max_task_retries=0)
    recipe = [ray.put(build)]  # in the object store: an ObjectRef inside a list is neither inlined nor recorded
    pool = _Pool(ray, lambda: actor.remote(recipe), settings.max_retries, on_note)
    try:
        for _ in range(workers):
            pool.start()
        error = pool.run(deque(tasks), outcome, on_done)
        ready = pool.ready_at or time.perf_counter()
        outcome.seconds = {"workers": ready - started, "tasks": time.perf_counter() - ready}
        if error is not None:
            raise error
        pool.finish_starting()
        sweeps = [worker.sweep.remote() for worker in pool.idle]
        ray.wait(sweeps, num_returns=len(sweeps), timeout=60)  # at its best: a worker lost now changes no file
    finally:
        pool.stop()
    return outcome


def _fitting(workers: int, gpus: float, cpus: float, cluster: Cluster) -> int:
    """How many of ``workers`` to start: on a private Ray, those its resources hold (none is
    refused: they would wait for a node that never comes); on a joined cluster all, saying so
    when it holds fewer now (its autoscaler may add nodes)."""
    fit = min(int(cluster.cpus // cpus) if cpus else workers, int(cluster.gpus // gpus) if gpus else workers)
    if fit >= workers:
        return workers
    said = (f"{workers} Ray workers of {cpus:g} CPUs and {gpus:g} GPUs each, but the cluster holds "
            f"{cluster.cpus:g} CPUs and {cluster.gpus:g} GPUs")
    if cluster.private and fit == 0:
        raise BeitDataError(f"{said}: none would start; lower `cpus_per_worker` or `gpus_per_worker`")
    print(f"tokenize: {said}: " + (f"starting {fit}" if cluster.private else f"{fit} start now, the others wait "
                                   "for room"), file=sys.stderr)
    return fit if cluster.private else workers


class _Pool:
    """The workers and the tasks they hold, for ``run_pool``."""

    def __init__(self, ray, new_worker: Callable, max_retries: int, on_note: Callable[[str], None]):
        self.ray, self.new_worker, self.max_retries, self.on_note = ray, new_worker, max_retries, on_note
        self.idle: list = []
        self.starting: dict = {}  # ready() reference -> worker
        self.running: dict = {}  # run() reference -> (worker, task)
        self.notes: set[str] = set()
        self.start_deaths = 0  # workers in a row that died before they were ready
        self.ready_at: float | None = None  # when no worker of the first ones was still starting

    def start(self) -> None:
        worker = self.new_worker()
        self.starting[worker.ready.remote()] = worker

    def run(self, queue: deque, outcome: PoolOutcome, on_done) -> Exception | None:
        """Hand out ``queue`` until every task is done or given up on; the first task's error is
        returned once the running tasks are done (each writes its own file: none is cut short)."""
        starts, error = Counter(), None
        while queue or self.running:
            while self.idle and queue and error is None:
                worker, task = self.idle.pop(), queue.popleft()
                self.running[worker.run.remote(task)] = (worker, task)
            if error is not None and not self.running:
                break
            ready, _ = self.ray.wait([*self.running, *self.starting], num_returns=1, timeout=WAIT_S)
            for ref in ready:
                if ref in self.starting:
                    self._started(ref, bool(queue))
                    continue
                worker, task = self.running.pop(ref)
                try:
                    status, value = self.ray.get(ref)
                except self.ray.exceptions.RayActorError as exc:
                    self._lost(worker)
                    starts[task] += 1
                    if starts[task] > self.max_retries:
                        outcome.failed.append((task, f"its worker died {starts[task]} times ({_death(exc)})"))
                    else:
                        outcome.retried += 1
                        queue.appendleft(task)
                    if queue:
                        self.start()
                    continue
                self.idle.append(worker)
                if status == "done":
                    on_done(task, value)
                elif error is None:
                    error = BeitDataError(value) if status == "error" else \
                        RuntimeError(f"a Ray worker failed on {task.name}:\n{value}")
                    queue.clear()
            if not (self.idle or self.starting or self.running) and queue:
                self.start()
        return error

    def _started(self, ref, wanted: bool) -> None:
        worker = self.starting.pop(ref)
        try:
            error, note = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as exc:
            self._lost(worker)
            self.start_deaths += 1
            if self.start_deaths > self.max_retries:
                raise BeitDataError(f"Ray workers died while starting, {self.start_deaths} times in a row "
                                    f"({_death(exc)})") from None
            if wanted:
                self.start()
            return
        if error is not None:
            raise BeitDataError(f"a Ray worker could not start: {error}")
        self.start_deaths = 0
        if note and note not in self.notes:
            self.notes.add(note)
            self.on_note(note)
        self.idle.append(worker)
        if not self.starting and self.ready_at is None:
            self.ready_at = time.perf_counter()

    def finish_starting(self) -> None:
        """Wait for the workers still starting (a death may have started one that no task needed
        since), and start one where none is left: every worker that is up sweeps its host."""
        if not (self.idle or self.starting):
            self.start()
        for ref in list(self.starting):
            self._started(ref, wanted=False)

    def _lost(self, worker) -> None:
        self.ray.kill(worker, no_restart=True)

    def stop(self) -> None:
        """End every worker: they are this run's alone."""
        for worker in [*self.idle, *self.starting.values(), *(w for w, _ in self.running.values())]:
            self.ray.kill(worker, no_restart=True)
        self.idle, self.starting, self.running = [], {}, {}


def _death(exc: BaseException) -> str:
    """The first sentence of why Ray says a worker died, redacted."""
    lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip() and not line.startswith("\t")]
    said = (lines[0] if lines else str(exc).splitlines()[0]).split(". ")[0].rstrip(".")
    return redact(said)
