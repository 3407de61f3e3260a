"""Pretraining throughput, three ways, on the same machine and model, in one run.

- end to end: the beit-data stream (DALI replay of stored views + stored tokens) + the step;
- model only: the same step on synthetic tensors already on the device;
- online targets: the same stream with ``--targets online`` (a fresh view each epoch, DALI
  making both views from one decode, the dVAE run in the loop on the 112-pixel view), + the step;
- reference recipe: a PIL/torchvision two-view loader in DataLoader workers, with the dVAE
  run online on the 112-pixel view every step, + the same step.
GPU targets with ViT-B/16, batch 256, bf16: end to end >= 97% of model only and >= 2.0x the
reference. Prints one JSON object.

    python -m benchmarks.pretrain                                        # CPU, tiny model
    python -m benchmarks.pretrain --device cuda --model beit_mim_base_patch16_224 --batch-size 256 \\
        --tokenizer-config dalle --workers 15 --images 4096 [--compile] [--profile 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from beit_data.masking import BlockMaskGenerator
from beit_data.shards import expand_shards, iter_samples
from beit_data.stream import TrainStream
from beit_model.tokenizer import load_tokenizer
from benchmarks.common import device_name, emit, make_tokens
from benchmarks.flex_attention import use_flex_attention
from pipelines.pretrain import PretrainConfig
from pipelines.recipes import view_recipe
from pipelines.runtime import autocast
from pipelines.training import build_model, build_optimizer, train_step


def make_step(model, cfg: PretrainConfig, device, args):
    """The trainer's own step (``train_step``) with the trainer's optimizer and schedule, and the
    variants under trial: FlexAttention for the relative-position bias, fused AdamW, a compile mode."""
    if args.flex_attention:
        use_flex_attention(model)
    optim = cfg.optim
    optimizer, scheduler = build_optimizer(model, opt=optim.opt, lr=optim.lr, min_lr=optim.min_lr,
                                           weight_decay=optim.weight_decay, betas=optim.betas, eps=optim.opt_eps,
                                           momentum=optim.momentum, sched=optim.sched, warmup=10, total=1000,
                                           fused=args.fused_adamw)
    forward = torch.compile(model, mode=args.compile_mode) if args.compile else model

    def step(images, tokens, mask):
        return train_step(model, optimizer, scheduler, images, tokens, mask, max_masked=cfg.data.num_masked,
                          clip_grad=optim.clip_grad, device=device, forward=forward).loss

    return step


def timed(batches, step, warmup: int, steps: int, device) -> float:
    n = 0
    for i, (images, tokens, mask) in enumerate(batches):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, n = time.perf_counter(), 0
        loss = step(images, tokens, mask)
        n += images.shape[0]
        if i + 1 == warmup + steps:
            loss.item()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return n / (time.perf_counter() - start)
    raise RuntimeError("ran out of batches")


class TwoViewDataset(torch.utils.data.IterableDataset):
    """BEiT's reference augmentation with PIL: jitter, flip, one RandomResizedCrop at 224 and 112."""

    def __init__(self, shards, grid: int):
        self.shards, self.grid = shards, grid

    def __iter__(self):
        import io

        from PIL import Image
        from torchvision import transforms as T
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng(wid)
        jitter, masker = T.ColorJitter(0.4, 0.4, 0.4), BlockMaskGenerator((self.grid, self.grid))
        norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        while True:
            for shard in self.shards[wid::nw] or self.shards:
                for sample in iter_samples(shard):
                    img = jitter(Image.open(io.BytesIO(sample.image)).convert("RGB"))
                    if rng.random() < 0.5:
                        img = TF.hflip(img)
                    i, j, h, w = T.RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
                    big = TF.resized_crop(img, i, j, h, w, [224, 224], InterpolationMode.BICUBIC)
                    small = TF.resized_crop(img, i, j, h, w, [112, 112], InterpolationMode.LANCZOS)
                    yield norm(TF.to_tensor(big)), TF.to_tensor(small), torch.from_numpy(masker(rng).reshape(-1))


def reference_loader(shards, grid: int, batch_size: int, workers: int, device):
    return torch.utils.data.DataLoader(TwoViewDataset(shards, grid), batch_size=batch_size, num_workers=workers,
                                       pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                       prefetch_factor=4 if workers else None)


def reference_batches(shards, tokenizer, batch_size, workers, device, dtype, *, online_tokenizer: bool = True):
    """The reference recipe's batches; without ``online_tokenizer``, its loader alone (random targets)."""
    for big, small, mask in reference_loader(shards, tokenizer.grid, batch_size, workers, device):
        small = small.to(device, non_blocking=True)
        if online_tokenizer:
            with torch.inference_mode(), autocast(device):
                tokens = tokenizer.encode(small).flatten(1).clone()  # the online tokenizer, every step
        else:
            tokens = torch.zeros(small.shape[0], tokenizer.grid ** 2, dtype=torch.int64, device=device)
        yield big.to(device, dtype, non_blocking=True), tokens, mask.to(device, non_blocking=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="beit_mim_tiny_patch16_224")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--tokenizer-config", default="tiny", choices=["tiny", "dalle"])
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference loader")
    p.add_argument("--num-threads", type=int, default=4, help="DALI CPU threads")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-mode", default=None, choices=[None, "reduce-overhead", "max-autotune",
                                                            "max-autotune-no-cudagraphs"])
    p.add_argument("--flex-attention", action="store_true", help="the relative-position bias through FlexAttention")
    p.add_argument("--fused-adamw", action="store_true")
    p.add_argument("--imagenet-like", action="store_true", help="JPEG q90 at 500x375, ~110 KB, not 512-pixel photos")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--skip-online", action="store_true", help="do not time --targets online")
    p.add_argument("--reference-loader", action="store_true", help="also time the reference's loader alone")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile N end-to-end steps (torch.profiler) and report where the time goes")
    return p.parse_args()


def profile_figures(batches, step, steps: int, device) -> dict:
    """The operators and kernels that take the most time over ``steps`` end-to-end steps (after two
    unprofiled ones): device time on a GPU (every kernel of the process, DALI's included, and the
    copies), CPU time on the CPU; each with its share and its milliseconds per step."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    it = iter(batches)
    for _ in range(2):
        step(*next(it))
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            loss = step(*next(it))
        loss.item()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    key = ("self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total") \
        if cuda else "self_cpu_time_total"
    total = sum(getattr(e, key) for e in events) or 1
    top = sorted(events, key=lambda e: -getattr(e, key))[:15]
    return {"profile_steps": steps, "profile_by": key, "profile_total_ms_per_step": round(total / 1000 / steps, 2),
            "profile_top": [{"name": e.key[:90], "share": round(getattr(e, key) / total, 4),
                             "ms_per_step": round(getattr(e, key) / 1000 / steps, 3)} for e in top]}


def synthetic_batches(tokenizer, batch_size: int, device, dtype):
    """The same batch forever: the model's speed with no loader at all."""
    images = torch.randn(batch_size, 3, 224, 224, device=device, dtype=dtype)
    tokens = torch.randint(0, tokenizer.vocab_size, (batch_size, tokenizer.grid ** 2), device=device)
    masks = np.stack([BlockMaskGenerator((tokenizer.grid,) * 2)(np.random.default_rng(i)).reshape(-1)
                      for i in range(batch_size)])
    mask = torch.from_numpy(masks).to(device)
    while True:
        yield images, tokens, mask


def reference_figures(args, shards, tokenizer, step, e2e: float, device, dtype) -> dict:
    """The reference recipe (PIL loader, online dVAE) and, with ``reference_loader``, its loader alone."""
    record = {}
    B = args.batch_size
    if not args.skip_reference:
        ref = timed(reference_batches(expand_shards(str(shards)), tokenizer, B, args.workers, device, dtype),
                    step, args.warmup, args.steps, device)
        record.update({"reference_img_per_s": round(ref, 1), "reference_workers": args.workers,
                       "end_to_end_over_reference": round(e2e / ref, 3)})
    if args.reference_loader:  # what limits the reference: its loader, with no model and no dVAE
        ref_loader = timed(reference_batches(expand_shards(str(shards)), tokenizer, B, args.workers, device,
                                             dtype, online_tokenizer=False),
                           lambda images, tokens, mask: images.sum(), args.warmup, args.steps, device)
        record["reference_loader_only_img_per_s"] = round(ref_loader, 1)
    return record


def online_figure(args, shards, tok_path, step, device, dtype) -> float:
    """img/s of pretrain's own stream with online targets: fresh views, the tokenizer in the loop."""
    cfg = PretrainConfig.from_flat(shards=str(shards), targets="online", tokenizer=str(tok_path), out="unused",
                                   model=args.model, recipe="beit", batch_size=args.batch_size,
                                   num_threads=args.num_threads)
    stream = TrainStream(cfg.data, device=device, tokenizer=load_tokenizer(tok_path),
                         recipe=view_recipe(cfg.recipe, views=1, seed=cfg.data.seed))
    return timed(((b.images, b.tokens, b.mask) for b in stream.batches(dtype=dtype)), step, args.warmup, args.steps,
                 device)


def main():
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards, tok_path, tokens = make_tokens(tmp, args.images, tokenizer_config=args.tokenizer_config,
                                               views=args.views, device=args.device,
                                               imagenet_like_images=args.imagenet_like)
        tokenizer = load_tokenizer(tok_path).to(device)
        # The dVAE tokens' recipe, as pretrain would take it from them.
        cfg = PretrainConfig.from_flat(shards=str(shards), tokens=str(tokens), out=str(tmp / "run"),
                                       model=args.model, recipe="beit", batch_size=args.batch_size,
                                       num_threads=args.num_threads)
        model = build_model(cfg.arch.model, tokenizer.vocab_size, drop_path=cfg.arch.drop_path,
                            layer_scale=cfg.arch.layer_scale).to(device).train()
        step = make_step(model, cfg, device, args)
        model_only = timed(synthetic_batches(tokenizer, args.batch_size, device, dtype), step, args.warmup,
                           args.steps, device)
        stream = TrainStream(cfg.data, device=device)
        e2e = timed(((b.images, b.tokens, b.mask) for b in stream.batches(dtype=dtype)), step, args.warmup,
                    args.steps, device)
        loader = timed(((b.images, b.tokens, b.mask) for b in stream.batches(dtype=dtype)),
                       lambda images, tokens, mask: images.sum(), args.warmup, args.steps, device)
        record = {"benchmark": "pretrain", "device": device_name(device), "model": args.model,
                  "batch_size": args.batch_size, "dtype": str(dtype).replace("torch.", ""), "compiled": args.compile,
                  "compile_mode": args.compile_mode, "flex_attention": args.flex_attention,
                  "fused_adamw": args.fused_adamw, "imagenet_like": args.imagenet_like,
                  "model_only_img_per_s": round(model_only, 1), "end_to_end_img_per_s": round(e2e, 1),
                  "loader_only_img_per_s": round(loader, 1),
                  "end_to_end_over_model_only": round(e2e / model_only, 3)}
        if not args.skip_online:
            online = online_figure(args, shards, tok_path, step, device, dtype)
            record.update({"online_targets_img_per_s": round(online, 1),
                           "end_to_end_over_online_targets": round(e2e / online, 3)})
        record.update(reference_figures(args, shards, tokenizer, step, e2e, device, dtype))
        if args.profile:
            record.update(profile_figures(((b.images, b.tokens, b.mask) for b in stream.batches(dtype=dtype)), step,
                                          args.profile, device))
        emit({**record, "torch": torch.__version__})

if __name__ == "__main__":
    main()
