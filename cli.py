"""The ``beit-data`` command line: a thin click group over the ``pipelines`` stages.

Each command parses its options, builds its stage's config, calls ``run_*()`` and prints a
summary. torch and DALI are imported inside the commands, so ``beit-data --help`` is instant.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys

import click

# MKL picks kernels by memory alignment unless told not to, which moves the last bits of a
# float32 sum between runs; exact resume on the CPU compares losses bit for bit. It must be
# set before torch loads, which the commands do later.
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")

from beit_common import BeitDataError, Location, __version__, os_error, redact  # noqa: E402
from pipelines.config import (
    DVAE_CONFIGS,
    RECIPES,
    InspectConfig,
    PlanConfig,
    PretrainConfig,
    ProbeConfig,
    ShardsConfig,
    TokenizeConfig,
    TrainDVAEConfig,
    default,
)

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

def setting(config: type, *decls: str, name: str | None = None, **kwargs):
    """A click option for a config setting; its default, shown in ``--help``, is the config's."""
    name = name or decls[0].split("/")[0].lstrip("-").replace("-", "_")
    return click.option(*decls, default=default(config, name), show_default=True, **kwargs)


class LocationType(click.Path):
    """A local path, checked as ``click.Path`` checks it, or an object-storage URL (``s3://``,
    ``gs://``), checked when it is used (a missing bucket or prefix is one line then)."""

    def convert(self, value, param, ctx):
        location = Location(value)
        return location if not location.is_local else Location(super().convert(value, param, ctx))


SHARDS_OPTION = click.option(
    "--shards", "shards", required=True,
    help="Shards: a brace pattern (data/train-{000000..000099}.tar), a directory or a glob; local, or s3://, "
         "gs://, http(s):// URLs (a prefix is listed), or WebDataset pipe: commands.",
)
SEED_OPTION = setting(PretrainConfig, "--seed", type=int, help="Seed of every random choice.")
MIX_SHARDS_OPTION = setting(PretrainConfig, "--mix-shards", type=click.IntRange(min=1),
                            help="Shards each partition reads at once; their samples are permuted together.")
PARTITIONS_OPTION = setting(PlanConfig, "--partitions", type=click.IntRange(min=1),
                            help="Partitions of each epoch: a global step takes its share of samples from each. A "
                                 "rank reads whole partitions when the number of ranks divides them.")
QUIET_OPTION = click.option("--quiet", is_flag=True, help="Hide progress bars.")
MAX_PIXELS_OPTION = click.option(
    "--max-pixels", type=click.IntRange(min=1), default=None,
    help="Reject images with more pixels, as likely decompression bombs [default: Pillow's limit, 178,956,970].")
DEVICE_OPTION = setting(PretrainConfig, "--device",
                        help="cpu, cuda, cuda:N, or auto (this rank's GPU where CUDA is present).")
NUM_THREADS_OPTION = setting(PretrainConfig, "--num-threads", type=click.IntRange(min=1),
                             help="DALI CPU threads.")


def as_flags(message: str, command: click.Command | None) -> str:
    """The library names settings in backticks (`batch_size`); on the command line they are flags."""
    if command is None:
        return message
    flags = {}
    for param in command.params:
        if isinstance(param, click.Option) and param.name:
            flags[param.name.rstrip("_")] = param.opts[0]
            flags[param.name.rstrip("_").removeprefix("no_")] = param.opts[0]
    return re.sub(r"`([a-z_]+)`", lambda m: flags.get(m.group(1), m.group(0)), message)


class Group(click.Group):
    """Turns a ``BeitDataError`` into a one-line message and a non-zero exit."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BeitDataError as exc:
            command = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
            raise click.ClickException(redact(as_flags(str(exc), command))) from None
        except OSError as exc:  # a full disk, a missing permission: the file and the reason
            raise click.ClickException(redact(str(os_error(exc)))) from None


@click.group(cls=Group, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="beit-data")
def main():
    """beit-data: tokenize image shards once, then pretrain BEiT on precomputed targets."""


def layer_numbers(value: str | None) -> tuple[int, ...] | None:
    """``8,9,10`` as block numbers, for --layers and --probe-layers."""
    if not value:
        return None
    try:
        return tuple(int(x) for x in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected block numbers such as 8,9,10, got {value}") from None


def say(text: str, err: bool = False) -> None:
    """``click.echo`` with every URL's credentials redacted: nothing printed holds a secret."""
    click.echo(redact(text), err=err)


def echo_summary(title: str, summary: dict) -> None:
    say(f"{title}: " + ", ".join(f"{k} {v}" for k, v in summary.items()))


def main_process() -> bool:
    """Whether this process is rank 0 (or alone): under torchrun only rank 0 prints the summary."""
    from pipelines.runtime import dist_info

    return dist_info().rank == 0


@main.command(context_settings=CONTEXT)
@click.argument("sources", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the shards.")
@setting(ShardsConfig, "--maxcount", type=click.IntRange(min=1),
         help="Images per shard.")
@setting(ShardsConfig, "--prefix", help="Shard file-name prefix.")
@setting(ShardsConfig, "--shuffle/--no-shuffle",
         help="Write the images in a seeded random order; --no-shuffle keeps the listing order "
              "(class by class for ImageFolder trees).")
@setting(ShardsConfig, "--seed", type=int, help="Seed of the write order.")
@click.option("--classes", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Number the classes by this class map (another run's shards.json or classes.json), so that an id "
                   "means the same class in every set [default: this tree's class folders in name order].")
@click.option("--overwrite", is_flag=True,
              help="Replace the shards and reports of an earlier run in --out (a folder that is not empty is refused "
                   "otherwise).")
@MAX_PIXELS_OPTION
@QUIET_OPTION
def shards(sources, out, maxcount, prefix, shuffle, seed, classes, overwrite, max_pixels, quiet):
    """Write WebDataset shards and DALI .idx files from image folders or path lists.

    Each SOURCE is a flat folder of images, an ImageFolder tree (class sub-folders become
    .cls members) or a text file with one image path per line. Each sample's .json member names
    its source file (and class); shards.json records the order's seed and the class map, which
    --classes reuses for a validation or probe set.
    """
    from pipelines.shards import run_shards

    result = run_shards(ShardsConfig(sources=sources, out=out, maxcount=maxcount, prefix=prefix,
                                     shuffle=shuffle, seed=seed, classes=classes, overwrite=overwrite,
                                     max_pixels=max_pixels, progress=not quiet))
    echo_summary("shards", result.summary())
    for reject in result.rejects:
        say(f"  rejected {reject.key}: {reject.reason}", err=True)
    say(f"wrote {out}")


@main.command(context_settings=CONTEXT)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the sample shards.")
@click.option("--maxcount", type=click.IntRange(min=1), default=8, show_default=True,
              help="Images per shard.")
@click.option("--holdout", type=click.IntRange(min=0, max=13), default=0, show_default=True,
              help="Keep the last N photographs (by name) out of --out, for validation.")
@click.option("--holdout-out", default=None, type=click.Path(file_okay=False),
              help="Folder for the held-out shard (needed with --holdout).")
def sample(out, maxcount, holdout, holdout_out):
    """Write the embedded sample of real photographs as WebDataset shards."""
    import tempfile

    from beit_data.sample import sample_images, write_sample_list
    from pipelines.shards import ShardsConfig, run_shards

    if holdout and not holdout_out:
        raise click.UsageError("--holdout needs --holdout-out, the folder for the held-out shard")
    photos = sample_images()
    parts = [(out, photos[:len(photos) - holdout], "sample")]
    if holdout:
        parts.append((holdout_out, photos[len(photos) - holdout:], "heldout"))
    with tempfile.TemporaryDirectory() as tmp:
        for folder, chosen, prefix in parts:
            listing = write_sample_list(f"{tmp}/{prefix}.txt", chosen)
            result = run_shards(ShardsConfig(sources=[listing], out=folder, maxcount=maxcount, prefix=prefix,
                                             progress=False))
            echo_summary(prefix, result.summary())
            say(f"wrote {folder}")


@main.command("train-dvae", context_settings=CONTEXT)
@SHARDS_OPTION
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Checkpoint file to write.")
@setting(TrainDVAEConfig, "--config", type=click.Choice(DVAE_CONFIGS),
         help="Architecture: tiny (n_hid 16, vocab 512) or dalle (OpenAI's sizes).")
@setting(TrainDVAEConfig, "--steps", type=click.IntRange(min=1), help="Training steps.")
@setting(TrainDVAEConfig, "--batch-size", type=click.IntRange(min=1), help="Images per step.")
@setting(TrainDVAEConfig, "--lr", type=float, help="Peak learning rate (cosine decay).")
@setting(TrainDVAEConfig, "--checkpoint-every", type=click.IntRange(min=1),
         help="Save a checkpoint every N steps.")
@click.option("--resume", is_flag=True, help="Continue training the checkpoint at --out.")
@click.option("--overwrite", is_flag=True, help="Replace an existing checkpoint at --out.")
@SEED_OPTION
@DEVICE_OPTION
@QUIET_OPTION
def train_dvae(shards, out, config, steps, batch_size, lr, checkpoint_every, resume, overwrite, seed,
               device, quiet):
    """Train a discrete VAE tokenizer on your own shards (DALL-E recipe, Gumbel-softmax)."""
    from pipelines.train_dvae import TrainDVAEConfig, run_train_dvae

    report = run_train_dvae(TrainDVAEConfig(
        shards=shards, out=out, config=config, steps=steps, batch_size=batch_size, lr=lr,
        checkpoint_every=checkpoint_every, resume=resume, overwrite=overwrite, seed=seed, device=device,
        progress=not quiet))
    echo_summary("held-out report", {k: report[k] for k in
                                     ("psnr", "psnr_mean_colour", "perplexity", "codes_used", "steps", "seconds")})
    say(f"wrote {out}")


@main.command(context_settings=CONTEXT)
@SHARDS_OPTION
@click.option("--tokenizer", required=True, type=click.Path(dir_okay=False),
              help="Tokenizer file: OpenAI's encoder.pkl, a dVAE state dict, a train-dvae checkpoint or a "
                   "BEiT v2 VQ-KD .pth.")
@click.option("--out", required=True, type=LocationType(file_okay=False),
              help="Folder (or s3:// / gs:// prefix) for the token Parquet files.")
@click.option("--recipe", type=click.Choice(sorted(RECIPES)), default=None,
              help="The paper whose views to draw: beit (crops from 8%, 112-px Lanczos tokenizer view) or beitv2 "
                   "(crops from 20%, the model's 224-px bicubic view) [default: beit for a dVAE, beitv2 for VQ-KD].")
@setting(TokenizeConfig, "--views", type=click.IntRange(min=1), help="Views per image.")
@click.option("--min-scale", type=click.FloatRange(min=0, min_open=True, max=1), default=None,
              help="Smallest crop area, as a fraction of the image [default: the recipe's, 0.08 or 0.2].")
@SEED_OPTION
@setting(TokenizeConfig, "--batch-size", type=click.IntRange(min=1),
         help="Images per batch (each gives --views tokenizer inputs).")
@click.option("--min-size", type=click.IntRange(min=0), default=None,
              help="Reject images whose shorter side is under N pixels [default: the tokenizer's input size]; "
                   "0 keeps every decodable image and upscales small views.")
@click.option("--no-target-jitter", is_flag=True,
              help="Tokenize views without colour jitter; pretrain then draws fresh jitter each epoch.")
@click.option("--overwrite", is_flag=True, help="Replace token files made with another tokenizer or recipe.")
@click.option("--strict", is_flag=True,
              help="Exit non-zero if any sample was rejected; a shard with a rejected sample is not written.")
@click.option("--compile", "compile_", is_flag=True,
              help="Compile the tokenizer with torch.compile (slow to start; faster over a long run on a GPU).")
@MAX_PIXELS_OPTION
@NUM_THREADS_OPTION
@DEVICE_OPTION
@QUIET_OPTION
def tokenize(shards, tokenizer, out, recipe, views, min_scale, seed, batch_size, min_size, no_target_jitter,
             overwrite, strict, compile_, max_pixels, num_threads, device, quiet):
    """Tokenize every image's views once and write one Parquet file per shard."""
    from pipelines.tokenize_shards import TokenizeConfig, run_tokenize

    summary = run_tokenize(TokenizeConfig(
        shards=shards, tokenizer=tokenizer, out=out, recipe=recipe, views=views, min_scale=min_scale, seed=seed,
        batch_size=batch_size,
        target_jitter=not no_target_jitter, min_size=min_size, compile=compile_, overwrite=overwrite, strict=strict,
        max_pixels=max_pixels, device=device, num_threads=num_threads, progress=not quiet))
    rejects = summary.pop("reject_list")
    if main_process():
        echo_summary("tokenize", summary)
        for r in rejects[:20]:
            say(f"  rejected {r['shard']}:{r['key']}: {r['reason']}", err=True)
        if len(rejects) > 20:
            say(f"  ... {len(rejects) - 20} more in {out}/summary.json", err=True)
        say(f"wrote {out}")
    if strict and rejects:
        held = len({r["shard"] for r in rejects})
        raise click.ClickException(f"{len(rejects)} samples were rejected (--strict); the {held} shards that hold them "
                                   "were not written")


@main.command(context_settings=CONTEXT)
@SHARDS_OPTION
@click.option("--overwrite", is_flag=True, help="Write the index of every shard, also where one exists.")
@QUIET_OPTION
def index(shards, overwrite, quiet):
    """Write a DALI .idx beside each shard that has none, local or on object storage.

    The training order reads each image by its offset; without an .idx, every node scans the
    tar headers once (by range requests on object storage).
    """
    from pipelines.shards import run_index

    result = run_index(shards, overwrite=overwrite, progress=not quiet)
    say(f"indexed {len(result['written'])} of {result['shards']} shards ({result['skipped']} had an index)")


@main.command(context_settings=CONTEXT)
@SHARDS_OPTION
@click.option("--tokens", required=True, type=LocationType(exists=True, file_okay=False),
              help="Folder of token Parquet files written by beit-data tokenize.")
@click.option("--out", required=True, type=LocationType(file_okay=False),
              help="Run folder (or s3:// / gs:// prefix): checkpoints and logs.")
@click.option("--recipe", type=click.Choice(sorted(RECIPES)), default=None,
              help="The paper's settings for the options marked [recipe]: beit (800 epochs) or beitv2 (1600 epochs, "
                   "the extra head) [default: the one the tokens were made with].")
@click.option("--model", default=None,
              help="beit_mim_{tiny,base,large}_patch16_224, or beitv2_mim_* for BEiT v2's extra head [recipe].")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs to train [recipe].")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Steps to train (overrides --epochs).")
@setting(PretrainConfig, "--batch-size", type=click.IntRange(min=1),
         help="Images per rank per step.")
@click.option("--lr", type=float, default=None, help="Peak learning rate, not rescaled [recipe].")
@setting(PretrainConfig, "--min-lr", type=float, help="Learning rate at the end of the cosine.")
@click.option("--warmup-epochs", type=float, default=None, help="Linear warmup, per step [recipe].")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=None,
              help="Warmup steps (overrides --warmup-epochs).")
@setting(PretrainConfig, "--weight-decay", type=float, help="AdamW weight decay.")
@click.option("--drop-path", type=float, default=None, help="Stochastic depth rate [recipe].")
@click.option("--layer-scale", type=float, default=None, help="LayerScale initial value [recipe].")
@setting(PretrainConfig, "--clip-grad", type=float, help="Gradient-norm clipping.")
@setting(PretrainConfig, "--checkpoint-every", type=click.IntRange(min=1),
         help="Save a checkpoint every N steps (and at the end).")
@setting(PretrainConfig, "--log-every", type=click.IntRange(min=1), help="Log every N steps.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint, exactly.")
@click.option("--stop-after", type=click.IntRange(min=1), default=None,
              help="Stop after N steps of this invocation, with a checkpoint (for time-limited jobs).")
@click.option("--skip-missing", is_flag=True, help="Skip shards that have no token file, instead of failing.")
@click.option("--compile", "compile_", is_flag=True, help="Compile the model with torch.compile.")
@click.option("--val-shards", default=None,
              help="Held-out shards (not read by training): masked-token loss, top-1/top-5 and perplexity on them.")
@click.option("--val-tokens", default=None, type=LocationType(exists=True, file_okay=False),
              help="The token Parquet files of --val-shards, made by the same tokenizer.")
@setting(PretrainConfig, "--val-every", type=click.IntRange(min=1),
         help="Evaluate the held-out set at step 0, every N steps and at the end.")
@setting(PretrainConfig, "--val-images", type=click.IntRange(min=1),
         help="Size of the fixed held-out set, over all ranks.")
@click.option("--probe-every", type=click.IntRange(min=1), default=None,
              help="Run a k-NN probe on rank 0 every N steps (off by default); needs --probe-train and --probe-val.")
@click.option("--probe-train", default=None, help="Labeled shards (.cls) the probe's k-NN votes with.")
@click.option("--probe-val", default=None, help="Labeled shards the probe is scored on.")
@click.option("--probe-layers", default=None, callback=lambda ctx, param, value: layer_numbers(value),
              help="Blocks (1-based, comma-separated) whose features the probe averages [default: the last].")
@click.option("--record-batches", is_flag=True,
              help="Each rank writes the keys of every step it trains to RUN/batches-rankR.jsonl, for audits.")
@PARTITIONS_OPTION
@MIX_SHARDS_OPTION
@NUM_THREADS_OPTION
@SEED_OPTION
@DEVICE_OPTION
@QUIET_OPTION
def pretrain(shards, tokens, out, recipe, model, epochs, steps, batch_size, lr, min_lr, warmup_epochs, warmup_steps,
             weight_decay, drop_path, layer_scale, clip_grad, checkpoint_every, log_every, resume, stop_after,
             skip_missing, compile_, val_shards, val_tokens, val_every, val_images, probe_every, probe_train,
             probe_val, probe_layers, record_batches, partitions, mix_shards, num_threads, seed, device, quiet):
    """Pretrain a BEiT MIM model on images and their precomputed visual tokens (torchrun-ready)."""
    from pipelines.pretrain import PretrainConfig, run_pretrain

    summary = run_pretrain(PretrainConfig(
        shards=shards, tokens=tokens, out=out, recipe=recipe, model=model, epochs=epochs, steps=steps,
        batch_size=batch_size, lr=lr, min_lr=min_lr, warmup_epochs=warmup_epochs, warmup_steps=warmup_steps,
        weight_decay=weight_decay, drop_path=drop_path, layer_scale=layer_scale, clip_grad=clip_grad,
        checkpoint_every=checkpoint_every, log_every=log_every, resume=resume, stop_after=stop_after,
        skip_missing=skip_missing, compile=compile_, val_shards=val_shards, val_tokens=val_tokens,
        val_every=val_every, val_images=val_images, probe_every=probe_every, probe_train=probe_train,
        probe_val=probe_val, probe_layers=probe_layers, record_batches=record_batches, partitions=partitions,
        mix_shards=mix_shards,
        num_threads=num_threads, seed=seed,
        device=device, progress=not quiet))
    stopped, held_out = summary.pop("stopped"), summary.pop("held_out")
    if main_process():
        echo_summary("pretrain", summary)
    if held_out and main_process():
        say("held-out masked-token accuracy: " + " -> ".join(
            f"step {r['step']} top-1 {100 * r['val_top1']:.1f}% top-5 {100 * r['val_top5']:.1f}% "
            f"(loss {r['val_loss']:.3f})" for r in held_out))
    if stopped:  # the conventional exit status of a process ended by that signal
        raise SystemExit(128 + int(getattr(signal, stopped)))


@main.command(context_settings=CONTEXT)
@SHARDS_OPTION
@click.option("--tokens", required=True, type=LocationType(exists=True, file_okay=False),
              help="Folder of token Parquet files written by beit-data tokenize.")
@setting(PlanConfig, "--batch-size", type=click.IntRange(min=1), help="Images per rank per step, as in pretrain.")
@setting(PlanConfig, "--world-size", type=click.IntRange(min=1), help="Ranks of the run.")
@setting(PlanConfig, "--epochs", type=click.IntRange(min=1), help="Epochs to print.")
@setting(PlanConfig, "--start-epoch", type=click.IntRange(min=0), help="First epoch to print.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Print at most N steps of each epoch.")
@click.option("--rank", type=click.IntRange(min=0), default=None, help="Print this rank only (default: every rank).")
@click.option("--skip-missing", is_flag=True, help="Skip shards that have no token file, as pretrain does.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per batch: epoch, rank, step, keys, views.")
@PARTITIONS_OPTION
@MIX_SHARDS_OPTION
@SEED_OPTION
def plan(shards, tokens, batch_size, world_size, epochs, start_epoch, steps, rank, skip_missing, as_json,
         partitions, mix_shards, seed):
    """Print the keys and stored views of every batch that pretrain will see, without decoding images.

    Batches come ordered by epoch, step and rank, from the same code as the training stream:
    use the run's --batch-size, --world-size, --mix-shards and --seed.
    """
    from pipelines.plan import PlanConfig, format_batch, run_plan

    cfg = PlanConfig(shards=shards, tokens=tokens, batch_size=batch_size, world_size=world_size, epochs=epochs,
                     start_epoch=start_epoch, steps=steps, rank=rank, seed=seed, partitions=partitions,
                     mix_shards=mix_shards,
                     skip_missing=skip_missing)
    planned = run_plan(cfg)
    if planned.note:
        say(f"plan: {planned.note}", err=True)
    for batch in planned:
        say(json.dumps(batch.as_dict()) if as_json else format_batch(batch))


@main.command(context_settings=CONTEXT)
@click.argument("model", type=LocationType(exists=True))
@click.option("--train-shards", required=True, help="Labeled shards (.cls members) the k-NN votes with.")
@click.option("--val-shards", required=True, help="Labeled shards the probe is scored on.")
@setting(ProbeConfig, "--k", type=click.IntRange(min=1), help="Neighbours of the k-NN.")
@setting(ProbeConfig, "--temperature", type=click.FloatRange(min=0, min_open=True),
         help="Temperature T of the k-NN's exp(cos / T) votes.")
@click.option("--layers", default=None, callback=lambda ctx, param, value: layer_numbers(value),
              help="Blocks (1-based, comma-separated) whose mean patch tokens are averaged [default: the last].")
@click.option("--linear", is_flag=True, help="Also fit a logistic-regression probe on the cached features.")
@setting(ProbeConfig, "--batch-size", type=click.IntRange(min=1), help="Images per forward pass.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON document.")
@NUM_THREADS_OPTION
@DEVICE_OPTION
@QUIET_OPTION
def probe(model, train_shards, val_shards, k, temperature, layers, linear, batch_size, as_json, num_threads, device,
          quiet):
    """k-NN (and linear) probe of a frozen encoder: MODEL is a pretrain run folder or an exported encoder.

    Images are centre-cropped at 224; features are mean-pooled patch tokens (bf16 on a GPU).
    """
    from pipelines.probe import ProbeConfig, format_probe, run_probe

    result = run_probe(ProbeConfig(model=model, train_shards=train_shards, val_shards=val_shards, k=k,
                                   temperature=temperature, layers=layers, linear=linear, batch_size=batch_size,
                                   num_threads=num_threads, device=device, progress=not quiet))
    say(json.dumps(result, indent=1) if as_json else format_probe(result))


@main.command(context_settings=CONTEXT)
@click.argument("run", type=LocationType(exists=True, file_okay=False))
@click.option("--out", required=True, type=LocationType(dir_okay=False),
              help="Encoder state dict to write (.pth or .safetensors; local, or an s3:// or gs:// URL).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out and its JSON.")
def export(run, out, overwrite):
    """Write a pretrain run's encoder as weights that timm's Beit loads."""
    from pipelines.export import run_export

    info = run_export(run, out, overwrite=overwrite)
    kwargs = ", ".join(f"{k}={v!r}" for k, v in info["timm_kwargs"].items())
    say(f"wrote {out}")
    say(f"load it with: timm.create_model({info['timm_model']!r}, {kwargs}, checkpoint_path={out!r})")


@main.command(context_settings=CONTEXT)
@click.argument("tokens", type=click.Path())
@click.option("--shards", default=None, help="Shards to check coverage against (and to find images for --render).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON document.")
@click.option("--render", default=None, metavar="KEY", help="Draw the view of this key as a PNG.")
@setting(InspectConfig, "--view", type=click.IntRange(min=0), help="View to draw with --render.")
@click.option("--tokenizer", default=None, type=click.Path(dir_okay=False),
              help="Tokenizer with a decoder, to add the reconstruction panel to --render.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="PNG file for --render.")
@click.option("--histogram", default=None, type=click.Path(dir_okay=False),
              help="Also draw token frequencies to this PNG.")
def inspect(tokens, shards, as_json, render, view, tokenizer, out, histogram):
    """Summarise, validate and draw token Parquet files (exit 1 when validation finds errors)."""
    from pipelines.inspect_tokens import InspectConfig, format_summary, run_inspect

    result = run_inspect(InspectConfig(tokens=tokens, shards=shards, render=render, view=view,
                                       tokenizer=tokenizer, out=out, histogram=histogram))
    if render is not None:
        say(f"wrote {out}")
        return
    if as_json:
        say(json.dumps(result, indent=1))
    else:
        result["codebook"].pop("counts")
        say(format_summary(result))
        if histogram:
            say(f"wrote {histogram}")
    if result["errors"]:
        raise SystemExit(1)


if __name__ == "__main__":
    sys.exit(main(prog_name="beit-data"))
