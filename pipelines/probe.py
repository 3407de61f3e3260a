"""``beit-data probe``: k-NN (and linear) classification on frozen encoder features.

A cheap downstream check of a pretrained encoder, as self-supervised learning reports it
(DINO's weighted k-NN): labels come from the shards' ``.cls`` members; each image is
centre-cropped (the centre 224/256 of its shorter side, as a resize to 256 and a 224 crop) and
resized to 224 with bicubic by DALI; the features are the mean of the patch tokens after the
chosen blocks, each layer-normalised (without weights) and then averaged over the blocks, as
BEiT's features are best at intermediate depth. k-NN votes with ``exp(cos / T)`` over the ``k``
nearest training images; ``linear`` fits a multinomial logistic regression on the same cached
features. Images are decoded a batch at a time and dropped once encoded: only the features
are held in memory, 4 bytes x width per image (3 KB for ViT-B).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from beit_common import BeitDataError, Location, storage
from beit_data.progress import progress_bar
from beit_data.shards import expand_shards, iter_images
from pipelines.class_maps import ClassMaps, check_class_maps, merged
from pipelines.config import ProbeConfig
from pipelines.runtime import (
    DistInfo,
    all_ranks_ok,
    autocast,
    dist_info,
    gather_dealt,
    init_distributed,
    resolve_device,
)

__all__ = ["ProbeConfig", "run_probe", "labeled_features", "encoder_features", "knn", "linear_probe",
           "format_probe", "load_encoder"]

CROP = 224 / 256  # the centre crop's side, as a fraction of the shorter side


def _label(sample, shard, classes: tuple[int, Location] | None) -> int:
    """The sample's class id, 0 or more and, where a class map lies beside its shard (``classes``:
    its size and file), one of its ids: another would be a class of its own, with no images."""
    raw = sample.members.get("cls")
    if raw is None:
        raise BeitDataError(f"{shard}: sample {sample.key} has no .cls member; probing needs labeled shards "
                            "(`beit-data shards` writes them for an ImageFolder tree)")
    try:
        label = int(raw.decode().strip())
    except (UnicodeDecodeError, ValueError):
        raise BeitDataError(f"{shard}: sample {sample.key} has a .cls member that is not an integer") from None
    if label < 0 or classes and label >= classes[0]:
        bound = f"0 to {classes[0] - 1}, the {classes[0]} classes of {classes[1]}" if classes else "0 or more"
        raise BeitDataError(f"{shard}: sample {sample.key} has class {label}; class ids are {bound}")
    return label


def class_map_size(shard: str) -> tuple[int, Location] | None:
    """The number of classes of the class map recorded beside ``shard`` (the ``shards.json`` that
    ``beit-data shards`` writes), and that file; None where there is none (img2dataset's shards)."""
    shard = Location(shard)
    if shard.kind == "pipe" or not storage.exists(path := shard.parent / "shards.json"):
        return None
    try:
        classes = json.loads(storage.read_bytes(path)).get("classes")
    except (ValueError, AttributeError):  # not one the shards command wrote: no class map to hold to
        return None
    return (len(classes), path) if isinstance(classes, list) and classes else None


def labeled_features(model: torch.nn.Module, spec: str, layers: list[int], device: torch.device, *,
                     batch_size: int = 64, image_size: int = 224, num_threads: int = 4, progress: bool = False,
                     desc: str = "features", dist: DistInfo | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, ClassMaps]:
    """Features (n, D) float32 on the CPU, labels (n,) of every decodable, labeled image of the
    shards, and what the samples say of their class map. Each batch is decoded by DALI,
    encoded, and dropped: only the features stay. The model is in eval mode meanwhile. With
    ``dist`` of several ranks, each encodes shards ``rank, rank + W, ...`` and rank 0 gets them
    all, in shard order (the others return their own part)."""
    from beit_data.dali_views import IMAGENET_MEAN, IMAGENET_STD, DaliViews, ViewSpec
    from beit_data.views import View

    decode = DaliViews(ViewSpec(size=image_size, interp="bicubic", jitter=False, mean=IMAGENET_MEAN,
                                std=IMAGENET_STD, half=True), batch_size=batch_size, device=device,
                       num_threads=num_threads)
    was_training = model.training
    model.eval()
    feats, labels, pending, maps = [], [], [], ClassMaps(spec)
    bar = progress_bar(desc=desc, unit="img", disable=not progress)

    def flush():
        views = []
        for _, info in pending:
            side = max(1, round(min(info.width, info.height) * CROP))
            views.append([View((info.width - side) // 2, (info.height - side) // 2, side, side, False, 1.0, 1.0, 1.0)])
        images = decode([s.image for s, _ in pending], views)[:, 0].to(device).float()
        with autocast(device):
            feats.append(encoder_features(model, images, layers).cpu())
        bar.update(len(pending))
        pending.clear()

    shards, sizes, error = expand_shards(spec), [], None
    try:
        for shard in shards[dist.rank::dist.world_size] if dist else shards:
            sizes.append(len(labels))
            classes = class_map_size(shard)
            for sample, info in iter_images(shard):
                labels.append(_label(sample, shard, classes))
                maps.add(sample, labels[-1])
                pending.append((sample, info))
                if len(pending) == batch_size:
                    flush()
            sizes[-1] = len(labels) - sizes[-1]
        if pending:
            flush()
    except Exception as exc:  # raised once every rank knows, so that none waits for this one
        error = exc
    finally:
        bar.close()
        model.train(was_training)
    feats, labels = (torch.cat(feats) if feats else torch.zeros(0, 0)), torch.tensor(labels, dtype=torch.int64)
    if dist and dist.world_size > 1:
        if not all_ranks_ok(error is None, dist, device):
            raise error or BeitDataError(f"another rank could not read its shards of {spec} (its log says why)")
        feats, labels, maps = _on_rank_zero(feats, labels, sizes, maps, len(shards), dist)
    elif error is not None:
        raise error
    if not len(labels) and not (dist and dist.rank):
        raise BeitDataError(f"no decodable image in {spec}")
    return feats, labels, maps


def _on_rank_zero(feats, labels, sizes: list[int], maps: ClassMaps, shards: int, dist: DistInfo):
    """Every rank's features, labels and class maps, in shard order, on rank 0; the others keep
    their own part (rank 0 scores)."""
    chunks = gather_dealt(list(zip(feats.split(sizes), labels.split(sizes))), shards, dist)
    parts = gather_dealt([maps], dist.world_size, dist)
    if dist.rank:
        return feats, labels, maps
    return (torch.cat([f for f, _ in chunks if f.numel()] or [feats]), torch.cat([y for _, y in chunks]),
            merged(parts))


def _blocks_and_input(model: torch.nn.Module, images: torch.Tensor):
    """The token sequence before the first block, the blocks, and the bias they share."""
    if hasattr(model, "embed"):  # beit_mim's models
        return model.embed(images), model.blocks, model.rel_pos_bias()
    x = model.patch_embed(images)  # timm's Beit
    x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    if model.pos_embed is not None:
        x = x + model.pos_embed
    return x, model.blocks, model.rel_pos_bias() if model.rel_pos_bias is not None else None


@torch.no_grad()
def encoder_features(model: torch.nn.Module, images: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """(B, D) float32: the mean patch token after each block of ``layers`` (1-based),
    layer-normalised without weights, averaged over those blocks."""
    x, blocks, bias = _blocks_and_input(model, images)
    out = []
    for i, block in enumerate(blocks, start=1):
        x = block(x, shared_rel_pos_bias=bias)
        if i in layers:
            pooled = x[:, 1:].float().mean(1)
            out.append(F.layer_norm(pooled, pooled.shape[-1:]))
        if i >= max(layers):
            break
    return torch.stack(out).mean(0)


def check_layers(layers, depth: int, setting: str = "layers") -> list[int]:
    """Sorted block numbers, the last block when none are given.

    Raises:
        BeitDataError: Naming ``setting`` when one is not a block of the model.
    """
    layers = sorted(set(layers or [depth]))
    if layers[0] < 1 or layers[-1] > depth:
        raise BeitDataError(f"`{setting}` must be block numbers from 1 to {depth}, got {layers}")
    return layers


def knn(train: torch.Tensor, train_labels: torch.Tensor, val: torch.Tensor, val_labels: torch.Tensor, *,
        k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> dict:
    """DINO's weighted k-NN: top-1 and top-5 accuracy over the validation features."""
    train, val = F.normalize(train, dim=1), F.normalize(val, dim=1)
    classes = int(max(train_labels.max(), val_labels.max())) + 1
    k = min(k, len(train))
    top1 = top5 = 0
    for i in range(0, len(val), chunk):
        sims, idx = (val[i:i + chunk] @ train.t()).topk(k, dim=1)  # (b, k)
        votes = torch.zeros(len(sims), classes).scatter_add_(1, train_labels[idx], (sims / temperature).exp())
        ranked = votes.topk(min(5, classes), dim=1).indices
        truth = val_labels[i:i + chunk].unsqueeze(1)
        top1 += (ranked[:, :1] == truth).sum().item()
        top5 += (ranked == truth).any(1).sum().item()
    return {"top1": top1 / len(val), "top5": top5 / len(val), "k": k, "temperature": temperature}


def linear_probe(train: torch.Tensor, train_labels: torch.Tensor, val: torch.Tensor, val_labels: torch.Tensor, *,
                 weight_decay: float = 1e-4, steps: int = 100) -> dict:
    """Multinomial logistic regression (L-BFGS, full batch) on standardised features."""
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    x, xv = (train - mean) / std, (val - mean) / std
    classes = int(max(train_labels.max(), val_labels.max())) + 1
    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(x.shape[1], classes)
    torch.nn.init.normal_(layer.weight, std=0.01, generator=generator)
    torch.nn.init.zeros_(layer.bias)
    opt = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(layer(x), train_labels) + weight_decay * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        ranked = layer(xv).topk(min(5, classes), dim=1).indices
    truth = val_labels.unsqueeze(1)
    return {"top1": (ranked[:, :1] == truth).float().mean().item(), "top5": (ranked == truth).any(1).float().mean()
            .item(), "weight_decay": weight_decay}


def load_encoder(source: str | Path) -> tuple[torch.nn.Module, str]:
    """A pretrain run folder's model, or an exported encoder (``.pth`` / ``.safetensors`` with its
    ``.json``), local or on object storage."""
    from pipelines.checkpoint import checkpoint_path, load_checkpoint, model_from_checkpoint

    source = Location(source)
    if source.kind == "pipe":
        raise BeitDataError(f"{source}: give a run folder or an exported encoder, not a pipe: command")
    if storage.exists(checkpoint_path(source)):
        return model_from_checkpoint(load_checkpoint(checkpoint_path(source))), "run"
    info_path = source.sibling(".json")
    if not storage.exists(source) or not storage.exists(info_path):
        raise BeitDataError(f"{source} is neither a pretrain run folder nor an exported encoder with its "
                            f"{info_path.name} beside it")
    import timm

    info = _export_info(info_path)
    with storage.local_copy(source) as local:
        try:
            model = timm.create_model(info["timm_model"], checkpoint_path=str(local), **info["timm_kwargs"])
        except (KeyError, RuntimeError, TypeError) as exc:
            raise BeitDataError(f"{source}: not an encoder `beit-data export` wrote: "
                                f"{str(exc).splitlines()[0]}") from None
    return model, "encoder"


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
        model, kind = load_encoder(cfg.model)
        model = model.to(device).eval()
        layers = check_layers(cfg.layers, len(model.blocks))
        (train, train_labels, train_maps), (val, val_labels, val_maps) = (
            labeled_features(model, spec, layers, device, batch_size=cfg.batch_size, image_size=cfg.image_size,
                             num_threads=cfg.num_threads, progress=cfg.progress and dist.rank == 0,
                             desc=f"features {name}", dist=dist)
            for name, spec in (("train", cfg.train_shards), ("val", cfg.val_shards)))
    finally:
        if dist.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if dist.rank:
        return None
    check_class_maps(train_maps, val_maps)
    result = {"model": str(cfg.model), "kind": kind, "layers": layers, "train_images": len(train_labels),
              "val_images": len(val_labels), "classes": int(max(train_labels.max(), val_labels.max())) + 1,
              "knn": knn(train, train_labels, val, val_labels, k=cfg.k, temperature=cfg.temperature),
              "chance_top1": float(np.bincount(val_labels.numpy()).max() / len(val_labels))}
    if cfg.linear:
        result["linear"] = linear_probe(train, train_labels, val, val_labels)
    return result


def format_probe(r: dict) -> str:
    def pct(x: float) -> str:
        return f"{100 * x:5.1f}%"

    lines = [f"encoder       {r['model']} ({r['kind']})  layers {','.join(map(str, r['layers']))}",
             f"images        train {r['train_images']:,}  val {r['val_images']:,}  classes {r['classes']}  "
             f"chance {pct(r['chance_top1']).strip()}",
             f"k-NN          top-1 {pct(r['knn']['top1'])}  top-5 {pct(r['knn']['top5'])}  "
             f"(k {r['knn']['k']}, T {r['knn']['temperature']})"]
    if "linear" in r:
        lines.append(f"linear        top-1 {pct(r['linear']['top1'])}  top-5 {pct(r['linear']['top5'])}  "
                     f"(logistic regression, weight decay {r['linear']['weight_decay']})")
    return "\n".join(lines)

