"""Devices, precision and the process group: what the stages need to run, and nothing below them does."""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from beit_common import BeitDataError

__all__ = ["resolve_device", "autocast", "deterministic_on_cpu", "DistInfo", "dist_info", "init_distributed",
           "slurm_env", "first_host", "gather_dealt", "all_ranks_ok"]


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
    """bf16 autocast on a GPU; a no-op context on the CPU (fp32 there)."""
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


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


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def dist_info() -> DistInfo:
    """This process's place under torchrun (RANK, WORLD_SIZE, LOCAL_RANK), under ``srun`` (see
    ``slurm_env``), or a single process."""
    env = {**slurm_env(os.environ), **os.environ}
    try:
        return DistInfo(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
    except ValueError as exc:
        raise BeitDataError(f"bad RANK/WORLD_SIZE/LOCAL_RANK in the environment: {exc}") from None


def slurm_env(environ) -> dict[str, str]:
    """torchrun's variables for a task that ``srun`` started, where torchrun's own are absent:
    RANK, WORLD_SIZE and LOCAL_RANK from the step's task id, task count and local id, and the
    rendezvous (MASTER_ADDR: the step's first node; MASTER_PORT: from the job id) unless set.
    Empty outside an ``srun`` step of more than one task, or under torchrun."""
    # SLURM_STEP_NUM_TASKS is srun's alone: a command the batch script runs itself (where
    # SLURM_PROCID is 0 and SLURM_NTASKS the job's) is one process, not rank 0 of many.
    tasks = environ.get("SLURM_STEP_NUM_TASKS", "1")
    if "RANK" in environ or "SLURM_PROCID" not in environ or tasks == "1":
        return {}
    nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or "localhost"
    # A port per job and step: two multi-task steps of one job at once do not collide.
    port = 20000 + (int(environ.get("SLURM_JOB_ID", "0")) + 1000 * int(environ.get("SLURM_STEP_ID", "0") or 0)) % 20000
    return {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": tasks, "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
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
