"""``beit-data tokenize``: V views per image, decoded by DALI, tokenized once, one Parquet per shard.

Under torchrun (RANK/WORLD_SIZE set) shard ``i`` goes to rank ``i % world_size``; views are
pure functions of (seed, key, view, image size), so any number of ranks writes the same rows.
Each shard's file is written atomically, so a killed run resumes by skipping finished shards.

By default, images whose shorter side is under the tokenizer's input size are rejected
rather than upscaled: such an image cannot give a 224-pixel ViT view without inventing
detail. ``min_size`` lowers the bar (0 keeps every decodable image and upscales its views,
as the reference's RandomResizedCrop does). Each token file records its shard's fingerprint,
so a shard rewritten since is refused rather than skipped as finished. A shard whose ``.idx``
no longer lists its members (training reads the images by it) is refused before its file is
written, naming ``beit-data index --overwrite``.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from beit_common import (
    BeitDataError,
    Location,
    ensure_writable_dir,
    folder_lock,
    redacted,
    remove_stale_temps,
    storage,
    write_text_atomic,
)
from beit_data.dali_views import DaliViews, ViewSpec
from beit_data.images import BATCH_PIXELS
from beit_data.prefetch import batched, prefetch
from beit_data.progress import progress_bar
from beit_data.shard_index import StaleIndex, check_fingerprint, index_count, shard_fingerprint, stale_index
from beit_data.shards import Reject, check_finished_folders, expand_shards, iter_images, without_duplicates
from beit_data.tokens import (
    TokenMeta,
    build_table,
    check_recipe,
    decoder_meta,
    file_meta,
    grows_to,
    read_meta,
    read_table,
    token_files,
    token_path,
    token_paths,
    view_rows,
    with_more_views,
    write_tokens,
)
from beit_data.views import ViewRecipe, sample_views
from beit_model.tokenizer import Tokenizer, load_tokenizer
from pipelines.config import TokenizeConfig, settings_yaml
from pipelines.runtime import dist_info, init_distributed, resolve_device, resolve_precision

__all__ = ["TokenizeConfig", "TokenizeJob", "TokenizeResult", "run_tokenize"]

RESIZE_FILTER = {"lanczos": "lanczos3", "bicubic": "bicubic", "bilinear": "bilinear"}  # as the metadata names them


@dataclass
class TokenizeResult:
    """What a tokenize run did, over all ranks; ``rejects`` names each sample left out and why."""

    shards: int = 0
    skipped: int = 0
    images: int = 0
    views: int = 0
    rejects: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        ips = self.images / self.seconds if self.seconds else 0.0
        return {"shards": self.shards, "skipped": self.skipped, "images": self.images, "views": self.views,
                "rejects": len(self.rejects), "seconds": round(self.seconds, 2), "img_per_s": round(ips, 1)}


@dataclass(frozen=True)
class TokenizeJob:
    """A tokenize run's settings, complete before anything is built: the config, the views its
    tokenizer's recipe draws, the smallest side kept, and what every token file records."""

    cfg: TokenizeConfig
    recipe: ViewRecipe
    min_size: int
    meta: TokenMeta

    @classmethod
    def resolve(cls, cfg: TokenizeConfig, tokenizer: Tokenizer) -> TokenizeJob:
        recipe = cfg.view_recipe_for(tokenizer.kind)
        min_size = tokenizer.input_size if cfg.min_size is None else cfg.min_size
        meta = file_meta(tokenizer.describe(), recipe, decoder_meta(RESIZE_FILTER[recipe.interp]), min_size)
        return cls(cfg, recipe, min_size, meta)


def _plan(shards: list[Location], out: Location, meta: TokenMeta, overwrite: bool
          ) -> tuple[list[Location], int, dict[str, int]]:
    """The shards still to tokenize, how many are done, and the views each file with fewer views
    of the same recipe holds (it gets the missing ones only). A finished file made from the same
    shard and recipe is skipped, also with ``overwrite`` (it would be written again byte for
    byte), so a run with ``overwrite`` that was killed keeps what it rewrote when it runs again.

    Raises:
        BeitDataError: For a finished file that is unreadable, from another recipe, or made
            from a shard that has changed since, without ``overwrite``; each names it. A shard
            whose ``.idx`` is stale is refused also with ``overwrite``, naming ``index --overwrite``.
    """
    todo, skipped, grow = [], 0, {}
    hint = "; pass `overwrite` to replace it"
    done = _finished(out)
    for shard in shards:
        target = token_path(out, shard)
        if target.name not in done:
            todo.append(shard)
            continue
        try:
            have = read_meta(target)
            if grows_to(have, meta) and not overwrite:  # views 0 .. V-1 are kept; V .. are added
                check_fingerprint(shard, have.shard, target, full=storage.scan_is_cheap(shard))
                todo.append(shard)
                grow[str(shard)] = grows_to(have, meta)
                continue
            check_recipe(have, meta, f"{target} and this run", hint)
            # On object storage, the size (and the .idx where there is one): not a scan of the tar.
            check_fingerprint(shard, have.shard, target, full=storage.scan_is_cheap(shard))
        except StaleIndex:
            raise  # tokenizing again would not mend the index
        except BeitDataError as exc:
            if overwrite:
                todo.append(shard)
                continue
            raise BeitDataError(str(exc) if "`overwrite`" in str(exc) else f"{exc}{hint}") from None
        skipped += 1
    return todo, skipped, grow


def _finished(out: Location) -> set[str]:
    """Names of the token files already in ``out``: one listing (a local folder or a prefix)."""
    return {p.name for p in token_files(out, allow_empty=True)}


def _expected_images(shards: list[Location]) -> int | None:
    """Sample count from the shards' .idx headers, for the progress bar, where all exist."""
    counts = [index_count(shard) for shard in shards]
    return None if None in counts else sum(counts)


def _prepared_batches(shard: Location, job: TokenizeJob, rejects: list[Reject], members=None, first: int = 0):
    """Batches of (sample, info) with their views from ``first`` on: the Python half of the loading.
    A batch ends early rather than decode more than ``batch_pixels``; a larger image is rejected."""
    budget = job.cfg.batch_pixels or BATCH_PIXELS
    images = iter_images(shard, rejects, min_size=job.min_size, index=members, max_pixels=job.cfg.max_pixels,
                         batch_pixels=budget)
    for batch in batched(images, job.cfg.batch_size, cost=lambda item: item[1].width * item[1].height,
                         budget=budget):
        yield batch, [sample_views(job.recipe, s.key, info.width, info.height)[first:] for s, info in batch]


def _decoded_batches(prepared, shard: Location, views: DaliViews, rejects: list[Reject], first: int = 0):
    """(rows, tensors (N*V, 3, S, S)) per batch, decoded and augmented by DALI."""
    for batch, batch_views in prepared:
        pixels, good, bad = views.decode_or_reject([s.image for s, _ in batch], batch_views)
        rejects.extend(Reject(key=batch[i][0].key, reason=reason, shard=str(shard)) for i, reason in bad)
        rows = [row for i in good for row in view_rows(batch[i][0].key, batch_views[i], batch[i][1].width,
                                                        batch[i][1].height, first)]
        if rows:
            yield rows, pixels.flatten(0, 1)


def tokenize_shard(shard: Location, job: TokenizeJob, tokenizer: Tokenizer, views: DaliViews, device,
                   bar, first: int = 0, dtype: torch.dtype | None = None) -> tuple[int, int, list[Reject]]:
    """Tokenize one shard and write its Parquet file; from view ``first`` on, added to the file's
    views ``0 .. first - 1``, which are kept as they are. ``dtype`` is the tokenizer's autocast
    (``Tokenizer.ids``). Returns (images, views, rejects)."""
    rejects: list[Reject] = []
    all_rows, all_tokens = [], []
    # Three threads overlap: Python reads and prepares batches, DALI decodes, the dVAE encodes.
    # The shard's fingerprint comes from the members its one read finds (an object is read
    # pinned to the ETag it had when opened) and its size before that read: nothing is read
    # twice, and a shard that changes meanwhile no longer matches.
    members: list = []
    size = storage.size(shard)
    cfg, per_image = job.cfg, job.cfg.views - first
    prepared = prefetch(_prepared_batches(shard, job, rejects, members, first))
    for rows, pixels in prefetch(_decoded_batches(prepared, shard, views, rejects, first)):
        ids = tokenizer.ids(pixels.to(device, non_blocking=True), dtype=dtype,
                            pad_to=cfg.batch_size * per_image if cfg.compile else None)  # (N*V, grid, grid)
        all_rows += rows
        all_tokens.append(ids.to("cpu", torch.int16).numpy())
        bar.update(len(rows) // per_image)
    grid = tokenizer.grid
    tokens = np.concatenate(all_tokens) if all_tokens else np.zeros((0, grid, grid), np.int16)
    all_rows, tokens, rejects = without_duplicates(shard, members, all_rows, tokens, rejects)
    stale = stale_index(shard, members)  # pretrain reads the images by the .idx: it must list these members
    if stale is not None:
        raise stale
    fingerprint = shard_fingerprint(shard, members, size=size)
    if cfg.strict and rejects:  # nothing a rerun would take as finished
        return len(all_rows) // per_image, len(all_rows), rejects
    meta = replace(job.meta, source=shard.name, shard=fingerprint,
                   rejects=tuple((r.key, r.reason) for r in rejects))
    path, table = token_path(cfg.out, shard), build_table(all_rows, tokens, grid)
    if first:
        table = with_more_views(read_table(path), table, path)
    write_tokens(path, table, meta)
    return len(all_rows) // per_image, len(all_rows), rejects


def _check_out_beside_shards(shards: list[Location], out: Location) -> None:
    """Refuse token files written beside their shards: img2dataset keeps ``00000.parquet`` (its
    metadata) beside ``00000.tar``, the very name the token file would get."""
    folder = Location(out.rstrip("/")).identity()
    for shard in shards:
        if shard.seekable and shard.parent.identity() == folder:
            raise BeitDataError(f"`out` {out} is the folder of the shards: give the token files a folder of "
                                f"their own (img2dataset keeps {shard.stem}.parquet beside {shard})")


def run_tokenize(cfg: TokenizeConfig) -> TokenizeResult:
    """Tokenize this rank's shards; the result, over all ranks, goes to ``OUT/summary.json`` (rank 0)."""
    start = time.perf_counter()
    shards = expand_shards(cfg.shards)
    check_finished_folders(shards)  # not the part of a set an interrupted `shards` run left
    token_paths(cfg.out, shards)  # two shards of one name would write one file
    _check_out_beside_shards(shards, cfg.out)
    tokenizer = load_tokenizer(cfg.tokenizer)
    job = TokenizeJob.resolve(cfg, tokenizer)
    folder = ensure_writable_dir(cfg.out)
    device = resolve_device(cfg.device, local_rank=dist_info().local_rank)
    dist = init_distributed(device)
    # Rank 0 holds the folder for the whole run; a second run into it is refused at once.
    with folder_lock(folder, "beit-data tokenize") if dist.rank == 0 else nullcontext():
        if dist.rank == 0:
            remove_stale_temps(folder)  # token files half-written when the last run was killed
        return _tokenize(job, shards, tokenizer, cfg.out, device, dist, start)


def _tokenize(job: TokenizeJob, shards: list[Location], tokenizer: Tokenizer, out: Location, device, dist,
              start: float) -> TokenizeResult:
    cfg = job.cfg
    mine = shards[dist.rank :: dist.world_size]
    todo, skipped, grow = _plan(mine, out, job.meta, cfg.overwrite)
    tokenizer = tokenizer.to(device)
    precision, why = resolve_precision(cfg.precision, device)
    if dist.rank == 0 and precision.worth_saying:
        print(f"tokenize: precision {why}", file=sys.stderr)
    if cfg.compile:  # the fingerprint was taken from the weights before; compiling does not change them
        tokenizer.compile_encoder()
    pipelines: dict[int, DaliViews] = {}  # by the views each image gets: all of them, or those a file lacks

    def views_from(first: int) -> DaliViews:
        if first not in pipelines:
            pipelines[first] = DaliViews(ViewSpec(views=cfg.views - first, size=tokenizer.input_size,
                                                  interp=job.recipe.interp, jitter=cfg.target_jitter),
                                         batch_size=cfg.batch_size, device=device, num_threads=cfg.num_threads)
        return pipelines[first]

    summary = TokenizeResult(shards=len(mine), skipped=skipped)
    desc = f"tokenize[{dist.rank}]" if dist.world_size > 1 else "tokenize"
    bar = progress_bar(total=_expected_images(todo), desc=desc, unit="img", disable=not cfg.progress,
                       position=dist.rank)
    for shard in todo:
        first = grow.get(str(shard), 0)
        images, n_views, rejects = tokenize_shard(shard, job, tokenizer, views_from(first), device, bar, first,
                                                  dtype=precision.dtype)
        summary.images += images
        summary.views += n_views
        summary.rejects += [r.as_dict() for r in rejects]
    bar.close()
    summary.seconds = time.perf_counter() - start
    return _gather_and_write(summary, out, dist, settings_yaml(redacted(asdict(cfg))))


def _gather_and_write(summary: TokenizeResult, out: Location, dist, settings: str) -> TokenizeResult:
    parts = [summary]
    if dist.world_size > 1:
        parts = [None] * dist.world_size
        torch.distributed.all_gather_object(parts, summary)
    total = TokenizeResult(seconds=max(p.seconds for p in parts))
    for p in parts:
        total.shards += p.shards
        total.skipped += p.skipped
        total.images += p.images
        total.views += p.views
        total.rejects += p.rejects
    # A rerun that finds every shard done keeps the summary of the run that did the work.
    summary_file = out / "summary.json"
    if dist.rank == 0 and (total.skipped < total.shards or not storage.exists(summary_file)):
        record = {**total.summary(), "reject_list": total.rejects}
        write_text_atomic(summary_file, json.dumps(redacted(record), indent=1))
        write_text_atomic(out / "config.yaml", settings)  # what --config takes back
    if dist.world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return total
