"""The ``beit-data`` command line: a thin click group over the ``pipelines`` stages.

Each command parses its options, builds its stage's config, calls ``run_*()`` and prints a
summary. torch and DALI are imported inside the commands, so ``beit-data --help`` is instant.
"""

from __future__ import annotations

import json
import sys

import click

from beit_data import BeitDataError, __version__

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

SHARDS_OPTION = click.option(
    "--shards", "shards", required=True,
    help="Shards: a brace pattern (data/train-{000000..000099}.tar), a directory or a glob.",
)
SEED_OPTION = click.option("--seed", type=int, default=0, show_default=True, help="Seed of every random choice.")
QUIET_OPTION = click.option("--quiet", is_flag=True, help="Hide progress bars.")
DEVICE_OPTION = click.option("--device", default="auto", show_default=True,
                             help="cpu, cuda, cuda:N, or auto (this rank's GPU where CUDA is present).")
NUM_THREADS_OPTION = click.option("--num-threads", type=click.IntRange(min=1), default=4, show_default=True,
                                  help="DALI CPU threads.")


class Group(click.Group):
    """Turns a ``BeitDataError`` into a one-line message and a non-zero exit."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BeitDataError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=Group, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="beit-data")
def main():
    """beit-data: tokenize image shards once, then pretrain BEiT on precomputed targets."""


def echo_summary(title: str, summary: dict) -> None:
    click.echo(f"{title}: " + ", ".join(f"{k} {v}" for k, v in summary.items()))


@main.command(context_settings=CONTEXT)
@click.argument("sources", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the shards.")
@click.option("--maxcount", type=click.IntRange(min=1), default=10000, show_default=True,
              help="Images per shard.")
@click.option("--prefix", default="shard", show_default=True, help="Shard file-name prefix.")
@QUIET_OPTION
def shards(sources, out, maxcount, prefix, quiet):
    """Write WebDataset shards and DALI .idx files from image folders or path lists.

    Each SOURCE is a flat folder of images, an ImageFolder tree (class sub-folders become
    .cls members and classes.json) or a text file with one image path per line.
    """
    from pipelines.shards import ShardsConfig, run_shards

    result = run_shards(ShardsConfig(sources=sources, out=out, maxcount=maxcount, prefix=prefix,
                                     progress=not quiet))
    echo_summary("shards", result.summary())
    for reject in result.rejects:
        click.echo(f"  rejected {reject.key}: {reject.reason}", err=True)
    click.echo(f"wrote {out}")


@main.command(context_settings=CONTEXT)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the sample shards.")
@click.option("--maxcount", type=click.IntRange(min=1), default=8, show_default=True,
              help="Images per shard.")
def sample(out, maxcount):
    """Write the embedded sample of real photographs as WebDataset shards."""
    import tempfile

    from beit_data.sample import write_sample_list
    from pipelines.shards import ShardsConfig, run_shards

    with tempfile.TemporaryDirectory() as tmp:
        listing = write_sample_list(f"{tmp}/sample.txt")
        result = run_shards(ShardsConfig(sources=[listing], out=out, maxcount=maxcount,
                                         prefix="sample", progress=False))
    echo_summary("sample", result.summary())
    click.echo(f"wrote {out}")


@main.command("train-dvae", context_settings=CONTEXT)
@SHARDS_OPTION
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Checkpoint file to write.")
@click.option("--config", "config_name", type=click.Choice(["tiny", "dalle"]), default="tiny", show_default=True,
              help="Architecture: tiny (n_hid 16, vocab 512) or dalle (OpenAI's sizes).")
@click.option("--steps", type=click.IntRange(min=1), default=300, show_default=True, help="Training steps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Images per step.")
@click.option("--lr", type=float, default=2e-3, show_default=True, help="Peak learning rate (cosine decay).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=200, show_default=True,
              help="Save a checkpoint every N steps.")
@click.option("--resume", is_flag=True, help="Continue training the checkpoint at --out.")
@click.option("--overwrite", is_flag=True, help="Replace an existing checkpoint at --out.")
@SEED_OPTION
@DEVICE_OPTION
@QUIET_OPTION
def train_dvae(shards, out, config_name, steps, batch_size, lr, checkpoint_every, resume, overwrite, seed,
               device, quiet):
    """Train a discrete VAE tokenizer on your own shards (DALL-E recipe, Gumbel-softmax)."""
    from pipelines.train_dvae import TrainDVAEConfig, run_train_dvae

    report = run_train_dvae(TrainDVAEConfig(
        shards=shards, out=out, config=config_name, steps=steps, batch_size=batch_size, lr=lr,
        checkpoint_every=checkpoint_every, resume=resume, overwrite=overwrite, seed=seed, device=device,
        progress=not quiet))
    echo_summary("held-out report", {k: report[k] for k in
                                     ("psnr", "psnr_mean_colour", "perplexity", "codes_used", "steps", "seconds")})
    click.echo(f"wrote {out}")


@main.command(context_settings=CONTEXT)
@SHARDS_OPTION
@click.option("--tokenizer", required=True, type=click.Path(dir_okay=False),
              help="dVAE file: OpenAI's encoder.pkl, a state dict or a train-dvae checkpoint.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the token Parquet files.")
@click.option("--views", type=click.IntRange(min=1), default=10, show_default=True, help="Views per image.")
@SEED_OPTION
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images per batch (each gives --views tokenizer inputs).")
@click.option("--no-target-jitter", is_flag=True,
              help="Tokenize views without colour jitter; pretrain then draws fresh jitter each epoch.")
@click.option("--overwrite", is_flag=True, help="Replace token files made with another tokenizer or recipe.")
@click.option("--strict", is_flag=True, help="Exit non-zero if any sample was rejected.")
@NUM_THREADS_OPTION
@DEVICE_OPTION
@QUIET_OPTION
def tokenize(shards, tokenizer, out, views, seed, batch_size, no_target_jitter, overwrite, strict, num_threads,
             device, quiet):
    """Tokenize every image's views once and write one Parquet file per shard."""
    from pipelines.tokenize import TokenizeConfig, run_tokenize

    summary = run_tokenize(TokenizeConfig(
        shards=shards, tokenizer=tokenizer, out=out, views=views, seed=seed, batch_size=batch_size,
        target_jitter=not no_target_jitter, overwrite=overwrite, device=device, num_threads=num_threads,
        progress=not quiet))
    rejects = summary.pop("reject_list")
    echo_summary("tokenize", summary)
    for r in rejects[:20]:
        click.echo(f"  rejected {r['shard']}:{r['key']}: {r['reason']}", err=True)
    if len(rejects) > 20:
        click.echo(f"  ... {len(rejects) - 20} more in {out}/summary.json", err=True)
    click.echo(f"wrote {out}")
    if strict and rejects:
        raise click.ClickException(f"{len(rejects)} samples were rejected (--strict)")


@main.command(context_settings=CONTEXT)
@SHARDS_OPTION
@click.option("--tokens", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder of token Parquet files written by beit-data tokenize.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder: checkpoints and logs.")
@click.option("--model", default="beit_mim_base_patch16_224", show_default=True,
              help="beit_mim_tiny_patch16_224, beit_mim_base_patch16_224 or beit_mim_large_patch16_224.")
@click.option("--epochs", type=click.IntRange(min=1), default=800, show_default=True, help="Epochs to train.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Steps to train (overrides --epochs).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per rank per step.")
@click.option("--lr", type=float, default=1.5e-3, show_default=True, help="Peak learning rate (not rescaled).")
@click.option("--min-lr", type=float, default=1e-5, show_default=True, help="Learning rate at the end of the cosine.")
@click.option("--warmup-epochs", type=float, default=10, show_default=True, help="Linear warmup, per step.")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=None,
              help="Warmup steps (overrides --warmup-epochs).")
@click.option("--weight-decay", type=float, default=0.05, show_default=True, help="AdamW weight decay.")
@click.option("--drop-path", type=float, default=0.1, show_default=True, help="Stochastic depth rate.")
@click.option("--clip-grad", type=float, default=3.0, show_default=True, help="Gradient-norm clipping.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Save a checkpoint every N steps (and at the end).")
@click.option("--log-every", type=click.IntRange(min=1), default=10, show_default=True, help="Log every N steps.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint, exactly.")
@click.option("--stop-after", type=click.IntRange(min=1), default=None,
              help="Stop after N steps of this invocation, with a checkpoint (for time-limited jobs).")
@click.option("--skip-missing", is_flag=True, help="Skip shards that have no token file, instead of failing.")
@click.option("--compile", "compile_", is_flag=True, help="Compile the model with torch.compile.")
@NUM_THREADS_OPTION
@SEED_OPTION
@DEVICE_OPTION
@QUIET_OPTION
def pretrain(shards, tokens, out, model, epochs, steps, batch_size, lr, min_lr, warmup_epochs, warmup_steps,
             weight_decay, drop_path, clip_grad, checkpoint_every, log_every, resume, stop_after, skip_missing,
             compile_, num_threads, seed, device, quiet):
    """Pretrain a BEiT MIM model on images and their precomputed visual tokens (torchrun-ready)."""
    from pipelines.pretrain import PretrainConfig, run_pretrain

    summary = run_pretrain(PretrainConfig(
        shards=shards, tokens=tokens, out=out, model=model, epochs=epochs, steps=steps, batch_size=batch_size,
        lr=lr, min_lr=min_lr, warmup_epochs=warmup_epochs, warmup_steps=warmup_steps, weight_decay=weight_decay,
        drop_path=drop_path, clip_grad=clip_grad, checkpoint_every=checkpoint_every, log_every=log_every,
        resume=resume, stop_after=stop_after, skip_missing=skip_missing, compile=compile_, num_threads=num_threads,
        seed=seed, device=device, progress=not quiet))
    echo_summary("pretrain", summary)


@main.command(context_settings=CONTEXT)
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Encoder state dict to write.")
def export(run, out):
    """Write a pretrain run's encoder as weights that timm's Beit loads."""
    from pipelines.export import run_export

    info = run_export(run, out)
    kwargs = ", ".join(f"{k}={v!r}" for k, v in info["timm_kwargs"].items())
    click.echo(f"wrote {out}")
    click.echo(f"load it with: timm.create_model({info['timm_model']!r}, {kwargs}, checkpoint_path={out!r})")


@main.command(context_settings=CONTEXT)
@click.argument("tokens", type=click.Path())
@click.option("--shards", default=None, help="Shards to check coverage against (and to find images for --render).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON document.")
@click.option("--render", "render_key", default=None, metavar="KEY", help="Draw the view of this key as a PNG.")
@click.option("--view", type=click.IntRange(min=0), default=0, show_default=True, help="View to draw with --render.")
@click.option("--tokenizer", default=None, type=click.Path(dir_okay=False),
              help="Tokenizer with a decoder, to add the reconstruction panel to --render.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="PNG file for --render.")
@click.option("--histogram", default=None, type=click.Path(dir_okay=False),
              help="Also draw token frequencies to this PNG.")
def inspect(tokens, shards, as_json, render_key, view, tokenizer, out, histogram):
    """Summarise, validate and draw token Parquet files (exit 1 when validation finds errors)."""
    from pipelines.inspect import InspectConfig, format_summary, run_inspect

    result = run_inspect(InspectConfig(tokens=tokens, shards=shards, render=render_key, view=view,
                                       tokenizer=tokenizer, out=out, histogram=histogram))
    if render_key is not None:
        click.echo(f"wrote {out}")
        return
    if as_json:
        click.echo(json.dumps(result, indent=1))
    else:
        result["codebook"].pop("counts")
        click.echo(format_summary(result))
        if histogram:
            click.echo(f"wrote {histogram}")
    if result["errors"]:
        raise SystemExit(1)


if __name__ == "__main__":
    sys.exit(main(prog_name="beit-data"))
