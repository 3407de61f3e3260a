"""``beit-data tokenize`` end to end against the tokenizer alone, on the same data, in one run.

End to end: tar reading, probing, view sampling, DALI decode + V crops, the dVAE and the
Parquet writes. Tokenizer only: the same number of views as ready tensors on the device.
The target on a GPU is end to end >= 90% of tokenizer only. Prints one JSON object.

    python -m benchmarks.tokenize                                  # CPU, tiny tokenizer
    python -m benchmarks.tokenize --device cuda --images 4096 --tokenizer-config dalle --batch-size 32
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from beit_data.runtime import autocast
from beit_model.dvae import load_tokenizer
from benchmarks.common import device_name, emit, make_shards, make_tokenizer
from pipelines.tokenize import TokenizeConfig, run_tokenize


def tokenizer_only(tokenizer, n_views: int, batch: int, device) -> float:
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


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--views", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8, help="images per batch; views per batch = this x views")
    p.add_argument("--tokenizer-config", default="tiny", choices=["tiny", "dalle"])
    p.add_argument("--num-threads", type=int, default=4)
    args = p.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = make_shards(tmp, args.images)
        tok_path = make_tokenizer(tmp / "tok.pt", args.tokenizer_config)
        cfg = dict(shards=str(shards), tokenizer=str(tok_path), views=args.views, batch_size=args.batch_size,
                   device=args.device, num_threads=args.num_threads, progress=False)
        run_tokenize(TokenizeConfig(out=str(tmp / "warm"), **{**cfg, "shards": str(shards / "bench-000000.tar")}))
        start = time.perf_counter()
        summary = run_tokenize(TokenizeConfig(out=str(tmp / "tokens"), **cfg))
        e2e = summary["views"] / (time.perf_counter() - start)
        tokenizer = load_tokenizer(tok_path).to(device)
        only = tokenizer_only(tokenizer, summary["views"], args.batch_size * args.views, device)
    emit({"benchmark": "tokenize", "device": device_name(device), "tokenizer": args.tokenizer_config,
          "images": summary["images"], "views": summary["views"], "batch_views": args.batch_size * args.views,
          "end_to_end_views_per_s": round(e2e, 1), "tokenizer_only_views_per_s": round(only, 1),
          "ratio": round(e2e / only, 3), "torch": torch.__version__})


if __name__ == "__main__":
    main()
