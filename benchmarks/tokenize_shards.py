"""``beit-data tokenize`` end to end against the tokenizer alone, on the same data, in one run.

End to end: tar reading, probing, view sampling, DALI decode + V crops, the tokenizer and the
Parquet writes. Tokenizer only: the same number of views as ready tensors on the device.
The target on a GPU is end to end >= 90% of tokenizer only. Prints one JSON object.

    python -m benchmarks.tokenize_shards                                  # CPU, tiny tokenizer
    python -m benchmarks.tokenize_shards --device cuda --images 4096 --tokenizer-config dalle --batch-size 32
    python -m benchmarks.tokenize_shards --device cuda --images 4096 --tokenizer-config vqkd --batch-size 32 --compile
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from beit_model.tokenizer import load_tokenizer
from benchmarks.common import TOKENIZER_CONFIGS, device_name, emit, make_shards, make_tokenizer
from pipelines.runtime import autocast
from pipelines.tokenize_shards import TokenizeConfig, TokenizeJob, run_tokenize


def tokenizer_only(tokenizer, n_views: int, batch: int, device, compile_: bool) -> float:
    if compile_:
        tokenizer.compile_encoder()
    x = torch.rand(batch, 3, tokenizer.input_size, tokenizer.input_size, device=device)
    with torch.inference_mode(), autocast(device):
        tokenizer.encode(x)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    done = 0
    while done < n_views:
        with torch.inference_mode(), autocast(device):
            ids = tokenizer.encode(x)
        ids.to("cpu", torch.int16)  # the copy the real run makes
        done += batch
    return done / (time.perf_counter() - start)


def loader_only(shards, job, input_size: int, device) -> float:
    """Views/s of reading, probing, view sampling and DALI decode + crops, with no dVAE."""
    from beit_data.dali_views import DaliViews, ViewSpec
    from beit_data.prefetch import prefetch
    from beit_data.shards import expand_shards
    from pipelines.tokenize_shards import _decoded_batches, _prepared_batches

    cfg = job.cfg
    views = DaliViews(ViewSpec(views=cfg.views, size=input_size, interp=job.recipe.interp),
                      batch_size=cfg.batch_size, device=device, num_threads=cfg.num_threads)
    start, n = None, 0
    for shard in expand_shards(shards):
        prepared = prefetch(_prepared_batches(shard, job, []))
        for rows, _pixels in prefetch(_decoded_batches(prepared, shard, views, [])):
            if start is None:  # the first batch builds the pipeline
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                continue
            n += len(rows)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--views", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8, help="images per batch; views per batch = this x views")
    p.add_argument("--tokenizer-config", default="tiny", choices=TOKENIZER_CONFIGS,
                   help="vqkd: BEiT v2's ViT-B/16 tokenizer at 224 (its recipe: bicubic views)")
    p.add_argument("--num-threads", type=int, default=4)
    p.add_argument("--compile", action="store_true", help="torch.compile the tokenizer in both measurements")
    p.add_argument("--imagenet-like", action="store_true", help="JPEG q90 at 500x375 instead of 512-pixel photos")
    args = p.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = make_shards(tmp, args.images, per_shard=max(1, args.images // 4),
                             imagenet_like_images=args.imagenet_like)
        tok_path = make_tokenizer(tmp / "tok.pt", args.tokenizer_config)
        cfg = dict(tokenizer=str(tok_path), views=args.views, batch_size=args.batch_size, device=args.device,
                   num_threads=args.num_threads, compile=args.compile, progress=False)
        timings = {}
        # One shard, then all four: the difference cancels start-up (model load, fingerprint,
        # pipeline build) and leaves the steady rate a long run sees.
        # A first run warms up (with --compile, the compile cache), so that both timed runs start alike.
        run_tokenize(TokenizeConfig(shards=str(shards / "bench-000000.tar"), out=str(tmp / "warm"), **cfg))
        for name, spec in (("one", str(shards / "bench-000000.tar")), ("all", str(shards))):
            start = time.perf_counter()
            summary = run_tokenize(TokenizeConfig(shards=spec, out=str(tmp / name), **cfg))
            timings[name] = (summary.views, time.perf_counter() - start)
        (v1, t1), (v4, t4) = timings["one"], timings["all"]
        steady = (v4 - v1) / (t4 - t1)
        tokenizer = load_tokenizer(tok_path).to(device)
        only = tokenizer_only(tokenizer, v4, args.batch_size * args.views, device, args.compile)
        job = TokenizeJob.resolve(TokenizeConfig(shards=str(shards), out=str(tmp / "x"), **cfg), tokenizer)
        loader = loader_only(str(shards), job, tokenizer.input_size, device)
    emit({"benchmark": "tokenize", "device": device_name(device), "tokenizer": args.tokenizer_config,
          "images": args.images, "views": v4, "batch_views": args.batch_size * args.views,
          "end_to_end_views_per_s": round(v4 / t4, 1), "end_to_end_steady_views_per_s": round(steady, 1),
          "tokenizer_only_views_per_s": round(only, 1), "loader_only_views_per_s": round(loader, 1),
          "steady_ratio": round(steady / only, 3), "compiled": args.compile, "imagenet_like": args.imagenet_like,
          # ImageNet-1k with 10 views per image, at the steady rate; the goal is under 30 minutes.
          "imagenet_10_views_minutes": round(1_281_167 * 10 / steady / 60, 1), "torch": torch.__version__})


if __name__ == "__main__":
    main()
