"""``tokenize``'s two engines on the same shards: the plain engine in this process, and the Ray
engine (a private Ray on this machine) with 1 and 2 workers (or those ``--workers`` names).

For each Ray run, where its time went: starting Ray, starting the workers (each imports torch
and DALI and loads the tokenizer), the shards, stopping Ray. Ray's fixed cost is the sum of all
but the shards; its cost a shard is what a shard takes of a worker's time in the pool beyond
what it takes in the plain engine once started (all shards less one shard, a shard apart),
which is handing it out and its result back. Every run writes the same files, which is checked.
Prints one JSON object.

    python -m benchmarks.tokenize_engines                                  # CPU, tiny tokenizer
    python -m benchmarks.tokenize_engines --device cuda --images 2048 --shards 16 --views 10 \\
        --batch-size 32 --tokenizer-config dalle --workers 1               # one GPU: plain vs 1 actor
"""

from __future__ import annotations

import argparse
import filecmp
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import TOKENIZER_CONFIGS, device_name, emit, make_shards, make_tokenizer
from pipelines.tokenize_shards import TokenizeConfig, run_tokenize


def timed(cfg: TokenizeConfig) -> tuple[float, object]:
    start = time.perf_counter()
    result = run_tokenize(cfg)
    return time.perf_counter() - start, result


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("*.parquet"))
    return names == sorted(p.name for p in b.glob("*.parquet")) and all(
        filecmp.cmp(a / name, b / name, shallow=False) for name in names)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--shards", type=int, default=16, help="shards the images are cut into")
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tokenizer-config", default="tiny", choices=TOKENIZER_CONFIGS)
    p.add_argument("--num-threads", type=int, default=2)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="the Ray runs' worker counts")
    args = p.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = make_shards(tmp, args.images, per_shard=max(1, args.images // args.shards))
        tokenizer = make_tokenizer(tmp / "tok.pt", args.tokenizer_config)
        common = dict(shards=str(shards), tokenizer=str(tokenizer), views=args.views, batch_size=args.batch_size,
                      device=args.device, num_threads=args.num_threads, min_size=0, progress=False)
        # The plain engine with the torch threads a Ray worker has: Ray sets OMP_NUM_THREADS to its CPUs (1).
        torch.set_num_threads(1)
        one = {**common, "shards": str(shards / "bench-000000.tar")}
        run_tokenize(TokenizeConfig(out=str(tmp / "warm"), **one))  # imports, caches: both timed runs start alike
        first, _ = timed(TokenizeConfig(out=str(tmp / "one"), **one))
        seconds, plain = timed(TokenizeConfig(out=str(tmp / "plain"), **common))
        n_shards = plain.shards
        per_shard = (seconds - first) / (n_shards - 1)  # once started: start-up cancels
        record = {"benchmark": "tokenize_engines", "device": device_name(device), "tokenizer": args.tokenizer_config,
                  "images": plain.images, "shards": n_shards, "views": plain.views,
                  "plain": {"seconds": round(seconds, 2), "views_per_s": round(plain.views / seconds, 1),
                            "start_seconds": round(first - per_shard, 2), "seconds_per_shard": round(per_shard, 3)}}
        for workers in args.workers:
            out = tmp / f"ray{workers}"
            seconds, result = timed(TokenizeConfig(out=str(out), engine="ray", workers=workers, **common))
            phases = {k: round(v, 2) for k, v in result.phases.items()}
            fixed = phases["ray_start"] + phases["workers"] + phases["ray_stop"]
            # What a shard costs beyond the plain engine's, in one worker's time.
            apart = result.phases["shards"] * workers / n_shards - per_shard
            record[f"ray_{workers}"] = {
                "workers": workers, "seconds": round(seconds, 2), "views_per_s": round(result.views / seconds, 1),
                "phases": phases, "fixed_seconds": round(fixed, 2),
                "shards_views_per_s": round(result.views / result.phases["shards"], 1),
                "seconds_per_shard": round(result.phases["shards"] / n_shards, 3),
                "cost_a_shard_beyond_plain_s": round(apart, 3), "same_files_as_plain": same_files(out, tmp / "plain")}
    record["torch"] = torch.__version__
    emit(record)


if __name__ == "__main__":
    main()
