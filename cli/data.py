"""The commands that make and read data: ``shards``, ``sample``, ``index``, ``tokenize``, ``plan``, ``inspect``."""

from __future__ import annotations

import json

import click

from cli import CONTEXT, main
from cli.options import (
    DEVICE,
    MAX_PIXELS,
    MAX_SEED,
    MIX_SHARDS,
    NUM_THREADS,
    PARTITIONS,
    QUIET,
    SEED,
    SHARDS,
    LocationType,
    Real,
    config_of,
    echo_summary,
    main_process,
    say,
    setting,
)
from pipelines.config import IndexConfig, InspectConfig, PlanConfig, ShardsConfig, TokenizeConfig
from pipelines.recipes import RECIPES


@main.command(context_settings=CONTEXT)
@click.argument("sources", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the shards.")
@setting(ShardsConfig, "--maxcount", type=click.IntRange(min=1), help="Images per shard.")
@setting(ShardsConfig, "--prefix", help="Shard file-name prefix.")
@setting(ShardsConfig, "--shuffle/--no-shuffle",
         help="Write the images in a seeded random order; --no-shuffle keeps the listing order "
              "(class by class for ImageFolder trees).")
@setting(ShardsConfig, "--seed", type=click.IntRange(0, MAX_SEED), help="Seed of the write order.")
@click.option("--classes", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Number the classes by this class map (another run's shards.json or classes.json), so that an id "
                   "means the same class in every set [default: this tree's class folders in name order].")
@click.option("--overwrite", is_flag=True,
              help="Replace the shards and reports of an earlier run in --out (and in --holdout-out), only once the "
                   "new run is complete: a failed run leaves the earlier one as it was (a folder that is not empty "
                   "is refused otherwise).")
@click.option("--image-column", default=None,
              help="Parquet sources: the column of image bytes (or a struct with bytes) [default: found by name: "
                   "image, jpg, png, webp, ...].")
@click.option("--label-column", default=None,
              help="Parquet sources: the column of class ids [default: found by name: label, cls, ...].")
@click.option("--holdout-per-class", type=Real(min=0, min_open=True), default=None,
              help="Also write a held-out set: this many images of each class (or this share, below 1), drawn "
                   "from --seed, disjoint from the training shards, with the same class map. A class gives at most "
                   "half its images (rounded down), with a warning where that is fewer than asked.")
@click.option("--holdout-out", type=click.Path(file_okay=False), default=None,
              help="Folder for the held-out shards [default: OUT-holdout].")
@MAX_PIXELS
@QUIET
def shards(**options):
    """Write WebDataset shards and DALI .idx files from image folders, path lists or Parquet.

    Each SOURCE is a flat folder of images, an ImageFolder tree (class sub-folders become
    .cls members; a folder with images both at its top and in sub-folders is refused), a text
    file with one image path per line, or a Parquet image dataset (a
    .parquet file, a folder of them, a glob or an s3:// / gs:// prefix: the Hugging Face layout,
    an image struct and a label whose class names the metadata holds, or img2dataset's jpg
    column), read a row group at a time. Each sample's .json member names where it came from
    (the file, or the Parquet file and row) and its class; shards.json records the order's seed
    and the class map, which --classes reuses for a validation or probe set. Sources that
    overlap (a file reached twice, by two sources or through a link) are refused.
    """
    from cli import as_flags
    from pipelines.shards import run_shards

    result = run_shards(config_of(ShardsConfig, options))
    for warning in result.warnings:
        say(f"shards: warning: {as_flags(warning, click.get_current_context().command)}", err=True)
    echo_summary("shards", result.summary())
    for reject in result.rejects + (result.holdout.rejects if result.holdout else []):
        say(f"  rejected {reject.key}: {reject.reason}", err=True)
    say(f"wrote {options['out']}" + (f" and {result.holdout.shards[0].parent}" if result.holdout and
                                      result.holdout.shards else ""))


@main.command(context_settings=CONTEXT)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the sample shards.")
@click.option("--maxcount", type=click.IntRange(min=1), default=8, show_default=True, help="Images per shard.")
@click.option("--holdout", type=click.IntRange(min=0, max=13), default=0, show_default=True,
              help="Keep the last N photographs (by name) out of --out, for validation.")
@click.option("--holdout-out", default=None, type=click.Path(file_okay=False),
              help="Folder for the held-out shard (needed with --holdout).")
def sample(out, maxcount, holdout, holdout_out):
    """Write the embedded sample of real photographs as WebDataset shards."""
    from pipelines.shards import write_sample

    if holdout and not holdout_out:
        raise click.UsageError("--holdout needs --holdout-out, the folder for the held-out shard")
    for prefix, folder, result in write_sample(out, maxcount=maxcount, holdout=holdout, holdout_out=holdout_out):
        echo_summary(prefix, result.summary())
        say(f"wrote {folder}")


@main.command(context_settings=CONTEXT)
@SHARDS
@click.option("--overwrite", is_flag=True, help="Write the index of every shard, also where one exists.")
@QUIET
def index(**options):
    """Write a DALI .idx beside each shard that has none, local or on object storage.

    The training order reads each image by its offset; without an .idx, every node scans the
    tar headers once (by range requests on object storage).
    """
    from pipelines.index import run_index

    result = run_index(config_of(IndexConfig, options))
    say(f"indexed {len(result['written'])} of {result['shards']} shards ({result['skipped']} had an index)")


@main.command(context_settings=CONTEXT)
@SHARDS
@click.option("--tokenizer", required=True, type=click.Path(dir_okay=False),
              help="Tokenizer file: OpenAI's encoder.pkl, a dVAE state dict, a train-dvae checkpoint or a "
                   "BEiT v2 VQ-KD .pth.")
@click.option("--out", required=True, type=LocationType(file_okay=False),
              help="Folder (or s3:// / gs:// prefix) for the token Parquet files.")
@click.option("--recipe", type=click.Choice(sorted(RECIPES)), default=None,
              help="The paper whose views to draw: beit (crops from 8%, 112-px Lanczos tokenizer view) or beitv2 "
                   "(crops from 20%, the model's 224-px bicubic view) [default: beit for a dVAE, beitv2 for VQ-KD].")
@setting(TokenizeConfig, "--views", type=click.IntRange(min=1), help="Views per image.")
@click.option("--min-scale", type=Real(min=0, min_open=True, max=1), default=None,
              help="Smallest crop area, as a fraction of the image [default: the recipe's, 0.08 or 0.2].")
@SEED
@setting(TokenizeConfig, "--batch-size", type=click.IntRange(min=1),
         help="Images per batch (each gives --views tokenizer inputs).")
@click.option("--min-size", type=click.IntRange(min=0), default=None,
              help="Reject images whose shorter side is under N pixels [default: the tokenizer's input size]; "
                   "0 keeps every decodable image and upscales small views.")
@click.option("--no-target-jitter", "target_jitter", is_flag=True, flag_value=False, default=True,
              help="Tokenize views without colour jitter; pretrain then draws fresh jitter each epoch.")
@click.option("--overwrite", is_flag=True, help="Replace token files made with another tokenizer or recipe.")
@click.option("--strict", is_flag=True,
              help="Exit non-zero if any sample was rejected; a shard with a rejected sample is not written.")
@click.option("--compile", is_flag=True,
              help="Compile the tokenizer with torch.compile (slow to start; faster over a long run on a GPU).")
@MAX_PIXELS
@click.option("--batch-pixels", type=click.IntRange(min=1), default=None,
              help="Decoded pixels one batch may hold: a batch ends early rather than pass it, and a larger image "
                   "is rejected, before any is decoded [default: 536,870,912, about 1.6 GB of 8-bit RGB].")
@NUM_THREADS
@DEVICE
@QUIET
def tokenize(**options):
    """Tokenize every image's views once and write one Parquet file per shard."""
    from pipelines.tokenize_shards import run_tokenize

    cfg = config_of(TokenizeConfig, options)
    result = run_tokenize(cfg)
    if main_process():
        echo_summary("tokenize", result.summary())
        for r in result.rejects[:20]:
            say(f"  rejected {r['shard']}:{r['key']}: {r['reason']}", err=True)
        if len(result.rejects) > 20:
            say(f"  ... {len(result.rejects) - 20} more in {cfg.out}/summary.json", err=True)
        say(f"wrote {cfg.out}")
    if cfg.strict and result.rejects:
        held = len({r["shard"] for r in result.rejects})
        raise click.ClickException(f"{len(result.rejects)} samples were rejected (--strict); the {held} shards that "
                                   "hold them were not written")


@main.command(context_settings=CONTEXT)
@SHARDS
@click.option("--tokens", required=True, type=LocationType(exists=True, file_okay=False),
              help="Folder of token Parquet files written by beit-data tokenize.")
@setting(PlanConfig, "--batch-size", type=click.IntRange(min=1),
         help="Images per rank per micro-batch, as in pretrain.")
@setting(PlanConfig, "--grad-accum", type=click.IntRange(min=1), help="Micro-batches per step, as in pretrain.")
@setting(PlanConfig, "--world-size", type=click.IntRange(min=1),
         help="Ranks of the run: they split each global step.")
@setting(PlanConfig, "--global-batch", type=click.IntRange(min=1),
         help="Images per global step (sets --batch-size to it / ranks / --grad-accum).")
@setting(PlanConfig, "--epochs", type=click.IntRange(min=1), help="Epochs to print.")
@setting(PlanConfig, "--start-epoch", type=click.IntRange(min=0), help="First epoch to print.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Print at most N steps of each epoch.")
@click.option("--rank", type=click.IntRange(min=0), default=None, help="Print this rank only (default: every rank).")
@click.option("--skip-missing", is_flag=True, help="Skip shards that have no token file, as pretrain does.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per batch: epoch, rank, step, keys, views.")
@PARTITIONS
@MIX_SHARDS
@SEED
def plan(as_json, **options):
    """Print the keys and stored views of every batch that pretrain will see, without decoding images.

    Batches come ordered by epoch, global step and rank, from the same code as the training stream:
    use the run's --batch-size (or --global-batch), --world-size, --grad-accum, --partitions,
    --mix-shards and --seed. A global step holds the same images on any --world-size: the ranks
    only split it.
    """
    from pipelines.plan import format_batch, run_plan

    planned = run_plan(config_of(PlanConfig, options))
    if planned.note:
        say(f"plan: {planned.note}", err=True)
    for batch in planned:
        say(json.dumps(batch.as_dict()) if as_json else format_batch(batch))


@main.command(context_settings=CONTEXT)
@click.argument("tokens", type=LocationType())
@click.option("--shards", default=None, help="Shards to check coverage against (and to find images for --render).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON document.")
@click.option("--render", default=None, metavar="KEY", help="Draw the view of this key as a PNG.")
@setting(InspectConfig, "--view", type=click.IntRange(min=0), help="View to draw with --render.")
@click.option("--tokenizer", default=None, type=click.Path(dir_okay=False),
              help="Tokenizer with a decoder, to add the reconstruction panel to --render.")
@click.option("--out", default=None, type=LocationType(dir_okay=False), help="PNG file for --render.")
@click.option("--histogram", default=None, type=LocationType(dir_okay=False),
              help="Also draw token frequencies to this PNG (linear and log scales, dead codes marked).")
@setting(InspectConfig, "--max-code-share", type=Real(0, 1, min_open=True),
         help="Warn when one code holds more than this share of the tokens.")
@setting(InspectConfig, "--max-dead-codes", type=Real(0, 1),
         help="Warn when more than this share of the codebook never occurs.")
def inspect(as_json, **options):
    """Summarise, validate and draw token Parquet files (exit 1 when validation finds errors)."""
    from pipelines.inspect_tokens import format_summary, run_inspect

    cfg = config_of(InspectConfig, options)
    result = run_inspect(cfg)
    if cfg.render is not None:
        say(f"wrote {cfg.out}")
        return
    if as_json:
        say(json.dumps(result, indent=1))
    else:
        say(format_summary(result))
        if cfg.histogram:
            say(f"wrote {cfg.histogram}")
    if result["errors"]:
        raise SystemExit(1)
