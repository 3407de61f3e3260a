"""Evaluating an encoder, for a run's quality checks and for ``beit-data probe`` alike.

- Held-out masked-token figures (``evaluate``): loss, top-1 and top-5 accuracy, perplexity.
  Every evaluation sees the same images, views and masks (``beit_data.holdout``), with the model
  in eval mode (no dropout, no drop path) and no random draw, so it never changes the training
  trajectory. Under torchrun each rank evaluates its share and the sums are reduced, so the
  figures equal a one-process evaluation up to the order of the float additions. For BEiT v2
  models the figures are the main head's (the last block's). Held-out shards get the checks
  training shards get (``check_held_out_shards``), and may not be training images
  (``check_holdout``).
- Features of labeled shards (``labeled_features``): labels come from the shards' ``.cls``
  members; each image is centre-cropped (the centre 224/256 of its shorter side, as a resize to
  256 and a 224 crop) and resized to 224 with bicubic by DALI; the features are the mean of the
  patch tokens after the chosen blocks, each layer-normalised (without weights) and then averaged
  over the blocks, as BEiT's features are best at intermediate depth. Images are decoded a batch
  at a time and dropped once encoded: only the features are held in memory, 4 bytes x width per
  image (3 KB for ViT-B).
- Scores on those features: DINO's weighted k-NN (``knn``: ``exp(cos / T)`` votes over the ``k``
  nearest training images) and a multinomial logistic regression (``linear_probe``).

The trainer (``pipelines.validation``) and the probe command (``pipelines.probe``) both use it;
it imports no stage.
"""

from __future__ import annotations

import json
import math
from typing import Sequence

import torch
import torch.nn.functional as F

from beit_common import BeitDataError, Location, storage
from beit_data.holdout import Holdout
from beit_data.progress import progress_bar
from beit_data.replay import image_members, pair_token_files
from beit_data.shard_index import read_images, stale_index
from beit_data.shards import SHARDS_REPORT, expand_shards, iter_images
from beit_data.stream_config import IMAGENET_MEAN, IMAGENET_STD
from beit_data.tokens import WINDOW_COLUMNS, TokenMeta, check_rows, file_keys, read_table
from beit_model.beit_mim import BeitMIM, masked_positions
from pipelines.class_maps import ClassMaps, merged
from pipelines.runtime import DistInfo, all_ranks_ok, autocast, gather_dealt

__all__ = ["evaluate", "check_held_out_shards", "check_holdout", "EVAL_BATCH", "labeled_features",
           "encoder_features", "check_layers", "knn", "linear_probe"]

EVAL_BATCH = 64  # held-out images a forward pass takes
CROP = 224 / 256  # a probe's centre crop's side, as a fraction of the shorter side


@torch.no_grad()
def evaluate(model: torch.nn.Module, holdout: Holdout, *, max_masked: int, device: torch.device,
             world_size: int = 1) -> dict:
    """The held-out figures, reduced over the ranks: ``val_loss``, ``val_top1``, ``val_top5``,
    ``val_perplexity``, ``val_images``, and ``val_majority``: the share of the most common code
    in the held-out targets, the top-1 of a model that always predicts it (its baseline)."""
    was_training = model.training
    model.eval()
    # loss sum, top-1 hits, top-5 hits, masked patches: summed in float64 on every rank
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    codes = torch.zeros(model.vocab_size, dtype=torch.float64, device=device)  # how often each code is a target
    for i in range(0, len(holdout.images), EVAL_BATCH):
        images, tokens, mask = (t[i:i + EVAL_BATCH] for t in (holdout.images, holdout.tokens, holdout.mask))
        positions, real = masked_positions(mask, max_masked)
        with autocast(device):  # BeitMIM's forward: a BEiT v2 model's main head, without the extra one
            logits = BeitMIM.forward(model, images.float(), mask, positions).float()  # (B, K, vocab)
        targets = tokens.gather(1, positions)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
        hits = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == targets.unsqueeze(-1)  # (B, K, 5)
        sums += torch.stack([loss[real].sum(), hits[..., 0][real].sum(), hits.any(-1)[real].sum(),
                             real.sum()]).double()
        codes += torch.bincount(targets[real], minlength=len(codes)).double()
    if world_size > 1:
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(codes)
    model.train(was_training)
    loss_sum, top1, top5, count = sums.tolist()
    mean = loss_sum / max(count, 1)
    return {"val_loss": mean, "val_top1": top1 / max(count, 1), "val_top5": top5 / max(count, 1),
            "val_perplexity": math.exp(mean), "val_images": holdout.total,
            "val_majority": codes.max().item() / max(count, 1)}


def check_held_out_shards(spec: str, tokens: Location) -> None:
    """Refuse held-out shards and token files as the training stream refuses its own, before an
    image is decoded: what it checks before its first step (``pair_token_files``: a token file
    for each shard, one recipe, sound footers, shard sizes) and what it checks as it loads a
    shard (each key once with its views, ids and windows sound, every member as the token file
    recorded it: ``file_keys``, ``check_rows``, ``image_members``). The held-out set is small,
    so each shard gets all of it at once, and its ``.idx`` is compared with every tar header
    (``stale_index``), where training compares a few.

    Raises:
        BeitDataError: Naming the shard (or the token file and row) that training would refuse.
    """
    shards, paths, footers, _ = pair_token_files(spec, tokens, held_out=True)

    def check(shard: Location, path: Location, meta: TokenMeta) -> None:
        table = read_table(path, columns=list(WINDOW_COLUMNS))
        keys = file_keys(table.column("key"), meta.views.views, path)
        check_rows(table, meta.tokenizer.vocab, path)
        stale = stale_index(shard)  # every member against the tar headers, where training reads a few
        if stale is not None:
            raise stale
        image_members(shard, keys, token_file=path, fingerprint=meta.shard, etag=None)

    storage.map_concurrently(lambda s: check(s[0], s[1], s[2][0]), list(zip(shards, paths, footers)))


def check_holdout(holdout: Holdout, source) -> None:
    """Refuse validation images that training reads.

    A validation shard may not be a training shard. Keys repeat across shards written by
    separate ``beit-data shards`` runs (each counts from 000000000), so a validation key that
    training also reads (``source``, the training stream's) is only refused when the two
    samples' images are the same bytes; only those images are read.

    Raises:
        BeitDataError: Naming the first shard or key that training also reads.
    """
    train = {p.identity() for p in source.shards}
    for shard in holdout.shards:
        if shard.identity() in train:
            raise BeitDataError(f"validation shard {shard} is also a training shard: the figures would not be "
                                "held out; give `val_shards` that training does not read")
    wanted = {k for _, k in holdout.chosen}
    for index, shard in enumerate(source.shards):
        shared = wanted.intersection(source.shard_keys(index))
        if not shared:
            continue
        mine = read_images([(shard, k) for k in sorted(shared)])
        theirs = read_images([(s, k) for s, k in holdout.chosen if k in shared])
        for (s, key), data in theirs.items():
            if mine.get((shard, key)) == data:
                raise BeitDataError(f"validation sample {s.name}:{key} is also a training sample "
                                    f"(in {shard}): hold the validation images out of the training shards")


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


def class_map_size(shard: Location) -> tuple[int, Location] | None:
    """The number of classes of the class map recorded beside ``shard`` (the ``shards.json`` that
    ``beit-data shards`` writes), and that file; None where there is none (img2dataset's shards,
    a ``pipe:`` command's)."""
    path = shard.beside(SHARDS_REPORT)
    if path is None or not storage.exists(path):
        return None
    try:
        classes = json.loads(storage.read_bytes(path)).get("classes")
    except (ValueError, AttributeError):  # not one the shards command wrote: no class map to hold to
        return None
    return (len(classes), path) if isinstance(classes, list) and classes else None


def labeled_features(model: torch.nn.Module, spec: str, layers: list[int], device: torch.device, *,
                     batch_size: int = 64, image_size: int = 224, num_threads: int = 4, progress: bool = False,
                     desc: str = "features", dist: DistInfo | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD) -> tuple[torch.Tensor, torch.Tensor, ClassMaps]:
    """Features (n, D) float32 on the CPU, labels (n,) of every decodable, labeled image of the
    shards, and what the samples say of their class map. Each batch is decoded by DALI,
    encoded, and dropped: only the features stay. The model is in eval mode meanwhile. With
    ``dist`` of several ranks, each encodes shards ``rank, rank + W, ...`` and rank 0 gets them
    all, in shard order (the others return their own part). ``mean`` and ``std`` normalise the
    images as the encoder's pretraining did."""
    from beit_data.dali_views import DaliViews, ViewSpec
    from beit_data.views import centre_view

    decode = DaliViews(ViewSpec(size=image_size, interp="bicubic", jitter=False, mean=tuple(mean),
                                std=tuple(std), half=True), batch_size=batch_size, device=device,
                       num_threads=num_threads)
    was_training = model.training
    model.eval()
    feats, labels, pending, maps = [], [], [], ClassMaps(spec)
    bar = progress_bar(desc=desc, unit="img", disable=not progress)

    def flush():
        views = [[centre_view(info.width, info.height, CROP)] for _, info in pending]
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
