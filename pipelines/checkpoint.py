"""The pretrain checkpoint: one file, one layout, read by ``--resume`` and ``export`` alike.

``RUN/checkpoint.pt`` is a dict of plain tensors and Python values (it loads with
``weights_only=True``):

- ``model``, ``optimizer``, ``scheduler``: state dicts;
- ``step``: optimizer steps taken; ``stream``: the stream's next position ``(epoch, step)``;
- ``rng``: ``cpu``, one torch CPU generator state per rank, and ``cuda``, this GPU's;
- ``config``: the resolved ``PretrainConfig`` as a dict;
- ``model_name``, ``vocab_size`` and ``model_args`` (embed_dim, depth, num_heads): what
  rebuilds the model without the config.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from beit_common import BeitDataError, save_atomic

__all__ = ["CHECKPOINT", "checkpoint_path", "save_checkpoint", "load_checkpoint", "model_from_checkpoint"]

CHECKPOINT = "checkpoint.pt"
KEYS = ("model", "optimizer", "scheduler", "step", "stream", "rng", "config", "model_name", "vocab_size",
        "model_args")


def checkpoint_path(run: str | os.PathLike) -> Path:
    return Path(run) / CHECKPOINT


def save_checkpoint(path: str | os.PathLike, *, model, optimizer, scheduler, step: int,
                    stream: tuple[int, int], rng_cpu: list, rng_cuda: list, config: dict, model_name: str) -> Path:
    """Write the checkpoint atomically: a kill never leaves half a file."""
    return save_atomic({
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "step": step, "stream": tuple(stream), "rng": {"cpu": rng_cpu, "cuda": rng_cuda}, "config": config,
        "model_name": model_name, "vocab_size": model.vocab_size,
        "model_args": {"embed_dim": model.embed_dim, "depth": model.depth, "num_heads": model.num_heads},
    }, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint at ``path``, on the CPU.

    Raises:
        BeitDataError: If it is missing, unreadable or not a beit-data pretrain checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise BeitDataError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a damaged file
        raise BeitDataError(f"{path} is not a readable checkpoint: {str(exc).strip().splitlines()[0][:200]}") from None
    missing = [k for k in KEYS if k not in ckpt] if isinstance(ckpt, dict) else list(KEYS)
    if missing:
        raise BeitDataError(f"{path} is not a beit-data pretrain checkpoint (missing {', '.join(missing)})")
    return ckpt


def model_from_checkpoint(ckpt: dict) -> torch.nn.Module:
    """The trained model of a checkpoint, on the CPU, with its weights loaded."""
    from pipelines.training import build_model

    model = build_model(ckpt["model_name"], ckpt["vocab_size"], layer_scale=ckpt["config"]["layer_scale"])
    model.load_state_dict(ckpt["model"])
    return model
