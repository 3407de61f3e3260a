"""GPU memory over a long pretrain run: the peak allocated at step 100 and at the last step.

Runs ``beit-data pretrain`` itself (stream, DALI, the trainer's step) for ``--steps`` steps on
shards of the embedded photographs, logging every 100 steps, and reads the peak allocated
memory the trainer logs (``max_mem_gb``). Flat means nothing accumulates step after step.
Prints one JSON object.

    python -m benchmarks.memory --device cuda --model beit_mim_base_patch16_224 --batch-size 64 --steps 2000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.common import emit, make_tokens
from pipelines.pretrain import PretrainConfig, run_pretrain


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="beit_mim_base_patch16_224")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--num-threads", type=int, default=8)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards, _, tokens = make_tokens(tmp, args.images, per_shard=256, tokenizer_config="dalle",
                                        device=args.device)
        start = time.perf_counter()
        run_pretrain(PretrainConfig.from_flat(shards=str(shards), tokens=str(tokens), out=str(tmp / "run"),
                                              model=args.model,
                                    batch_size=args.batch_size, steps=args.steps, log_every=100,
                                    checkpoint_every=args.steps, compile=args.compile, device=args.device,
                                    num_threads=args.num_threads, progress=False))
        seconds = time.perf_counter() - start
        log = [json.loads(line) for line in (tmp / "run" / "log.jsonl").read_text().splitlines()]
    peaks = {r["step"]: r.get("max_mem_gb") for r in log if "loss" in r}
    last = max(peaks, default=None)  # the run's last log: a run stopped early still reports its peak
    emit({"benchmark": "memory", "model": args.model, "batch_size": args.batch_size, "steps": args.steps,
          "compiled": args.compile, "max_mem_gb_at_step_100": peaks.get(100), "last_logged_step": last,
          "max_mem_gb_at_last_logged_step": peaks.get(last), "seconds": round(seconds, 1)})


if __name__ == "__main__":
    main()
