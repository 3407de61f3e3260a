"""Devices, precision and the process group: what the stages need to run, and nothing below them does."""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from beit_common import BeitDataError

__all__ = ["resolve_device", "autocast", "deterministic_on_cpu", "DistInfo", "dist_info", "init_distributed"]


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
    """This process's place under torchrun (RANK, WORLD_SIZE, LOCAL_RANK), or a single process."""
    try:
        return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                        int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as exc:
        raise BeitDataError(f"bad RANK/WORLD_SIZE/LOCAL_RANK in the environment: {exc}") from None


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group when launched by torchrun: nccl on GPUs, gloo on the CPU."""
    info = dist_info()
    if info.world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info
