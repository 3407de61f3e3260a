"""``beit-data tokenize``: V views per image, decoded by DALI, tokenized once, one Parquet per shard.

A run is plan, execute, summarise, whichever engine executes it:

- **plan** (``prepare``, ``holding``, ``plan_shards``): expand and check the shards, hold the
  output folder under a lock, remove the temporary files killed runs left, and decide what each
  shard needs: nothing (its file is finished), the views its file lacks, or all of them
  (``ShardTask``);
- **execute**, one shard at a time (``ShardRunner``: one process's tokenizer and DALI pipelines
  for its life, calling ``tokenize_shard``), by the plain engine here (one process, or the ranks
  torchrun or srun start: shard ``i`` goes to rank ``i % world_size``) or by the Ray engine
  (``pipelines.ray_engine``: a pool of workers that take one shard at a time and start a dead
  worker's shard again, a bounded number of times);
- **summarise** (``write_summary``): ``summary.json`` and ``config.yaml``, the same for both.

Views are pure functions of (seed, key, view, image size) and each shard's file is written
atomically, so any engine and any number of ranks or workers write the same rows, a shard done
twice is written twice the same, and a killed run resumes by skipping finished shards.

By default, images whose shorter side is under the tokenizer's input size are rejected
rather than upscaled: such an image cannot give a 224-pixel ViT view without inventing
detail. ``min_size`` lowers the bar (0 keeps every decodable image and upscales its views,
as the reference's RandomResizedCrop does). Each token file records its shard's fingerprint,
so a shard rewritten since is refused rather than skipped as finished. A shard whose ``.idx``
no longer lists its members (training reads the images by it) is refused before its file is
written, naming ``beit-data index --overwrite``.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from beit_common import (
    BeitDataError,
    Location,
    ensure_writable_dir,
    folder_lock,
    redact,
    redacted,
    remove_stale_temps,
    remove_stale_uploads,
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

__all__ = ["TokenizeConfig", "TokenizeJob", "TokenizeResult", "ShardTask", "ShardResult", "TokenizePlan",
           "ShardRunner", "run_tokenize", "prepare", "holding", "plan_shards", "tokenize_shard", "write_summary"]

RESIZE_FILTER = {"lanczos": "lanczos3", "bicubic": "bicubic", "bilinear": "bilinear"}  # as the metadata names them


@dataclass(frozen=True)
class ShardResult:
    """What tokenizing one shard gave: its images and views written, and its rejects (``Reject.as_dict``)."""

    images: int
    views: int
    rejects: tuple[dict, ...] = ()


@dataclass
class TokenizeResult:
    """What a tokenize run did, over all ranks or workers; ``rejects`` names each sample left out and
    why. The Ray engine also counts the starts of a shard after its worker died (``retried``),
    names the shards it gave up on (``failed``, redacted: a rerun does those) and says where its
    time went (``phases``: starting Ray, starting the workers, the shards, stopping Ray)."""

    shards: int = 0
    skipped: int = 0
    images: int = 0
    views: int = 0
    rejects: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    retried: int = 0
    failed: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)

    def add(self, done: ShardResult) -> None:
        self.images += done.images
        self.views += done.views
        self.rejects += list(done.rejects)

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


# ---- plan ----


@dataclass(frozen=True)
class ShardTask:
    """One shard's work: its place in the run's list of shards (what travels to a Ray worker, rather
    than its location, which may hold a credential), its name (redacted, for messages) and the first
    view to compute: 0 for all, ``V0`` for a file that holds views ``0 .. V0 - 1`` of this recipe."""

    index: int
    name: str
    first: int = 0


@dataclass(frozen=True)
class TokenizePlan:
    """The shards still to tokenize, how many are finished, and the images the rest hold where
    their ``.idx`` headers say (None where one is missing), for the progress bar."""

    todo: tuple[ShardTask, ...]
    skipped: int
    images: int | None


def prepare(cfg: TokenizeConfig) -> tuple[TokenizeJob, list[Location], Tokenizer]:
    """The run's job, its shards and its tokenizer (on the CPU), once every check that needs no
    token file has passed: the shards exist, none is of a set left half-written, no two write one
    file, none is in ``out``, and ``out`` can be written."""
    shards = expand_shards(cfg.shards)
    check_finished_folders(shards)  # not the part of a set an interrupted `shards` run left
    token_paths(cfg.out, shards)  # two shards of one name would write one file
    _check_out_beside_shards(shards, cfg.out)
    tokenizer = load_tokenizer(cfg.tokenizer)
    job = TokenizeJob.resolve(cfg, tokenizer)
    ensure_writable_dir(cfg.out)
    return job, shards, tokenizer


@contextmanager
def holding(out: Location, lead: bool):
    """The output folder while the block runs: ``lead`` (rank 0, or the Ray engine's driver) holds
    its lock, so a second run into it is refused at once; each process removes the temporary files
    that dead processes of its host left there and in the upload cache."""
    with folder_lock(out, "beit-data tokenize") if lead else nullcontext():
        sweep(out)
        yield


def sweep(out: Location) -> None:
    """Remove what killed processes of this host left half-written: token files in ``out`` and
    objects on their way up."""
    remove_stale_temps(out)
    remove_stale_uploads()


def plan_shards(shards: list[Location], out: Location, meta: TokenMeta, overwrite: bool) -> TokenizePlan:
    """What each shard needs: a finished file made from the same shard and recipe is skipped, also
    with ``overwrite`` (it would be written again byte for byte), so a run with ``overwrite`` that
    was killed keeps what it rewrote when it runs again; a file with fewer views of the same recipe
    gets the missing ones only; any other shard gets all of them.

    Raises:
        BeitDataError: For a finished file that is unreadable, from another recipe, or made
            from a shard that has changed since, without ``overwrite``; each names it. A shard
            whose ``.idx`` is stale is refused also with ``overwrite``, naming ``index --overwrite``.
    """
    todo, skipped = [], 0
    hint = "; pass `overwrite` to replace it"
    done = _finished(out)
    for index, shard in enumerate(shards):
        target = token_path(out, shard)
        task = ShardTask(index, redact(shard.name))
        if target.name not in done:
            todo.append(task)
            continue
        try:
            have = read_meta(target)
            if grows_to(have, meta) and not overwrite:  # views 0 .. V-1 are kept; V .. are added
                check_fingerprint(shard, have.shard, target, full=storage.scan_is_cheap(shard))
                todo.append(replace(task, first=grows_to(have, meta)))
                continue
            check_recipe(have, meta, f"{target} and this run", hint)
            # On object storage, the size (and the .idx where there is one): not a scan of the tar.
            check_fingerprint(shard, have.shard, target, full=storage.scan_is_cheap(shard))
        except StaleIndex:
            raise  # tokenizing again would not mend the index
        except BeitDataError as exc:
            if overwrite:
                todo.append(task)
                continue
            raise BeitDataError(str(exc) if "`overwrite`" in str(exc) else f"{exc}{hint}") from None
        skipped += 1
    return TokenizePlan(tuple(todo), skipped, _expected_images([shards[t.index] for t in todo]))


def _finished(out: Location) -> set[str]:
    """Names of the token files already in ``out``: one listing (a local folder or a prefix)."""
    return {p.name for p in token_files(out, allow_empty=True)}


def _expected_images(shards: list[Location]) -> int | None:
    """Sample count from the shards' .idx headers, for the progress bar, where all exist."""
    counts = [index_count(shard) for shard in shards]
    return None if None in counts else sum(counts)


def _check_out_beside_shards(shards: list[Location], out: Location) -> None:
    """Refuse token files written beside their shards: img2dataset keeps ``00000.parquet`` (its
    metadata) beside ``00000.tar``, the very name the token file would get."""
    folder = Location(out.rstrip("/")).identity()
    for shard in shards:
        if shard.seekable and shard.parent.identity() == folder:
            raise BeitDataError(f"`out` {out} is the folder of the shards: give the token files a folder of "
                                f"their own (img2dataset keeps {shard.stem}.parquet beside {shard})")


# ---- execute: one shard ----


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


# A test hook, and nothing else: tests/system/test_ray_engine.py kills a Ray worker in the middle of
# a shard at a point it chooses, not by timing. Set (in the workers' environment) to a file of lines
# "SHARD-NAME once" (the line goes as the worker dies, so the shard's next start goes through) or
# "SHARD-NAME always"; unset, it costs one lookup a shard.
CRASH_HOOK = "BEIT_DATA_TEST_CRASH"


def _crash_for_test(shard: Location) -> None:
    marker = os.environ.get(CRASH_HOOK)
    try:
        lines = Path(marker).read_text().splitlines() if marker else []
    except OSError:
        return
    for line in lines:
        name, _, when = line.partition(" ")
        if name == shard.name:
            if when == "once":
                write_text_atomic(marker, "".join(f"{other}\n" for other in lines if other != line))
            os._exit(70)


def tokenize_shard(shard: Location, job: TokenizeJob, tokenizer: Tokenizer, views: DaliViews, device,
                   bar=None, first: int = 0, dtype: torch.dtype | None = None) -> tuple[int, int, list[Reject]]:
    """Tokenize one shard and write its Parquet file; from view ``first`` on, added to the file's
    views ``0 .. first - 1``, which are kept as they are. ``dtype`` is the tokenizer's autocast
    (``Tokenizer.ids``); ``bar`` (if any) counts its images. Returns (images, views, rejects)."""
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
        _crash_for_test(shard)
        if bar is not None:
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


class ShardRunner:
    """What one process tokenizes with for its life: the tokenizer on its device at its precision,
    and a DALI pipeline for each number of views a file lacks (all of them, or those from a file's
    ``V0`` on). Called with a ``ShardTask``, it tokenizes that shard of ``shards`` and writes its
    file. The plain engine holds one per process; each Ray worker holds one (``on_its_device``)."""

    def __init__(self, job: TokenizeJob, shards: list[Location], device: torch.device,
                 tokenizer: Tokenizer | None = None):
        cfg = job.cfg
        self.job, self.shards, self.device = job, shards, device
        self.tokenizer = (load_tokenizer(cfg.tokenizer) if tokenizer is None else tokenizer).to(device)
        self.precision, why = resolve_precision(cfg.precision, device)
        self.note = f"tokenize: precision {why}" if self.precision.worth_saying else None
        if cfg.compile:  # the fingerprint was taken from the weights before; compiling does not change them
            self.tokenizer.compile_encoder()
        self.pipelines: dict[int, DaliViews] = {}

    @classmethod
    def on_its_device(cls, job: TokenizeJob, shards: list[Location]) -> ShardRunner:
        """A runner for a Ray worker: on the GPU Ray gave it (its only visible one), or the CPU."""
        return cls(job, shards, resolve_device(job.cfg.device))

    def views_from(self, first: int) -> DaliViews:
        if first not in self.pipelines:
            cfg = self.job.cfg
            self.pipelines[first] = DaliViews(ViewSpec(views=cfg.views - first, size=self.tokenizer.input_size,
                                                       interp=self.job.recipe.interp, jitter=cfg.target_jitter),
                                              batch_size=cfg.batch_size, device=self.device,
                                              num_threads=cfg.num_threads)
        return self.pipelines[first]

    def __call__(self, task: ShardTask, bar=None) -> ShardResult:
        images, views, rejects = tokenize_shard(self.shards[task.index], self.job, self.tokenizer,
                                                self.views_from(task.first), self.device, bar, task.first,
                                                dtype=self.precision.dtype)
        return ShardResult(images, views, tuple(r.as_dict() for r in rejects))

    def sweep(self) -> None:
        """What a Ray worker does last: remove what killed processes of its host left half-written."""
        sweep(self.job.cfg.out)


# ---- the engines, and the summary ----


def run_tokenize(cfg: TokenizeConfig) -> TokenizeResult:
    """Tokenize the shards of ``cfg`` with its engine; the result, over all ranks or workers, goes to
    ``OUT/summary.json``. With the Ray engine, shards given up on are in ``failed`` (and no summary
    is written: a rerun does them, as after a killed run)."""
    if cfg.engine == "ray":
        return _run_on_ray(cfg)
    start = time.perf_counter()
    job, shards, tokenizer = prepare(cfg)
    device = resolve_device(cfg.device, local_rank=dist_info().local_rank)
    dist = init_distributed(device)
    with holding(cfg.out, lead=dist.rank == 0):
        mine = shards[dist.rank :: dist.world_size]
        plan = plan_shards(mine, cfg.out, job.meta, cfg.overwrite)
        runner = ShardRunner(job, mine, device, tokenizer)
        if dist.rank == 0 and runner.note:
            print(runner.note, file=sys.stderr)
        result = TokenizeResult(shards=len(mine), skipped=plan.skipped)
        desc = f"tokenize[{dist.rank}]" if dist.world_size > 1 else "tokenize"
        bar = progress_bar(total=plan.images, desc=desc, unit="img", disable=not cfg.progress, position=dist.rank)
        for task in plan.todo:
            result.add(runner(task, bar))
        bar.close()
        result.seconds = time.perf_counter() - start
        return _gather_and_write(result, cfg, dist)


def _run_on_ray(cfg: TokenizeConfig) -> TokenizeResult:
    """The Ray engine: this process plans and summarises; a pool of Ray workers, each with its own
    ``ShardRunner``, executes. What a worker is built from (the job and the shards' locations,
    which may hold credentials) reaches it through Ray's object store, never as an argument Ray
    records (``ray_engine.run_pool``); the tasks carry indexes and redacted names."""
    from pipelines import ray_engine

    start = time.perf_counter()
    ray_engine.check_out(cfg.out, cfg.ray_address)
    ray_engine.require_ray()
    if dist_info().world_size > 1:
        raise BeitDataError("`engine` ray runs its own workers: start one process, not one per torchrun or srun task")
    job, shards, _ = prepare(cfg)
    with holding(cfg.out, lead=True):
        plan = plan_shards(shards, cfg.out, job.meta, cfg.overwrite)
        result = TokenizeResult(shards=len(shards), skipped=plan.skipped)
        if plan.todo:
            _execute_on_ray(cfg, plan, functools.partial(ShardRunner.on_its_device, job, shards), result)
        result.seconds = time.perf_counter() - start
        if not result.failed:
            write_summary(result, cfg)
    return result


def _execute_on_ray(cfg: TokenizeConfig, plan: TokenizePlan, build, result: TokenizeResult) -> None:
    from pipelines import ray_engine

    bar = progress_bar(total=plan.images, desc="tokenize", unit="img", disable=not cfg.progress)
    done: dict[int, ShardResult] = {}

    def finished(task: ShardTask, shard: ShardResult) -> None:
        done[task.index] = shard
        bar.update(shard.images)
        bar.set_postfix_str(f"shards {len(done)}/{len(plan.todo)}", refresh=False)

    settings = ray_engine.PoolSettings(workers=cfg.workers, gpus_per_worker=cfg.gpus_per_worker,
                                       cpus_per_worker=cfg.cpus_per_worker, max_retries=cfg.max_retries)
    try:
        with ray_engine.ray_cluster(cfg.ray_address) as cluster:
            outcome = ray_engine.run_pool(plan.todo, build, settings, cluster, finished,
                                          on_note=lambda line: bar.write(line, file=sys.stderr))
            leaving = time.perf_counter()
    finally:
        bar.close()
    result.phases = {"ray_start": cluster.start_s, "workers": outcome.seconds["workers"],
                     "shards": outcome.seconds["tasks"], "ray_stop": time.perf_counter() - leaving}
    for index in sorted(done):  # in the shards' order, as the plain engine gives them
        result.add(done[index])
    result.retried = outcome.retried
    result.failed = [f"{task.name}: {why}" for task, why in outcome.failed]


def _gather_and_write(summary: TokenizeResult, cfg: TokenizeConfig, dist) -> TokenizeResult:
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
    if dist.rank == 0:
        write_summary(total, cfg)
    if dist.world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return total


def write_summary(total: TokenizeResult, cfg: TokenizeConfig) -> None:
    """``OUT/summary.json`` (the run's figures and every reject) and ``OUT/config.yaml`` (what
    ``--config`` takes back), whichever engine ran. A rerun that finds every shard done keeps the
    summary of the run that did the work."""
    summary_file = cfg.out / "summary.json"
    if total.skipped < total.shards or not storage.exists(summary_file):
        record = {**total.summary(), "reject_list": total.rejects}
        write_text_atomic(summary_file, json.dumps(redacted(record), indent=1))
        write_text_atomic(cfg.out / "config.yaml", settings_yaml(redacted(asdict(cfg))))
