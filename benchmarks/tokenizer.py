"""Tokenizer ``encode`` throughput at 112x112 (DALL-E architecture, random weights).

CPU: fp32, batch 64. GPU: bf16 autocast and channels_last; ``--compile`` adds torch.compile
and ``--cudnn-benchmark`` cuDNN autotuning. Prints one JSON object per configuration.

    python -m benchmarks.tokenizer                     # CPU
    python -m benchmarks.tokenizer --device cuda --batch-size 256 --compile --cudnn-benchmark
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from beit_model.dall_e import Encoder, map_pixels
from pipelines.runtime import autocast


def measure(encoder, batch, device, iters: int, warmup: int) -> float:
    def step():
        with torch.inference_mode(), autocast(device):
            return encoder(map_pixels(batch)).argmax(1)

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


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 on the CPU, 256 on a GPU")
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="also measure torch.compile")
    p.add_argument("--cudnn-benchmark", action="store_true", help="also measure with cuDNN autotuning")
    args = p.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    batch_size = args.batch_size or (256 if gpu else 64)
    iters = args.iters or (50 if gpu else 3)
    torch.manual_seed(0)
    encoder = Encoder().to(device).eval()
    batch = torch.rand(batch_size, 3, args.size, args.size, device=device)
    variants = [("eager", encoder, False)]
    if gpu:
        encoder = encoder.to(memory_format=torch.channels_last)
        batch = batch.contiguous(memory_format=torch.channels_last)
        variants = [("eager_channels_last", encoder, False)]
        if args.cudnn_benchmark:
            variants.append(("eager_channels_last_cudnn_benchmark", encoder, True))
        if args.compile:
            variants.append(("compiled_channels_last_cudnn_benchmark", torch.compile(encoder), True))
    for name, model, bench in variants:
        torch.backends.cudnn.benchmark = bench
        ips = measure(model, batch, device, iters, warmup=3 if not gpu else 10)
        print(json.dumps({"benchmark": "tokenizer_encode", "variant": name, "device": str(device),
                          "device_name": torch.cuda.get_device_name(device) if gpu else "cpu",
                          "dtype": "bf16-autocast" if gpu else "fp32", "batch_size": batch_size,
                          "size": args.size, "img_per_s": round(ips, 1), "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()
