"""The pretrain checkpoint: the state of a run's parts, in one file read by ``--resume`` and ``export``.

A run is made of parts that each give their state (``state_dict``) and take it back
(``load_state_dict``): the model, the optimizer, the scheduler, the stream's position and every
rank's random generators and CPU thread count (``RNGState``). The trainer is itself such a part
(``pipelines.pretrain.Trainer``): its state is the whole file, its own record
(``CheckpointMeta``) beside each part's state, so saving and restoring are one call each and a
new piece of state is one more part.

``RUN/checkpoint.pt`` is one ``torch.save`` of a dict of plain tensors and Python values (it
loads with ``weights_only=True``): each part's state under its name, and

- ``step``: optimizer steps taken;
- ``config``: the resolved settings, by their flat names;
- ``model_name``, ``vocab_size`` and ``model_args`` (embed_dim, depth, num_heads): what
  rebuilds the model without the config;
- ``world_size`` and ``data``: the ranks, and what the run trains on (shard names, their
  tokenized images, the tokenizer and view recipe), which a resumed run must match.

Checkpoints written before keep loading: their stream state is an ``(epoch, step)`` pair.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from typing import Protocol

import torch

from beit_common import BeitDataError, Location, describe_file, storage
from beit_data.tokens import with_defaults
from pipelines.runtime import same_threads

__all__ = ["CHECKPOINT", "checkpoint_path", "Stateful", "RNGState", "CheckpointMeta", "load_checkpoint",
           "changed_settings", "check_resume", "model_from_checkpoint"]

CHECKPOINT = "checkpoint.pt"
PARTS = ("model", "optimizer", "scheduler", "stream", "rng")


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class RNGState:
    """The torch generators of every rank (drop path differs per rank) and its CPU thread count
    (on the CPU, the last bits of a sum depend on it: ``runtime.same_threads``), saved together by
    rank 0 and given back to each rank; gathering them is a collective: every rank saves.
    Checkpoints from before the thread count load as they are (a line says so on the CPU)."""

    def __init__(self, device: torch.device, rank: int = 0, world_size: int = 1):
        self.device, self.rank, self.world_size = device, rank, world_size

    def state_dict(self) -> dict:
        mine = {"cpu": torch.get_rng_state(), "threads": torch.get_num_threads(),
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        ranks = [mine]
        if self.world_size > 1:
            ranks = [None] * self.world_size
            torch.distributed.all_gather_object(ranks, mine)
        return {"cpu": [r["cpu"] for r in ranks], "threads": [r["threads"] for r in ranks],
                "cuda": [r["cuda"] for r in ranks] if self.device.type == "cuda" else []}

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["cpu"][self.rank % len(state["cpu"])])
        if self.device.type == "cuda" and state.get("cuda"):
            torch.cuda.set_rng_state(state["cuda"][self.rank % len(state["cuda"])], self.device)
        threads = state.get("threads")
        note = same_threads(threads[self.rank % len(threads)] if threads else None, self.device)
        if note and self.rank == 0:
            print(f"pretrain: {note}", file=sys.stderr)


def checkpoint_path(run: Location) -> Location:
    return run / CHECKPOINT


# Settings added since the first checkpoints, with the value a run that predates them had.
ADDED_SETTINGS = {"recipe": "beit", "record_batches": False, "image_size": 224, "min_block": 16, "dealt": False,
                  "grad_accum": 1, "targets": "stored", "tokenizer": None, "shared_draws": True}


@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint records beside its parts' states, under these names at its top level.

    Attributes:
        step: Optimizer steps taken.
        config: The resolved settings, by their flat names.
        model_name, vocab_size, model_args: What rebuilds the model without the config
            (``model_args``: embed_dim, depth, num_heads).
        world_size: The ranks that saved it.
        data: What the run trains on (shard names, their tokenized images, the tokenizer and
            view recipe), which a resumed run must match.
    """

    step: int
    config: dict
    model_name: str
    vocab_size: int
    model_args: dict
    world_size: int
    data: dict

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> CheckpointMeta:
        """The record of a loaded checkpoint (``load_checkpoint``)."""
        return cls(**{name: ckpt[name] for name in META})

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def settings(self) -> dict:
        """The checkpoint's settings, completed for runs from before a setting existed: a run from
        before partitions dealt its shards to its ranks."""
        saved = {**ADDED_SETTINGS, **self.config}
        if self.config.get("partitions") is None:
            saved.update(partitions=self.world_size, dealt=True)
        return saved


META = tuple(f.name for f in fields(CheckpointMeta))


def load_checkpoint(path: Location) -> dict:
    """The checkpoint at ``path`` (local or an object), on the CPU.

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
    missing = [k for k in (*PARTS, *META) if k not in ckpt] if isinstance(ckpt, dict) else list(PARTS)
    if missing:
        raise BeitDataError(f"{path} is not a beit-data pretrain checkpoint (missing {', '.join(missing)})")
    if isinstance(ckpt["stream"], (tuple, list)):  # written before the stream gave its own state
        ckpt["stream"] = {"epoch": ckpt["stream"][0], "step": ckpt["stream"][1]}
    return ckpt


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


def check_resume(saved_run: CheckpointMeta, config: dict, resumable: tuple[str, ...], world_size: int,
                 data: dict) -> dict:
    """Refuse to resume with settings or data that change what the run computes.

    Args:
        saved_run: The record of the checkpoint being resumed.
        config: This invocation's settings, by their flat names.
        resumable: The settings that may change (they only change how the run goes).
        data: What this invocation would train on, as the checkpoint records it.

    Returns:
        The settings that changed, ``{name: (old, new)}``, for the log.

    Raises:
        BeitDataError: Naming the setting, its value in the run and the new one.
    """
    saved, saved_world = saved_run.settings, saved_run.world_size
    changed = changed_settings(saved, config, resumable)
    before, after = (c["batch_size"] * w * c.get("grad_accum", 1) for c, w in ((saved, saved_world),
                                                                                (config, world_size)))
    if before != after:
        raise BeitDataError(f"the global batch (`batch_size` x ranks x `grad_accum`) is {before} in the run being "
                            f"resumed, not {after}; a resumed run keeps it")
    if saved_world != world_size:
        if saved["dealt"]:
            raise BeitDataError(f"the run being resumed has {saved_world} ranks, not {world_size}; its order "
                                "deals shards to its ranks")
        changed = {"ranks": (saved_world, world_size), **changed}
    saved_data = with_defaults(saved_run.data)  # runs saved before the BEiT v2 recipe
    online = config.get("targets") == "online"  # the tokenizer gives the targets, the shards the images
    targets, what = ("tokenizer", "tokenizer") if online else ("tokens", "token files")
    for key, setting in (("tokenizer", targets), ("views", targets), ("shards", "shards"),
                         ("images_per_shard", "shards" if online else "tokens")):
        if saved_data[key] != data[key]:
            raise BeitDataError(f"`{setting}` holds other data than the run being resumed ({key} differ); "
                                f"resume with the same shards and {what}")
    return changed


def model_from_checkpoint(ckpt: dict) -> torch.nn.Module:
    """The trained model of a checkpoint, on the CPU, with its weights loaded."""
    from pipelines.training import build_model

    model = build_model(ckpt["model_name"], ckpt["vocab_size"], layer_scale=ckpt["config"]["layer_scale"])
    model.load_state_dict(ckpt["model"])
    return model
