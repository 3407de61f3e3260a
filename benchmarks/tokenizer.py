"""Tokenizer ``encode`` throughput, random weights: DALL-E's dVAE at 112, or BEiT v2's VQ-KD at 224.

CPU: fp32, batch 64 (8 for VQ-KD). GPU: bf16 autocast (and channels_last for the dVAE);
``--compile`` adds torch.compile and ``--cudnn-benchmark`` cuDNN autotuning. For VQ-KD it also
reports the online reference's cost: BEiT v2's trainer runs this ViT-B forward on every
training image (batch 128 per GPU), which precomputing the tokens removes; the figures
``*_hours_imagenet`` put that next to tokenizing ImageNet once with 10 views. Prints one JSON
object per configuration.

    python -m benchmarks.tokenizer                     # CPU
    python -m benchmarks.tokenizer --device cuda --batch-size 256 --compile --cudnn-benchmark
    python -m benchmarks.tokenizer --tokenizer vqkd --device cuda --batch-size 256 --compile
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from beit_model.dall_e import Encoder, map_pixels
from pipelines.runtime import autocast

IMAGENET = 1_281_167


def measure(encode, batch, device, iters: int, warmup: int) -> float:
    def step():
        with torch.inference_mode(), autocast(device):
            return encode(batch)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return iters * batch.shape[0] / (time.perf_counter() - start)


def dalle_variants(args, device, batch):
    """(name, encode, cudnn benchmark) for OpenAI's dVAE architecture."""
    torch.manual_seed(0)
    encoder = Encoder().to(device).eval()
    if device.type != "cuda":
        return [("eager", lambda x: encoder(map_pixels(x)).argmax(1), False)], batch
    encoder = encoder.to(memory_format=torch.channels_last)
    batch = batch.contiguous(memory_format=torch.channels_last)
    variants = [("eager_channels_last", lambda x: encoder(map_pixels(x)).argmax(1), False)]
    if args.cudnn_benchmark:
        variants.append(("eager_channels_last_cudnn_benchmark", variants[0][1], True))
    if args.compile:
        compiled = torch.compile(encoder)
        variants.append(("compiled_channels_last_cudnn_benchmark", lambda x: compiled(map_pixels(x)).argmax(1), True))
    return variants, batch


def vqkd_variants(args, device):
    """(name, encode, cudnn benchmark) for BEiT v2's ViT-B/16 VQ-KD."""
    from benchmarks.random_vqkd import random_tokenizer

    eager = random_tokenizer().to(device)
    variants = [("eager", eager.encode, False)]
    if args.compile:
        compiled = random_tokenizer().to(device)
        compiled.compile_encoder()
        variants.append(("compiled", compiled.encode, False))
    return variants


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", default="dalle", choices=["dalle", "vqkd"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 (VQ-KD: 8) on the CPU, 256 on a GPU")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="also measure torch.compile")
    p.add_argument("--cudnn-benchmark", action="store_true", help="also measure with cuDNN autotuning")
    args = p.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    vqkd = args.tokenizer == "vqkd"
    size = 224 if vqkd else 112
    batch_size = args.batch_size or (256 if gpu else 8 if vqkd else 64)
    iters = args.iters or (50 if gpu else 3)
    batch = torch.rand(batch_size, 3, size, size, device=device)
    variants = vqkd_variants(args, device) if vqkd else None
    if not vqkd:
        variants, batch = dalle_variants(args, device, batch)
    common = {"benchmark": "tokenizer_encode", "tokenizer": args.tokenizer, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if gpu else "cpu",
              "dtype": "bf16-autocast" if gpu else "fp32", "size": size, "torch": torch.__version__}
    for name, encode, bench in variants:
        torch.backends.cudnn.benchmark = bench
        ips = measure(encode, batch, device, iters, warmup=3 if not gpu else 10)
        row = {**common, "variant": name, "batch_size": batch_size, "views_per_s": round(ips, 1)}
        if vqkd:  # one tokenizer forward per view, once (10 views), against one per training image per epoch
            row["precompute_10_views_hours_imagenet"] = round(IMAGENET * 10 / ips / 3600, 2)
            row["online_1600_epochs_hours_imagenet"] = round(IMAGENET * 1600 / ips / 3600, 1)
        print(json.dumps(row), flush=True)
    if vqkd:  # the online reference: the same forward at the reference's per-GPU training batch
        online = 128 if gpu else min(batch_size, 8)
        ips = measure(variants[0][1], batch[:online], device, iters, warmup=3 if not gpu else 10)
        print(json.dumps({**common, "variant": "online_reference_eager", "batch_size": online,
                          "training_img_per_s": round(ips, 1)}), flush=True)


if __name__ == "__main__":
    main()
