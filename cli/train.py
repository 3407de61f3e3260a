"""The commands that train and use models: ``train-dvae``, ``pretrain``, ``probe``, ``export``."""

from __future__ import annotations

import json
import signal

import click

from beit_data.stream_config import TARGETS
from cli import CONTEXT, main
from cli.options import (
    DEVICE,
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
    layer_numbers,
    main_process,
    say,
    setting,
)
from pipelines.config import ExportConfig, ProbeConfig, TrainDVAEConfig
from pipelines.pretrain_config import PATCHES, PretrainConfig
from pipelines.recipes import DVAE_CONFIGS, RECIPES


@main.command("train-dvae", context_settings=CONTEXT)
@SHARDS
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Checkpoint file to write.")
@setting(TrainDVAEConfig, "--config", type=click.Choice(DVAE_CONFIGS),
         help="Architecture: tiny (n_hid 16, vocab 512) or dalle (OpenAI's sizes).")
@setting(TrainDVAEConfig, "--steps", type=click.IntRange(min=1), help="Training steps.")
@setting(TrainDVAEConfig, "--batch-size", type=click.IntRange(min=1), help="Images per step.")
@setting(TrainDVAEConfig, "--lr", type=Real(min=0, min_open=True), help="Peak learning rate (cosine decay).")
@setting(TrainDVAEConfig, "--checkpoint-every", type=click.IntRange(min=1), help="Save a checkpoint every N steps.")
@click.option("--resume", is_flag=True, help="Continue training the checkpoint at --out.")
@click.option("--overwrite", is_flag=True, help="Replace an existing checkpoint at --out.")
@SEED
@DEVICE
@QUIET
def train_dvae(**options):
    """Train a discrete VAE tokenizer on your own shards (DALL-E recipe, Gumbel-softmax)."""
    from pipelines.train_dvae import run_train_dvae

    report = run_train_dvae(config_of(TrainDVAEConfig, options))
    echo_summary("held-out report", {k: report[k] for k in
                                     ("psnr", "psnr_mean_colour", "perplexity", "codes_used", "steps", "seconds")})
    say(f"wrote {options['out']}")
    for warning in report["warnings"]:
        say(f"train-dvae: warning: {warning}", err=True)


BETA = Real(0, 1, max_open=True)  # each of AdamW's betas

# pretrain's held-out figures and k-NN probe, in the order --help lists them.
QUALITY_OPTIONS = [
    click.option("--val-shards", default=None, help="Held-out shards (not read by training): masked-token loss, "
                                                     "top-1/top-5 and perplexity on them."),
    click.option("--val-tokens", default=None, type=LocationType(exists=True, file_okay=False),
                 help="The token Parquet files of --val-shards, made by the same tokenizer."),
    setting(PretrainConfig, "--val-every", type=click.IntRange(min=1),
            help="Evaluate the held-out set at step 0, every N steps and at the end."),
    setting(PretrainConfig, "--val-images", type=click.IntRange(min=1),
            help="Size of the fixed held-out set, over all ranks."),
    click.option("--probe-every", type=click.IntRange(min=1), default=None,
                 help="Run a k-NN probe on rank 0 every N steps (off by default); needs --probe-train and "
                      "--probe-val."),
    click.option("--probe-train", default=None, help="Labeled shards (.cls) the probe's k-NN votes with."),
    click.option("--probe-val", default=None, help="Labeled shards the probe is scored on."),
    click.option("--probe-layers", default=None, callback=layer_numbers,
                 help="Blocks (1-based, comma-separated) whose features the probe averages [default: the last]."),
]


def pretrain_options(command):
    """pretrain's options, in the order ``--help`` lists them."""
    options = [
        SHARDS,
        click.option("--tokens", default=None, type=LocationType(exists=True, file_okay=False),
                     help="Folder of token Parquet files written by beit-data tokenize."),
        setting(PretrainConfig, "--targets", type=click.Choice(TARGETS),
                help="stored: the views and tokens of --tokens. online: a fresh view of every image each epoch, "
                     "tokenized in the loop by --tokenizer (the reference recipe, to compare with; no --tokens)."),
        click.option("--tokenizer", default=None, type=click.Path(dir_okay=False),
                     help="With --targets online: the tokenizer file, as tokenize takes it."),
        click.option("--out", required=True, type=LocationType(file_okay=False),
                     help="Run folder (or s3:// / gs:// prefix): checkpoints and logs."),
        click.option("--recipe", type=click.Choice(sorted(RECIPES)), default=None,
                     help="The paper's settings for the options marked [recipe]: beit (800 epochs) or beitv2 (1600 "
                          "epochs, the extra head) [default: the one the tokens were made with; online, beit for a "
                          "dVAE --tokenizer and beitv2 for VQ-KD]."),
        click.option("--model", default=None,
                     help="beit_mim_{tiny,base,large}_patch16_224, or beitv2_mim_* for BEiT v2's extra head [recipe]."),
        click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs to train [recipe]."),
        click.option("--steps", type=click.IntRange(min=1), default=None, help="Steps to train (overrides --epochs)."),
        setting(PretrainConfig, "--batch-size", type=click.IntRange(min=1),
                help="Images per rank per micro-batch; a step's global batch is this x ranks x --grad-accum."),
        setting(PretrainConfig, "--grad-accum", type=click.IntRange(min=1),
                help="Micro-batches per optimizer step (timm's --grad-accum-steps, unilm's --update_freq): "
                     "the paper's 2048 on one GPU is --batch-size 256 --grad-accum 8."),
        click.option("--lr", type=Real(min=0, min_open=True), default=None,
                     help="Peak learning rate, not rescaled [recipe]."),
        setting(PretrainConfig, "--min-lr", type=Real(min=0), help="Learning rate at the end of the cosine."),
        click.option("--warmup-epochs", type=Real(min=0), default=None, help="Linear warmup, per step [recipe]."),
        click.option("--warmup-steps", type=click.IntRange(min=0), default=None,
                     help="Warmup steps (overrides --warmup-epochs)."),
        setting(PretrainConfig, "--weight-decay", type=Real(min=0), help="AdamW weight decay."),
        setting(PretrainConfig, "--adam-betas", name="betas", type=(BETA, BETA),
                help="AdamW's beta1 and beta2 (BEiT v2's 1600-epoch recipe lowers beta2 to 0.98)."),
        click.option("--drop-path", type=Real(0, 1, max_open=True), default=None,
                     help="Stochastic depth rate [recipe]."),
        click.option("--layer-scale", type=Real(min=0), default=None,
                     help="LayerScale initial value; 0 turns LayerScale off [recipe]."),
        setting(PretrainConfig, "--clip-grad", type=Real(min=0),
                help="Clip the gradient's norm to this; 0 turns clipping off (as in DINO and iBOT)."),
        setting(PretrainConfig, "--num-masked", type=click.IntRange(1, PATCHES),
                help=f"Patches masked per image, in blocks (BEiT: 75 of {PATCHES}; BEiT-3 masks 40%, 78)."),
        setting(PretrainConfig, "--checkpoint-every", type=click.IntRange(min=1),
                help="Save a checkpoint every N steps (and at the end)."),
        setting(PretrainConfig, "--log-every", type=click.IntRange(min=1), help="Log every N steps."),
        click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint, exactly."),
        click.option("--stop-after", type=click.IntRange(min=1), default=None,
                     help="Stop after N steps of this invocation, with a checkpoint (for time-limited jobs)."),
        click.option("--skip-missing", is_flag=True, help="Skip shards that have no token file, instead of failing."),
        click.option("--compile", is_flag=True, help="Compile the model with torch.compile."),
        *QUALITY_OPTIONS,
        click.option("--record-batches", is_flag=True,
                     help="Each rank writes the keys of every step it trains to RUN/batches-rankR.jsonl, for audits."),
        PARTITIONS, MIX_SHARDS, NUM_THREADS, SEED, DEVICE, QUIET,
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command(context_settings=CONTEXT)
@pretrain_options
def pretrain(**options):
    """Pretrain a BEiT MIM model on images and their precomputed visual tokens (torchrun-ready)."""
    from pipelines.pretrain import run_pretrain

    result = run_pretrain(config_of(PretrainConfig, options))
    if main_process():
        echo_summary("pretrain", result.summary())
        if result.holdout:
            last = result.holdout[-1]
            say("held-out masked-token accuracy: " + " -> ".join(
                f"step {r['step']} top-1 {100 * r['val_top1']:.1f}% top-5 {100 * r['val_top5']:.1f}% "
                f"(loss {r['val_loss']:.3f})" for r in result.holdout)
                + f"; always predicting the most common code: top-1 {100 * last['val_majority']:.1f}%")
        for warning in result.warnings():
            say(f"pretrain: warning: {warning}", err=True)
    if result.stopped:  # the conventional exit status of a process ended by that signal
        raise SystemExit(128 + int(getattr(signal, result.stopped)))


@main.command(context_settings=CONTEXT)
@click.argument("model", type=LocationType(exists=True))
@click.option("--train-shards", required=True, help="Labeled shards (.cls members) the k-NN votes with.")
@click.option("--val-shards", required=True, help="Labeled shards the probe is scored on.")
@setting(ProbeConfig, "--k", type=click.IntRange(min=1), help="Neighbours of the k-NN.")
@setting(ProbeConfig, "--temperature", type=Real(min=0, min_open=True),
         help="Temperature T of the k-NN's exp(cos / T) votes.")
@click.option("--layers", default=None, callback=layer_numbers,
              help="Blocks (1-based, comma-separated) whose mean patch tokens are averaged [default: the last].")
@click.option("--linear", is_flag=True, help="Also fit a logistic-regression probe on the cached features.")
@setting(ProbeConfig, "--batch-size", type=click.IntRange(min=1), help="Images per forward pass.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON document.")
@NUM_THREADS
@DEVICE
@QUIET
def probe(as_json, **options):
    """k-NN (and linear) probe of a frozen encoder: MODEL is a pretrain run folder or an exported encoder.

    Images are centre-cropped at 224; features are mean-pooled patch tokens (bf16 on a GPU).
    """
    from pipelines.probe import format_probe, run_probe

    result = run_probe(config_of(ProbeConfig, options))
    if result is not None:  # rank 0 under torchrun or srun
        say(json.dumps(result, indent=1) if as_json else format_probe(result))


@main.command(context_settings=CONTEXT)
@click.argument("run", type=LocationType(exists=True, file_okay=False))
@click.option("--out", required=True, type=LocationType(),
              help="A folder timm opens as local-dir:OUT (config.json, model.safetensors), or one .pth or "
                   ".safetensors file with a JSON beside it; local, or an s3:// or gs:// URL.")
@click.option("--overwrite", is_flag=True, help="Replace an existing export.")
def export(**options):
    """Write a pretrain run's encoder as weights that timm's Beit loads, with the mean and std it saw."""
    from pipelines.export import run_export

    cfg = config_of(ExportConfig, options)
    info = run_export(cfg)
    say(f"wrote {info.get('folder') or info['checkpoint_path']}")
    if "folder" in info:
        say(f"fine-tune it with: timm.create_model('local-dir:{info['folder']}', pretrained=True, num_classes=N)")
        return
    kwargs = ", ".join(f"{k}={v!r}" for k, v in info["timm_kwargs"].items())
    say(f"load it with: timm.create_model({info['timm_model']!r}, {kwargs}, checkpoint_path="
        f"{info['checkpoint_path']!r}, pretrained_cfg_overlay=JSON['pretrained_cfg'])")
