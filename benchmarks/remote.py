"""The training loader reading from local files and from an S3 server on loopback.

Builds ``--images`` ImageNet-like samples (500x375 JPEGs, about 110 KB) in shards of
``--per-shard`` with their tokens, uploads shards, ``.idx`` files and token files to an S3
server on loopback (moto in server mode, reached through ``AWS_ENDPOINT_URL`` as MinIO or R2
would be), and reads one epoch from each: the sample source alone (reads, the Parquet join,
views and masks, in this process), then the whole stream (DALI's loader process and the
decode). Reports img/s, and the bytes the server sent per image against the image bytes
themselves: reading from object storage adds no second pass over the data. Prints one JSON
object.

    python -m benchmarks.remote [--images 2048 --per-shard 256 --batch-size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

from beit_data.replay import ReplaySource
from beit_data.stream import StreamConfig, TrainStream
from benchmarks.common import emit, make_tokens


def epoch(cfg: StreamConfig, *, stream: bool) -> dict:
    """img/s over one epoch (after the first batch), and the image bytes the source read."""
    if stream:
        s = TrainStream(cfg)
        steps = s.steps_per_epoch(0)
        batches = s.batches(0, 0)
    else:
        source = ReplaySource.open(cfg)
        steps = source.steps_per_epoch(0)
        batches = iter(source)
    next(batches)
    start = time.perf_counter()
    for _ in range(steps - 1):
        next(batches)
    seconds = time.perf_counter() - start
    if stream:
        batches.close()
    out = {"img_per_s": round((steps - 1) * cfg.batch_size / seconds, 1), "steps": steps}
    if not stream:
        out["image_bytes_read"] = source.bytes_read
    return out


def bytes_sent(proxy: str) -> int:
    """Bytes of response bodies the proxy in front of the S3 server has sent so far."""
    with urllib.request.urlopen(proxy + "/__stats", timeout=10) as r:
        return sum(json.loads(r.read())["bytes_sent"].values())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--per-shard", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-threads", type=int, default=2, help="DALI CPU threads")
    args = p.parse_args()
    # The server runs in a process of its own, so that it does not share this one's interpreter.
    server = subprocess.Popen([sys.executable, "-m", "tests.object_store"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    started = json.loads(server.stdout.readline())
    os.environ.update(started["env"])
    proxy = os.environ["AWS_ENDPOINT_URL"]
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket="bench")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["BEIT_DATA_CACHE"] = str(Path(tmp) / "cache")
        shards, _, tokens = make_tokens(Path(tmp), args.images, per_shard=args.per_shard, tokenizer_config="tiny",
                                        imagenet_like_images=True)
        for folder, prefix in ((shards, "shards"), (tokens, "tokens")):
            for path in folder.iterdir():
                if path.suffix in (".tar", ".idx", ".parquet"):
                    client.upload_file(str(path), "bench", f"{prefix}/{path.name}")
        tar_bytes = sum(p.stat().st_size for p in shards.glob("*.tar"))
        s3 = StreamConfig(shards="s3://bench/shards/", tokens="s3://bench/tokens/", batch_size=args.batch_size,
                          num_threads=args.num_threads)
        # Through the test proxy, which counts the bytes it sends (it is slower than the server).
        sent = bytes_sent(proxy)
        counted = epoch(s3, stream=False)
        server_bytes = bytes_sent(proxy) - sent
        # The speeds: straight to the S3 server.
        os.environ["AWS_ENDPOINT_URL"] = started["direct"]
        for where, cfg in {"local": replace(s3, shards=str(shards), tokens=str(tokens)), "s3": s3}.items():
            results[f"{where}_source"] = epoch(cfg, stream=False)
            results[f"{where}_stream"] = epoch(cfg, stream=True)
    server.stdin.close()
    server.wait(timeout=60)
    images = counted["steps"] * args.batch_size
    emit({"benchmark": "remote", "images": args.images, "per_shard": args.per_shard, "batch_size": args.batch_size,
          "tar_bytes_per_image": round(tar_bytes / args.images),
          "image_bytes_per_image_read": round(counted["image_bytes_read"] / images),
          # Everything the server sent for the epoch (images, .idx files, token files), per image.
          "server_bytes_per_image": round(server_bytes / images),
          **results, "s3_over_local_source": round(results["s3_source"]["img_per_s"] /
                                                   results["local_source"]["img_per_s"], 3),
          "s3_over_local_stream": round(results["s3_stream"]["img_per_s"] / results["local_stream"]["img_per_s"], 3)})


if __name__ == "__main__":
    main()
