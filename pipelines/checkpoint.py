"""The training checkpoints: pretrain's and train-dvae's, each the state of a run in one file.

**Pretrain.** A run is made of parts that each give their state (``state_dict``) and take it
back (``load_state_dict``): the model, the optimizer, the scheduler, the stream's position and
every rank's random generators and CPU thread count (``RNGState``). The trainer is itself such a
part (``pipelines.pretrain.Trainer``): its state is the whole file, its own record
(``CheckpointMeta``) beside each part's state, so saving and restoring are one call each and a
new piece of state is one more part.

``RUN/checkpoint.pt`` is one ``torch.save`` of a dict of plain tensors and Python values (it
loads with ``weights_only=True``): each part's state under its name, and

- ``step``: optimizer steps taken;
- ``config``: the resolved settings, by their flat names; ``order_version`` among them says
  which order the run reads (``beit_data.old_orders``);
- ``model_name``, ``vocab_size`` and ``model_args`` (embed_dim, depth, num_heads): what
  rebuilds the model without the config;
- ``world_size`` and ``data``: the ranks, and what the run trains on (shard names, their
  tokenized images, the tokenizer and view recipe), which a resumed run must match.

Checkpoints written before keep loading: their stream state is an ``(epoch, step)`` pair, and
their order version is derived from the settings they record (``CheckpointMeta.settings``).

**train-dvae.** Its ``--out`` file is a tokenizer file (``beit_model.dvae.tokenizer_state``:
``format``, ``config``, ``encoder``, ``decoder``), so ``load_tokenizer`` reads it as it is, with
the run's state beside the weights: its record (``DVAECheckpointMeta``: ``step``, ``train``, and
``report`` in the last save), ``optimizer`` and ``rng`` (the CPU generator's state tensor).
``save_dvae_checkpoint`` writes it and ``restore_dvae_checkpoint`` takes it back; the layout is
the one train-dvae has always written.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, fields
from typing import Protocol

import torch

from beit_common import BeitDataError, Location, describe_file, save_atomic, storage
from beit_data.old_orders import deals_to_ranks, order_version
from beit_data.stream_config import IMAGENET_MEAN, IMAGENET_STD
from beit_data.tokens import TokenMeta
from beit_model.dall_e import Decoder, Encoder
from beit_model.dvae import CHECKPOINT_FORMAT, DVAEConfig, tokenizer_state
from pipelines.runtime import same_mkl_mode, same_threads

__all__ = ["CHECKPOINT", "EXTENDABLE", "LATER_PARTS", "checkpoint_path", "Stateful", "RNGState", "ScalerState",
           "CheckpointMeta", "load_checkpoint", "changed_settings", "check_resume", "model_from_checkpoint",
           "DVAECheckpointMeta", "save_dvae_checkpoint", "restore_dvae_checkpoint", "recorded_dvae_settings"]

CHECKPOINT = "checkpoint.pt"
# The settings an extended run (``extend``) may raise: its length; the cosine's tail is recomputed.
EXTENDABLE = ("steps", "epochs")
PARTS = ("model", "optimizer", "scheduler", "stream", "rng")
# Parts a checkpoint gained later: one from before them loads, and the part starts afresh.
LATER_PARTS = ("scaler",)


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class RNGState:
    """The torch generators of every rank (drop path differs per rank) and its CPU thread count
    and MKL mode (on the CPU, the last bits of a sum depend on both: ``runtime.same_threads``,
    ``runtime.same_mkl_mode``), saved together by rank 0 and given back to each rank; gathering
    them is a collective: every rank saves. Checkpoints from before the thread count load as they
    are (a line says so on the CPU)."""

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
                "mkl_cbwr": os.environ.get("MKL_CBWR"),
                "cuda": [r["cuda"] for r in ranks] if self.device.type == "cuda" else []}

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["cpu"][self.rank % len(state["cpu"])])
        if self.device.type == "cuda" and state.get("cuda"):
            torch.cuda.set_rng_state(state["cuda"][self.rank % len(state["cuda"])], self.device)
        threads = state.get("threads")
        notes = (same_threads(threads[self.rank % len(threads)] if threads else None, self.device),
                 same_mkl_mode(state.get("mkl_cbwr"), self.device))
        for note in notes:
            if note and self.rank == 0:
                print(f"pretrain: {note}", file=sys.stderr)


class ScalerState:
    """fp16's gradient scaler (its scale and growth tracker). A checkpoint of a bf16 or fp32 run,
    or from before precisions, holds none: a resumed fp16 run starts from a fresh scale."""

    def __init__(self, scaler: torch.amp.GradScaler):
        self.scaler = scaler

    def state_dict(self) -> dict:
        return self.scaler.state_dict()  # empty when the scaler is off

    def load_state_dict(self, state: dict | None) -> None:
        if state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)


def checkpoint_path(run: Location) -> Location:
    return run / CHECKPOINT


# Settings added since the first checkpoints, with the value a run that predates them had
# (``dealt`` and ``shared_draws`` said the order before ``order_version`` was recorded).
ADDED_SETTINGS = {"recipe": "beit", "record_batches": False, "image_size": 224, "min_block": 16, "dealt": False,
                  "grad_accum": 1, "targets": "stored", "tokenizer": None, "shared_draws": True,
                  "keep_checkpoints": 0, "checkpoint_every_epochs": 0, "opt": "adamw", "opt_eps": 1e-8,
                  "momentum": 0.9, "sched": "cosine", "decay_epochs": 90.0, "decay_rate": 0.1,
                  "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "log_to": ("tensorboard",)}


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
        before partitions dealt its shards to its ranks, and one from before ``order_version`` has
        the version its settings say (``beit_data.old_orders.order_version``)."""
        saved = {**ADDED_SETTINGS, **self.config}
        if self.config.get("partitions") is None:
            saved.update(partitions=self.world_size, dealt=True)
        if "order_version" not in saved:
            saved["order_version"] = order_version(saved)
        return saved

    @property
    def order_version(self) -> int:
        """The version of the order the run reads: a resumed run keeps it."""
        return self.settings["order_version"]


META = tuple(f.name for f in fields(CheckpointMeta))


def _read(path: Location) -> object:
    """What ``torch.save`` wrote at ``path`` (local or an object), on the CPU, as plain data.

    Raises:
        BeitDataError: If it is missing or unreadable, in one line.
    """
    if not storage.exists(path):
        raise BeitDataError(f"no checkpoint at {path}")
    with storage.local_copy(path) as local:  # an object is downloaded whole, read, and removed
        try:
            return torch.load(local, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many kinds for a damaged file
            what = describe_file(local)
            detail = what if "zip" not in what else f"a damaged one ({str(exc).strip().splitlines()[0][:160]})"
            raise BeitDataError(f"{path} is not a readable checkpoint: it is {detail}") from None


def load_checkpoint(path: Location) -> dict:
    """The pretrain checkpoint at ``path`` (local or an object), on the CPU.

    Raises:
        BeitDataError: If it is missing, unreadable or not a beit-data pretrain checkpoint.
    """
    ckpt = _read(path)
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
            how = "pass `extend` to train it longer" if name in EXTENDABLE else "start a new run to change it"
            raise BeitDataError(f"`{name}` is {old!r} in the run being resumed, not {new!r}; a resumed run keeps "
                                f"it ({how})")
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
        if deals_to_ranks(saved["order_version"]):
            raise BeitDataError(f"the run being resumed has {saved_world} ranks, not {world_size}; its order "
                                "deals shards to its ranks")
        changed = {"ranks": (saved_world, world_size), **changed}
    saved_data = {**saved_run.data, **TokenMeta.of_targets(saved_run.data).targets()}  # runs from before BEiT v2
    online = config.get("targets") == "online"  # the tokenizer gives the targets, the shards the images
    targets, what = ("tokenizer", "tokenizer") if online else ("tokens", "token files")
    for key, setting in (("tokenizer", targets), ("views", targets), ("shards", "shards"),
                         ("images_per_shard", "shards" if online else "tokens")):
        if saved_data[key] != data[key]:
            raise BeitDataError(f"`{setting}` holds other data than the run being resumed ({key} differ); "
                                f"resume with the same shards and {what}")
    return changed


def model_from_checkpoint(ckpt: dict) -> torch.nn.Module:
    """The trained model of a checkpoint, on the CPU, with its weights loaded, and the
    normalisation of the input it trained on as its ``pretrained_cfg`` (``mean``, ``std``: timm's
    convention, which ``timm.data.resolve_data_config(model=model)`` reads)."""
    from pipelines.training import build_model

    model = build_model(ckpt["model_name"], ckpt["vocab_size"], layer_scale=ckpt["config"]["layer_scale"])
    model.load_state_dict(ckpt["model"])
    settings = CheckpointMeta.from_checkpoint(ckpt).settings
    model.pretrained_cfg = {"mean": tuple(settings["mean"]), "std": tuple(settings["std"])}
    return model


# ---- the train-dvae checkpoint ----


@dataclass(frozen=True)
class DVAECheckpointMeta:
    """What a ``train-dvae`` checkpoint records beside the tokenizer's weights and the run's
    optimizer and generator, under these names at its top level.

    Attributes:
        step: Optimizer steps taken.
        train: The run's settings (``TrainDVAEConfig``'s fields, redacted); ``config`` names the
            architecture.
        report: The final report (held-out PSNR, its baseline, perplexity, ...): the last save's only.
    """

    step: int
    train: dict
    report: dict | None = None

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> DVAECheckpointMeta:
        return cls(step=ckpt["step"], train=ckpt["train"], report=ckpt.get("report"))

    def as_dict(self) -> dict:
        """The record's entries; a save before the run's end has no ``report`` key, as always."""
        return {"step": self.step, "train": self.train, **({} if self.report is None else {"report": self.report})}


DVAE_KEYS = ("format", "config", "encoder", "decoder", "step", "train", "optimizer", "rng")


def save_dvae_checkpoint(path: Location, record: DVAECheckpointMeta, architecture: DVAEConfig,
                         encoder: Encoder, decoder: Decoder, optimizer: Stateful,
                         scaler: torch.amp.GradScaler | None = None) -> None:
    """Write a ``train-dvae`` checkpoint atomically: the tokenizer file of ``encoder`` and
    ``decoder``, with the record, the optimizer's state and the CPU generator's beside it, and
    fp16's gradient scaler (``scaler``) where one is on."""
    fp16 = {"scaler": scaler.state_dict()} if scaler is not None and scaler.is_enabled() else {}
    save_atomic({**tokenizer_state(architecture, encoder, decoder), **record.as_dict(),
                 "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), **fp16}, path)


def restore_dvae_checkpoint(path: Location, settings: dict, resumable: tuple[str, ...], encoder: Encoder,
                            decoder: Decoder, optimizer: Stateful, scaler: torch.amp.GradScaler | None = None
                            ) -> tuple[DVAECheckpointMeta, dict]:
    """Take a ``train-dvae`` checkpoint back into the run's models, optimizer and CPU generator.

    The file is read on the CPU: each part moves its state to its own device.

    Args:
        settings: This invocation's settings, as the record keeps them; its ``config`` (the
            architecture) must be the checkpoint's.
        resumable: The settings that may change (``changed_settings``).

    Returns:
        The checkpoint's record, and the settings that changed, ``{name: (old, new)}``, for the log.

    Raises:
        BeitDataError: In one line, if the file is missing or unreadable, is not a training
            checkpoint of this architecture (a tokenizer file alone has no training state), or a
            setting changed that is not ``resumable``.
    """
    ckpt, name = _read(path), settings["config"]
    missing = [k for k in DVAE_KEYS if k not in ckpt] if isinstance(ckpt, dict) else []
    if (not isinstance(ckpt, dict) or missing or ckpt["format"] != CHECKPOINT_FORMAT
            or not isinstance(ckpt["train"], dict) or ckpt["train"].get("config") != name):
        detail = f" (missing {', '.join(missing)})" if missing else ""
        raise BeitDataError(f"{path} is not a {name} dVAE training checkpoint{detail}")
    record = DVAECheckpointMeta.from_checkpoint(ckpt)
    changed = changed_settings(record.train, settings, resumable, added={})
    encoder.load_state_dict(ckpt["encoder"]), decoder.load_state_dict(ckpt["decoder"])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"])
    if scaler is not None:
        ScalerState(scaler).load_state_dict(ckpt.get("scaler"))
    return record, changed


def recorded_dvae_settings(path: Location) -> dict:
    """The settings a ``train-dvae`` checkpoint records (``{}`` where there is no file, or it holds
    none): what a resumed run takes for every setting not given again."""
    if not storage.exists(path):
        return {}
    ckpt = _read(path)
    train = ckpt.get("train") if isinstance(ckpt, dict) else None
    return {k: tuple(v) if isinstance(v, list) else v for k, v in train.items()} if isinstance(train, dict) else {}
