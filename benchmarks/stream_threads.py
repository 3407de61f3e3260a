"""How much CPU the training stream's threads take inside the training process, per batch.

Every second those threads spend running Python holds the GIL that the training loop needs
to launch its kernels. This drains ``TrainStream.batches`` with no model and reports the CPU
seconds of the stream's loader threads (``beit-data-prefetch``) per delivered batch, read
from ``/proc/self/task``; work done in other processes (DALI's loader process) is not
counted. Prints one JSON object.

    python -m benchmarks.stream_threads [--images 512 --batch-size 32 --batches 12]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import torch

from beit_data.stream import StreamConfig, TrainStream
from benchmarks.common import device_name, emit, make_tokens


def thread_cpu_seconds(native_id: int) -> float:
    """utime + stime of one thread of this process."""
    with open(f"/proc/self/task/{native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--num-threads", type=int, default=2, help="DALI CPU threads")
    args = p.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards, _, tokens = make_tokens(tmp, args.images, per_shard=args.images // 4, tokenizer_config="tiny",
                                        device=args.device)
        stream = TrainStream(StreamConfig(shards=str(shards), tokens=str(tokens), batch_size=args.batch_size,
                                          num_threads=args.num_threads), device=device)
        batches = stream.batches()
        next(batches)  # start-up: pipeline build and, where there is one, the loader process
        loaders = [t for t in threading.enumerate() if t.name == "beit-data-prefetch"]
        cpu0 = sum(thread_cpu_seconds(t.native_id) for t in loaders)
        start = time.perf_counter()
        for _ in range(args.batches):
            next(batches)
        seconds = time.perf_counter() - start
        cpu = sum(thread_cpu_seconds(t.native_id) for t in loaders) - cpu0
        batches.close()
    emit({"benchmark": "stream_threads", "device": device_name(device), "batch_size": args.batch_size,
          "batches": args.batches, "loader_threads": len(loaders), "img_per_s": round(
              args.batches * args.batch_size / seconds, 1),
          "loader_thread_cpu_ms_per_batch": round(1000 * cpu / args.batches, 1),
          "loader_thread_cpu_us_per_image": round(1e6 * cpu / (args.batches * args.batch_size), 1)})


if __name__ == "__main__":
    main()
