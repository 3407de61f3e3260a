"""``beit-data train-dvae``: train a DALL-E-style discrete VAE on your own shards.

The recipe follows the DALL-E paper (appendix A), scaled to the run length:
- the encoder's logits are relaxed with Gumbel-softmax, with the temperature annealed from
  1 to 1/16 on a cosine schedule over the run. Samples are straight-through one-hot codes, so
  the decoder trains on the same hard codes that tokenization produces;
- the KL term against the uniform prior over the codebook ramps linearly from 0 to
  ``kl_weight`` over the first ``kl_warmup`` fraction of the steps;
- the reconstruction loss is the mean squared error in [0,1] pixel space (DALL-E used a
  logit-Laplace likelihood; L2 trains reliably at small scale and is what PSNR measures).
Two additions keep short runs out of codebook collapse: a usage term (``usage_weight``) that
raises the entropy of the batch-averaged code distribution, and ``gumbel_noise``, the scale of
the Gumbel noise. It is 1 (the paper's relaxation) for ``--config dalle``; for ``tiny`` it is 0,
a deterministic straight-through softmax: on 2 CPU cores, a 300-step run with full noise stayed
below the mean-colour PSNR baseline, while the noiseless run cleared it (see the README).
Images come through the project's DALI graph as random resized crops at the input size.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from beit_common import (
    BeitDataError,
    Location,
    ensure_writable_dir,
    output_location,
    redacted,
    remove_stale_temps,
    write_text_atomic,
)
from beit_data.dali_views import DaliViews, ViewSpec
from beit_data.prefetch import batched, prefetch
from beit_data.progress import progress_bar
from beit_data.shards import expand_shards, iter_images
from beit_data.views import ViewRecipe, sample_views
from beit_model.dall_e import Decoder, Encoder, map_pixels
from beit_model.dvae import CONFIGS, DVAEConfig, reconstruct
from pipelines.checkpoint import DVAECheckpointMeta, restore_dvae_checkpoint, save_dvae_checkpoint
from pipelines.config import TrainDVAEConfig, settings_yaml
from pipelines.runtime import Precision, resolve_device, resolve_precision

__all__ = ["TrainDVAEConfig", "run_train_dvae", "evaluate"]


# Crops for dVAE training: no jitter (the tokenizer should see real colours), and a scale floor
# of 0.25 so that crops keep enough of the image to reconstruct.
TRAIN_VIEWS = ViewRecipe(views=1, scale=(0.25, 1.0), flip=0.5, jitter=0.0, target_jitter=False)
EVAL_VIEWS = dataclasses.replace(TRAIN_VIEWS, views=8, seed=12345)


def _stream(shards, holdout_keys: set[str], skip: int):
    """Training images forever; in epoch ``e`` each image gets the crop drawn with seed ``e``."""
    for epoch in itertools.count():
        recipe = dataclasses.replace(TRAIN_VIEWS, seed=epoch)
        for shard in shards:
            for sample, info in iter_images(shard):
                if sample.key in holdout_keys:
                    continue
                if skip:
                    skip -= 1
                    continue
                yield sample.image, sample_views(recipe, sample.key, info.width, info.height)


def _holdout(shards, count: int):
    """The first ``count`` images of the shards, with fixed evaluation views."""
    items = []
    for shard in shards:
        for sample, info in iter_images(shard):
            items.append((sample.key, sample.image, sample_views(EVAL_VIEWS, sample.key, info.width, info.height)))
            if len(items) == count:
                return items
    raise BeitDataError(f"need at least {count + 1} decodable images to hold {count} out, found {len(items)}")


def _psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1 / mse)  # per image


@torch.no_grad()
def evaluate(encoder: Encoder, decoder: Decoder, images: torch.Tensor) -> dict:
    """Reconstruction PSNR with hard codes, the mean-colour baseline, perplexity and usage."""
    encoder.eval(), decoder.eval()
    logits = encoder(map_pixels(images))
    ids = logits.argmax(1)
    recon = reconstruct(decoder, ids)
    baseline = images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    counts = torch.bincount(ids.flatten(), minlength=encoder.vocab_size).float()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    encoder.train(), decoder.train()
    return {"psnr": round(_psnr(recon, images).mean().item(), 3),
            "psnr_mean_colour": round(_psnr(baseline, images).mean().item(), 3),
            "perplexity": round(entropy.exp().item(), 2),
            "codes_used": round((counts > 0).float().mean().item(), 4),
            "images": images.shape[0]}


def report_warnings(report: dict) -> list[str]:
    """One line for each figure that says the tokenizer will not serve, with its baseline."""
    if report["psnr"] >= report["psnr_mean_colour"]:
        return []
    return [f"held-out PSNR {report['psnr']:.2f} dB is below the mean-colour baseline {report['psnr_mean_colour']:.2f} "
            "dB (each image painted its mean colour): the codes carry less than that; train longer (--steps) or on "
            "more images"]


def _schedules(cfg: TrainDVAEConfig, step: int) -> tuple[float, float, float]:
    t = step / max(1, cfg.steps - 1)
    tau = cfg.tau_end + 0.5 * (cfg.tau_start - cfg.tau_end) * (1 + math.cos(math.pi * t))
    beta = cfg.kl_weight * min(1.0, t / cfg.kl_warmup) if cfg.kl_warmup > 0 else cfg.kl_weight
    lr = cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    return tau, beta, lr


def _loss(encoder, decoder, x: torch.Tensor, tau: float, beta: float, cfg: TrainDVAEConfig):
    """Reconstruction + beta * KL(q || uniform) + usage term, each normalised to about [0, 1]. The
    networks run in the autocast's precision, the loss in float32 (fp16 cannot hold the noise's 1e-9)."""
    logits = encoder(map_pixels(x)).float()  # (B, vocab, h, w)
    noise = -torch.log(-torch.log(torch.rand_like(logits).clamp(1e-9, 1 - 1e-9)))  # Gumbel(0, 1)
    soft = F.softmax((logits + cfg.gumbel_noise * noise) / tau, dim=1)
    hard = torch.zeros_like(soft).scatter_(1, soft.argmax(1, keepdim=True), 1.0)
    z = hard - soft.detach() + soft  # straight-through: one-hot forward, relaxed gradient
    mean = torch.sigmoid(decoder(z)[:, :3].float())
    rec = F.mse_loss(mean, map_pixels(x)) / (1 - 2 * 0.1) ** 2  # = MSE in [0,1] pixels
    log_q = F.log_softmax(logits, dim=1)
    log_v = math.log(encoder.vocab_size)
    kl = (log_q.exp() * (log_q + log_v)).sum(1).mean() / log_v
    usage = log_q.exp().mean((0, 2, 3))  # (vocab,) batch-averaged code distribution
    low_usage = (log_v + (usage * (usage + 1e-9).log()).sum()) / log_v  # 0 when all codes are equally used
    return rec + beta * kl + cfg.usage_weight * low_usage, rec, kl


def _open_checkpoint(cfg: TrainDVAEConfig) -> Path:
    out = output_location(cfg.out, "the dVAE checkpoint", remote=False)
    if out.exists() and not (cfg.resume or cfg.overwrite):
        raise BeitDataError(f"{out} exists; pass `resume` to continue training it or `overwrite` to replace it")
    if cfg.resume and not out.is_file():
        raise BeitDataError(f"`resume`: no checkpoint at {out}")
    ensure_writable_dir(out.parent)
    remove_stale_temps(out.parent, out.name)  # a checkpoint half-written when the last run was killed
    return out


def _resume(out: Path, cfg: TrainDVAEConfig, settings: dict, encoder: Encoder, decoder: Decoder,
            optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> int:
    """Take the checkpoint at ``out`` back into the models, optimizer, scaler and generator, say
    which resumable settings changed (and that the run is extended), and return its step."""
    resumable = TrainDVAEConfig.RESUMABLE + (("steps",) if cfg.extend else ())
    record, changed = restore_dvae_checkpoint(Location(out), settings, resumable, encoder, decoder, optimizer, scaler)
    if changed:
        print("train-dvae: resuming with " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()),
              file=sys.stderr)
    if cfg.extend:
        if cfg.steps <= record.step:
            raise BeitDataError(f"`extend`: the run has trained {record.step} steps; give `steps` beyond them, "
                                f"not {cfg.steps}")
        print(f"train-dvae: extending the run to {cfg.steps} steps; it has trained {record.step}, and its "
              "schedules (learning rate, temperature, KL weight) now end at the new last step", file=sys.stderr)
    return record.step


def _train_step(encoder, decoder, optimizer, x: torch.Tensor, cfg: TrainDVAEConfig, step: int,
                precision: Precision, scaler: torch.amp.GradScaler) -> dict:
    """One optimizer step on the batch ``x`` (B, 3, S, S), the forward pass in ``precision`` (fp16's
    ``scaler`` skips a step whose gradient overflowed); returns what the progress bar shows."""
    tau, beta, lr = _schedules(cfg, step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    with precision.autocast():
        loss, rec, kl = _loss(encoder, decoder, x, tau, beta, cfg)
    if not torch.isfinite(loss):
        raise BeitDataError(f"loss became {loss.item()} at step {step}; the last checkpoint is kept")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return {"rec": f"{rec.item():.4f}", "kl": f"{kl.item():.3f}", "tau": f"{tau:.3f}"}


def run_train_dvae(cfg: TrainDVAEConfig) -> dict:
    """Train (or resume) a dVAE and write a checkpoint that ``load_tokenizer`` reads.

    Returns:
        The final report: PSNR and its mean-colour baseline on held-out images, codebook
        perplexity and the fraction of codes used, steps and seconds.
    """
    out = _open_checkpoint(cfg)
    shards = expand_shards(cfg.shards)
    device = resolve_device(cfg.device)
    arch: DVAEConfig = CONFIGS[cfg.config]
    if cfg.vocab_size is not None:
        arch = replace(arch, vocab_size=cfg.vocab_size)
    torch.manual_seed(cfg.seed)
    encoder, decoder = (module.to(device) for module in arch.build())
    params = list(encoder.parameters()) + list(decoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0)
    settings = redacted(asdict(cfg))  # the checkpoint's `train`, which a resumed run checks against
    precision, why = resolve_precision(cfg.precision, device)
    if precision.worth_saying:
        print(f"train-dvae: precision {why}", file=sys.stderr)
    scaler = precision.scaler()
    step = _resume(out, cfg, settings, encoder, decoder, optimizer, scaler) if cfg.resume else 0

    views = DaliViews(ViewSpec(views=1, size=arch.input_size, interp="lanczos", jitter=False),
                      batch_size=max(cfg.batch_size, EVAL_VIEWS.views * cfg.holdout), device=device)
    held = _holdout(shards, cfg.holdout)
    held_images = views([h[1] for h in held for _ in h[2]], [[v] for h in held for v in h[2]])[:, 0]
    held_images = held_images.to(device)  # (holdout * eval views, 3, S, S)
    holdout_keys = {h[0] for h in held}

    def save(report: dict | None = None) -> None:
        save_dvae_checkpoint(Location(out), DVAECheckpointMeta(step, settings, report), arch, encoder, decoder,
                             optimizer, scaler)

    start = time.perf_counter()
    batches = prefetch(batched(_stream(shards, holdout_keys, skip=step * cfg.batch_size), cfg.batch_size))
    bar = progress_bar(total=cfg.steps, initial=step, desc="train-dvae", unit="step", disable=not cfg.progress)
    encoder.train(), decoder.train()
    for batch in batches:
        if step >= cfg.steps:
            break
        x = views([b[0] for b in batch], [b[1] for b in batch])[:, 0].to(device)  # (B, 3, S, S)
        bar.set_postfix(**_train_step(encoder, decoder, optimizer, x, cfg, step, precision, scaler), refresh=False)
        step += 1
        bar.update()
        if step % cfg.checkpoint_every == 0 and step < cfg.steps:
            save()
    bar.close()
    report = {**evaluate(encoder, decoder, held_images), "steps": step,
              "seconds": round(time.perf_counter() - start, 1), "config": cfg.config, "out": str(out)}
    report["warnings"] = report_warnings(report)
    save(report=report)
    write_text_atomic(Path(str(out) + ".report.json"), json.dumps(report, indent=1))
    write_text_atomic(Path(str(out) + ".config.yaml"), settings_yaml(settings))  # what --config-file takes back
    return report
