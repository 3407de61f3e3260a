"""``beit-data probe``: k-NN (and linear) classification on frozen encoder features.

A cheap downstream check of a pretrained encoder, as self-supervised learning reports it
(DINO's weighted k-NN): this stage loads the encoder (a run folder or an export), encodes two
labeled shard sets (``.cls`` members), normalised with the mean and std of its pretraining, and
scores the validation set against the training set. The centre-cropped features, the k-NN and
the linear probe are ``pipelines.evaluation``'s, the same code a pretrain run's own probe uses.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from beit_common import BeitDataError, Location, storage
from pipelines.class_maps import check_class_maps
from pipelines.config import EXPORT_FOLDER_FILES, ProbeConfig
from pipelines.evaluation import check_layers, knn, labeled_features, linear_probe
from pipelines.runtime import dist_info, init_distributed, resolve_device

__all__ = ["ProbeConfig", "run_probe", "format_probe", "load_encoder"]


def load_encoder(source: Location, step: int | None = None) -> tuple[torch.nn.Module, str]:
    """A pretrain run folder's model (its latest, or the checkpoint it keeps at ``step``), an
    export folder (``config.json``, ``model.safetensors``), or an exported encoder file (``.pth`` /
    ``.safetensors`` with its ``.json``), local or on object storage; each with the ``mean`` and
    ``std`` of its pretraining in its ``pretrained_cfg``."""
    from pipelines.checkpoint import checkpoint_path, load_checkpoint, model_from_checkpoint
    from pipelines.checkpoint_history import run_checkpoint

    if not source.seekable:  # a command's output, read from its start only: no folder, no file beside it
        raise BeitDataError(f"{source}: give a run folder or an exported encoder, not a pipe: command")
    if storage.exists(checkpoint_path(source)):
        return model_from_checkpoint(load_checkpoint(run_checkpoint(source, step))), "run"
    if step is not None:
        raise BeitDataError(f"{source}: `step` picks a checkpoint of a pretrain run folder, and this is none")
    if all(storage.exists(source / name) for name in EXPORT_FOLDER_FILES):
        return _export_folder(source), "encoder"
    info_path = source.sibling(".json")
    if not storage.exists(source) or not storage.exists(info_path):
        raise BeitDataError(f"{source} is neither a pretrain run folder, an export folder "
                            f"({' and '.join(EXPORT_FOLDER_FILES)}) nor an exported encoder with its {info_path.name} "
                            "beside it")
    import timm

    info = _export_info(info_path)
    with storage.local_copy(source) as local:
        try:
            model = timm.create_model(info["timm_model"], checkpoint_path=str(local),
                                      pretrained_cfg_overlay=info.get("pretrained_cfg"), **info["timm_kwargs"])
        except (KeyError, RuntimeError, TypeError) as exc:
            raise BeitDataError(f"{source}: not an encoder `beit-data export` wrote: "
                                f"{str(exc).splitlines()[0]}") from None
    return model, "encoder"


def _export_folder(source: Location) -> torch.nn.Module:
    """The folder ``beit-data export`` writes, opened as timm opens it (``local-dir:``), without
    a classifier; an object-storage folder is read through a local copy of its two files."""
    import timm

    with storage.local_folder(source, EXPORT_FOLDER_FILES) as folder:
        try:
            return timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=0)
        except (KeyError, RuntimeError, TypeError, ValueError) as exc:
            raise BeitDataError(f"{source}: not a folder `beit-data export` wrote: "
                                f"{str(exc).splitlines()[0]}") from None


def _export_info(path: Location) -> dict:
    """The JSON ``beit-data export`` wrote beside an encoder: its timm model and keyword arguments.

    Raises:
        BeitDataError: Naming the file, when it is not that JSON.
    """
    try:
        info = json.loads(storage.read_bytes(path))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BeitDataError(f"{path} is not the JSON `beit-data export` writes: {exc}") from None
    if not isinstance(info, dict) or not isinstance(info.get("timm_model"), str) or \
            not isinstance(info.get("timm_kwargs"), dict):
        raise BeitDataError(f"{path} is not the JSON `beit-data export` writes: it needs timm_model (a name) and "
                            "timm_kwargs (an object); export the run again")
    return info


def run_probe(cfg: ProbeConfig) -> dict | None:
    """Features of both sets from the frozen encoder, then k-NN (and the linear probe). Under
    torchrun or srun the ranks share the encoding, and rank 0 alone scores (the others return None)."""
    device = resolve_device(cfg.device, local_rank=dist_info().local_rank)
    dist = init_distributed(device)
    try:
        model, kind = load_encoder(cfg.model, cfg.step)
        model = model.to(device).eval()
        layers = check_layers(cfg.layers, len(model.blocks))
        pretrained = model.pretrained_cfg  # the normalisation it was pretrained with (an export records it)
        (train, train_labels, train_maps), (val, val_labels, val_maps) = (
            labeled_features(model, spec, layers, device, batch_size=cfg.batch_size, image_size=cfg.image_size,
                             num_threads=cfg.num_threads, progress=cfg.progress and dist.rank == 0,
                             desc=f"features {name}", dist=dist, mean=pretrained["mean"], std=pretrained["std"])
            for name, spec in (("train", cfg.train_shards), ("val", cfg.val_shards)))
    finally:
        if dist.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if dist.rank:
        return None
    check_class_maps(train_maps, val_maps)
    result = {"model": str(cfg.model), **({"step": cfg.step} if cfg.step is not None else {}), "kind": kind,
              "layers": layers, "train_images": len(train_labels),
              "val_images": len(val_labels), "classes": int(max(train_labels.max(), val_labels.max())) + 1,
              "knn": knn(train, train_labels, val, val_labels, k=cfg.k, temperature=cfg.temperature),
              "chance_top1": float(np.bincount(val_labels.numpy()).max() / len(val_labels))}
    if cfg.linear:
        result["linear"] = linear_probe(train, train_labels, val, val_labels)
    return result


def format_probe(r: dict) -> str:
    def pct(x: float) -> str:
        return f"{100 * x:5.1f}%"

    step = f", step {r['step']}" if "step" in r else ""
    lines = [f"encoder       {r['model']} ({r['kind']}{step})  layers {','.join(map(str, r['layers']))}",
             f"images        train {r['train_images']:,}  val {r['val_images']:,}  classes {r['classes']}  "
             f"chance {pct(r['chance_top1']).strip()}",
             f"k-NN          top-1 {pct(r['knn']['top1'])}  top-5 {pct(r['knn']['top5'])}  "
             f"(k {r['knn']['k']}, T {r['knn']['temperature']})"]
    if "linear" in r:
        lines.append(f"linear        top-1 {pct(r['linear']['top1'])}  top-5 {pct(r['linear']['top5'])}  "
                     f"(logistic regression, weight decay {r['linear']['weight_decay']})")
    return "\n".join(lines)

