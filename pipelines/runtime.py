"""Devices, precision and the process group: what the stages need to run, and nothing below them does."""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Mapping

import torch

from beit_common import BeitDataError
from pipelines.config import check_precision

__all__ = ["resolve_device", "autocast", "Precision", "resolve_precision", "deterministic_on_cpu", "same_threads",
           "same_mkl_mode", "DistInfo", "dist_info", "init_distributed", "slurm_env", "first_host", "gather_dealt",
           "all_ranks_ok"]


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` is this rank's GPU where CUDA is present, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BeitDataError("`device` is cuda, but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on a GPU; a no-op context on the CPU (fp32 there). What evaluation and the
    benchmarks use; training takes its ``Precision``."""
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Precision:
    """How a stage computes on its device: ``bf16`` or ``fp16`` autocast (fp16 with a gradient
    scaler when training), or plain ``fp32``. The weights and the optimizer stay float32."""

    name: str  # bf16 | fp16 | fp32
    device_type: str  # cuda | cpu

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's inputs and of its autocast region."""
        return _DTYPES[self.name]

    def autocast(self):
        """The forward pass's context: autocast to ``dtype``, or nothing for fp32."""
        if self.name == "fp32":
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def worth_saying(self) -> bool:
        """Whether a run's start names it: on a GPU, or where it was asked for; the CPU's fp32 goes
        without saying (and a one-line error stays one line)."""
        return self.device_type == "cuda" or self.name != "fp32"

    def scaler(self) -> torch.amp.GradScaler:
        """The gradient scaler of a training step: enabled for fp16 only (bf16 has fp32's range);
        a disabled one passes the loss and the step through unchanged."""
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")


def resolve_precision(name: str, device: torch.device) -> tuple[Precision, str]:
    """The precision of ``name`` on ``device`` and the line that says why. ``auto`` is bf16 on a
    GPU that computes it natively (Ampere and later), fp16 on one that would emulate it (V100,
    T4: torch runs bf16 there, slowly), and fp32 on the CPU."""
    check_precision(name)
    gpu = device.type == "cuda"
    if name == "auto":
        if not gpu:
            return Precision("fp32", device.type), "fp32 on the CPU"
        gpu_name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return Precision("bf16", "cuda"), f"bf16 autocast: {gpu_name} computes bf16 natively"
        return Precision("fp16", "cuda"), (f"fp16 autocast with a gradient scaler: {gpu_name} has no native bf16 "
                                           "(--precision bf16 would be emulated, and slow)")
    said = {"bf16": "bf16 autocast", "fp16": "fp16 autocast with a gradient scaler", "fp32": "fp32"}[name]
    return Precision(name, device.type), f"{said}, as asked"


@contextmanager
def deterministic_on_cpu(device: torch.device):
    """Torch's deterministic algorithms on the CPU, for as long as the block runs.

    Some CPU backward kernels (the gradient of the shared relative-position bias among them)
    sum in an order that depends on thread timing when another process loads the CPU, which
    moves the last bits of a float32 result; exact resume compares losses bitwise. GPUs keep
    the fast kernels.
    """
    before = torch.are_deterministic_algorithms_enabled()
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def same_mkl_mode(saved: str | None, device: torch.device) -> str | None:
    """A line for a CPU resume whose MKL reproducible mode (``MKL_CBWR``, read by MKL once, when
    torch loads) is not the one the run was saved with: the kernels differ, so do the last bits.
    None when they agree, on a GPU, or for a checkpoint that predates the record."""
    now = os.environ.get("MKL_CBWR")
    if device.type != "cpu" or saved is None or saved == now:
        return None
    return (f"the run was saved with MKL_CBWR={saved} and this process has MKL_CBWR={now}: the losses will differ "
            f"bitwise from an uninterrupted run's; export MKL_CBWR={saved} before the command to resume bitwise")


def same_threads(saved: int | None, device: torch.device) -> str | None:
    """Set torch's CPU thread count to ``saved``, the count a run was saved with, for a resume on
    the CPU to go on bit for bit: a float32 reduction splits its sum by thread, so another count
    moves the last bits (torchrun sets OMP_NUM_THREADS=1; srun and a shell leave torch one
    thread per core). GPU runs are left alone: their arithmetic is on the GPU.

    Returns:
        A line to tell the user, or None when nothing changed.
    """
    now = torch.get_num_threads()
    if device.type != "cpu" or saved == now:
        return None
    if saved is None:
        return (f"the checkpoint does not record torch's CPU thread count (it predates it); the run goes on with "
                f"{now}, and its losses differ bitwise from an uninterrupted run's unless that had {now} too")
    try:
        torch.set_num_threads(saved)
    except (RuntimeError, TypeError, ValueError):
        pass
    if torch.get_num_threads() != saved:
        return (f"torch's CPU threads are {now}, not the {saved} the run was saved with, and cannot be set: the "
                "losses will differ bitwise from an uninterrupted run's")
    return f"torch's CPU threads set to {saved}, as the run was saved with (this process had {now}), to resume bitwise"


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
SLURM = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID")  # the same, as srun gives a task


def dist_info(environ: Mapping[str, str] | None = None) -> DistInfo:
    """This process's place under torchrun (RANK, WORLD_SIZE, LOCAL_RANK), under ``srun`` (see
    ``slurm_env``), or a single process: every command that reads ranks reads them here.

    An environment that gives its place in part, or an impossible one, is refused: a process
    that takes ``RANK=1`` alone for one process of one would skip the shards of rank 0, and one
    that waits for ranks that never come would hang.

    Raises:
        BeitDataError: Naming the variable and what to set.
    """
    environ = os.environ if environ is None else environ
    from_slurm = slurm_env(environ)
    env, names = ({**environ, **from_slurm}, SLURM) if from_slurm else (environ, TORCHRUN)
    rank_name, world_name, local_name = names
    given = [name for name in TORCHRUN if name in env]
    if not given:
        return DistInfo()
    for needed in ("RANK", "WORLD_SIZE"):
        if needed not in env:
            raise BeitDataError(f"{given[0]} is set ({env[given[0]]}) but {needed} is not: a process of several "
                                "needs RANK and WORLD_SIZE (torchrun and srun set them, with LOCAL_RANK); set "
                                "both, or neither for one process")
    world = _whole(env["WORLD_SIZE"], world_name, least=1)
    rank, local = _whole(env["RANK"], rank_name), _whole(env.get("LOCAL_RANK", "0"), local_name)
    for name, value in ((rank_name, rank), (local_name, local)):
        if value >= world:
            raise BeitDataError(f"{name} is {value}, but {world_name} is {world}: a rank is 0 to {world - 1}")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if world > 1 and not env.get(name)]
    if missing:
        raise BeitDataError(f"{world_name} is {world} but {' and '.join(missing)} {'are' if missing[1:] else 'is'} "
                            "not set: the ranks meet there (torchrun and srun set them); launch with torchrun or srun, "
                            "or unset WORLD_SIZE for one process")
    if world > 1:
        _whole(env["MASTER_PORT"], "MASTER_PORT", least=1)
    return DistInfo(rank, world, local)


def _whole(value: str, name: str, least: int = 0) -> int:
    """``value`` of the variable ``name``, a whole number of at least ``least``."""
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < least:
        raise BeitDataError(f"{name} is {value!r} in the environment; it must be a whole number of {least} or more")
    return number


def slurm_env(environ: Mapping[str, str]) -> dict[str, str]:
    """torchrun's variables for a task that ``srun`` started, where torchrun's own are absent:
    RANK, WORLD_SIZE and LOCAL_RANK from the step's task id, task count and local id, and the
    rendezvous (MASTER_ADDR: the step's first node; MASTER_PORT: from the job id) unless set.
    Empty outside an ``srun`` step of more than one task, or under torchrun (any of its
    variables set: ``dist_info`` checks them).

    Raises:
        BeitDataError: For a Slurm variable that is not a whole number.
    """
    # SLURM_STEP_NUM_TASKS is srun's alone: a command the batch script runs itself (where
    # SLURM_PROCID is 0 and SLURM_NTASKS the job's) is one process, not rank 0 of many.
    if any(name in environ for name in TORCHRUN) or "SLURM_PROCID" not in environ:
        return {}
    tasks = _whole(environ.get("SLURM_STEP_NUM_TASKS", "1"), "SLURM_STEP_NUM_TASKS", least=1)
    if tasks == 1:
        return {}
    nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or "localhost"
    # A port per job and step: two multi-task steps of one job at once do not collide.
    job, step = (_whole(environ.get(name) or "0", name) for name in ("SLURM_JOB_ID", "SLURM_STEP_ID"))
    port = 20000 + (job + 1000 * step) % 20000
    return {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": str(tasks), "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": environ.get("MASTER_ADDR") or first_host(nodes),
            "MASTER_PORT": environ.get("MASTER_PORT") or str(port)}


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``gpu-[003-010,012],cpu01`` -> ``gpu-003``,
    ``node[01-04]-ib`` -> ``node01-ib``."""
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):  # the first entry ends at the first comma outside brackets
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    head = nodelist[:end]
    if "[" not in head:
        return head
    prefix, rest = head.split("[", 1)
    ranges, suffix = rest.split("]", 1)
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group when launched by torchrun or ``srun``: nccl on GPUs, gloo on the CPU."""
    info = dist_info()
    if info.world_size > 1 and not torch.distributed.is_initialized():
        for name, value in slurm_env(os.environ).items():  # env:// reads them from the environment
            os.environ.setdefault(name, value)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info


def gather_dealt(mine: list, count: int, dist: DistInfo) -> list | None:
    """The ``count`` items dealt to the ranks (rank ``r`` holds items ``r, r + W, ...``, in
    ``mine``) back in their order, on rank 0 (None on the others)."""
    if dist.world_size == 1:
        return mine
    parts = [None] * dist.world_size if dist.rank == 0 else None
    torch.distributed.gather_object(mine, parts, dst=0)
    return [parts[i % dist.world_size][i // dist.world_size] for i in range(count)] if dist.rank == 0 else None


def all_ranks_ok(ok: bool, dist: DistInfo, device: torch.device) -> bool:
    """Whether every rank got through its part (one small all-reduce), so that none waits in a
    collective for a rank that failed."""
    if dist.world_size == 1:
        return ok
    flag = torch.tensor([int(ok)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())
