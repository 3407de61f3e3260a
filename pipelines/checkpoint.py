"""The pretrain checkpoint: one file, one layout, read by ``--resume`` and ``export`` alike.

``RUN/checkpoint.pt`` is a dict of plain tensors and Python values (it loads with
``weights_only=True``):

- ``model``, ``optimizer``, ``scheduler``: state dicts;
- ``step``: optimizer steps taken; ``stream``: the stream's next position ``(epoch, step)``;
- ``rng``: ``cpu`` and ``cuda``, one torch generator state per rank each (``cuda`` empty on the CPU);
- ``config``: the resolved ``PretrainConfig`` as a dict;
- ``model_name``, ``vocab_size`` and ``model_args`` (embed_dim, depth, num_heads): what
  rebuilds the model without the config;
- ``world_size`` and ``data``: the ranks, and what the run trains on (shard names, their
  tokenized images, the tokenizer and view recipe), which a resumed run must match.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from beit_common import BeitDataError, Location, describe_file, save_atomic, storage
from beit_data.tokens import with_defaults

__all__ = ["CHECKPOINT", "checkpoint_path", "save_checkpoint", "load_checkpoint", "model_from_checkpoint"]

CHECKPOINT = "checkpoint.pt"
KEYS = ("model", "optimizer", "scheduler", "step", "stream", "rng", "config", "model_name", "vocab_size",
        "model_args", "world_size", "data")


def checkpoint_path(run: str | os.PathLike) -> Location:
    return Location(run) / CHECKPOINT


def save_checkpoint(path: str | os.PathLike, *, model, optimizer, scheduler, step: int,
                    stream: tuple[int, int], rng_cpu: list, rng_cuda: list, config: dict, model_name: str,
                    world_size: int, data: dict) -> Path:
    """Write the checkpoint atomically: a kill never leaves half a file."""
    return save_atomic({"world_size": world_size, "data": data,
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
    if not storage.exists(path):
        raise BeitDataError(f"no checkpoint at {path}")
    with storage.local_copy(path) as local:  # an object is downloaded whole, read, and removed
        try:
            ckpt = torch.load(local, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many kinds for a damaged file
            what = describe_file(local)
            detail = what if "zip" not in what else f"a damaged one ({str(exc).strip().splitlines()[0][:160]})"
            raise BeitDataError(f"{path} is not a readable checkpoint: it is {detail}") from None
    missing = [k for k in KEYS if k not in ckpt] if isinstance(ckpt, dict) else list(KEYS)
    if missing:
        raise BeitDataError(f"{path} is not a beit-data pretrain checkpoint (missing {', '.join(missing)})")
    return ckpt


# Settings added since the first checkpoints, with the value a run that predates them had.
ADDED_SETTINGS = {"recipe": "beit", "partitions": None, "record_batches": False}


def changed_settings(saved: dict, config: dict, resumable: tuple[str, ...], added: dict | None = None) -> dict:
    """The settings that differ from a checkpoint's, ``{name: (old, new)}``; any of them that is
    not ``resumable`` is refused.

    Args:
        added: Settings newer than some checkpoints, with the value those runs had.

    Raises:
        BeitDataError: Naming the setting, its value in the run and the new one.
    """
    added = ADDED_SETTINGS if added is None else added
    changed = {}
    for name, new in config.items():
        old = saved.get(name, added.get(name))
        old, new = (tuple(old) if isinstance(old, list) else old), (tuple(new) if isinstance(new, list) else new)
        if old == new or name == "resume":
            continue
        if name not in resumable:
            raise BeitDataError(f"`{name}` is {old!r} in the run being resumed, not {new!r}; a resumed run keeps "
                                "it (start a new run to change it)")
        changed[name] = (old, new)
    return changed


def check_resume(ckpt: dict, config: dict, resumable: tuple[str, ...], world_size: int, data: dict) -> dict:
    """Refuse to resume with settings or data that change what the run computes.

    Args:
        config: This invocation's settings.
        resumable: The settings that may change (they only change how the run goes).
        data: What this invocation would train on, as ``save_checkpoint`` records it.

    Returns:
        The settings that changed, ``{name: (old, new)}``, for the log.

    Raises:
        BeitDataError: Naming the setting, its value in the run and the new one.
    """
    changed = changed_settings(ckpt["config"], config, resumable)
    if ckpt["world_size"] != world_size:
        raise BeitDataError(f"the run being resumed has {ckpt['world_size']} ranks, not {world_size}; the order of "
                            "its batches depends on it")
    with_defaults(ckpt["data"])  # runs saved before the BEiT v2 recipe
    for key, setting in (("tokenizer", "tokens"), ("views", "tokens"), ("shards", "shards"),
                         ("images_per_shard", "tokens")):
        if ckpt["data"][key] != data[key]:
            raise BeitDataError(f"`{setting}` holds other data than the run being resumed ({key} differ); "
                                "resume with the same shards and token files")
    return changed


def model_from_checkpoint(ckpt: dict) -> torch.nn.Module:
    """The trained model of a checkpoint, on the CPU, with its weights loaded."""
    from pipelines.training import build_model

    model = build_model(ckpt["model_name"], ckpt["vocab_size"], layer_scale=ckpt["config"]["layer_scale"])
    model.load_state_dict(ckpt["model"])
    return model
