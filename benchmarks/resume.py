"""Time to the first batch when a run resumes at the start and at the end of an epoch.

A resumed stream goes to its ``(epoch, step)`` directly: it passes over whole windows by
their counts and reads no image before the position. This builds a ``--images``-sample epoch
(the embedded photographs, repeated, tokenized by the tiny dVAE) and reports, for a resume at
step 0 and at the last step, the seconds to the first batch and the image bytes read for it,
both for the sample source alone (in this process) and for the whole stream (DALI, its
loader process and the decode). Prints one JSON object.

    python -m benchmarks.resume [--images 10000 --batch-size 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from beit_data.replay import ReplaySource
from beit_data.stream import StreamConfig, TrainStream
from benchmarks.common import emit, make_tokens


def first_batch_seconds(cfg: StreamConfig, step: int) -> dict:
    start = time.perf_counter()
    source = ReplaySource.open(cfg).at(0, step)
    next(iter(source))
    source_s = time.perf_counter() - start
    start = time.perf_counter()
    stream = TrainStream(cfg)
    batches = stream.batches(0, step)
    batch = next(batches)
    stream_s = time.perf_counter() - start
    batches.close()
    assert (batch.epoch, batch.step) == (0, step)
    return {"step": step, "source_seconds": round(source_s, 3), "source_image_bytes_read": source.bytes_read,
            "stream_seconds": round(stream_s, 3)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-threads", type=int, default=2, help="DALI CPU threads")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards, _, tokens = make_tokens(Path(tmp), args.images, per_shard=args.per_shard, tokenizer_config="tiny")
        cfg = StreamConfig(shards=str(shards), tokens=str(tokens), batch_size=args.batch_size,
                           num_threads=args.num_threads)
        steps = ReplaySource.open(cfg).steps_per_epoch(0)
        results = [first_batch_seconds(cfg, step) for step in (0, steps - 1)]
    emit({"benchmark": "resume", "images": args.images, "per_shard": args.per_shard, "batch_size": args.batch_size,
          "steps_per_epoch": steps, "at_start": results[0], "at_end": results[1]})


if __name__ == "__main__":
    main()
