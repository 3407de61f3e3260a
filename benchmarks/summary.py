"""``beit-data inspect`` on 1 million token rows: wall time and peak memory of the summary.

Writes synthetic token files (random keys, geometry and tokens, real metadata), then runs
the summary in a fresh process and reads that process's peak resident memory. Prints one
JSON object.

    python -m benchmarks.summary [--rows 1000000] [--files 10]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from beit_common import Location
from beit_data.tokens import build_table, decoder_meta, file_meta, write_tokens
from beit_data.views import ViewRecipe

# VmHWM is this process's own high-water mark (getrusage's ru_maxrss survives exec, so a child
# started from a large parent would report the parent's peak).
MEASURE = """
import json, sys, time
from beit_common import Location
from beit_data.summary import summarise
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
before = hwm()
start = time.perf_counter()
s = summarise(Location(sys.argv[1]))
print(json.dumps({"seconds": time.perf_counter() - start, "rows": s["rows"], "images": s["images"],
                  "peak_rss_mb": hwm(), "rss_after_imports_mb": before}))
"""


def write_files(folder: Path, rows: int, files: int, views: int = 10, grid: int = 14, vocab: int = 8192) -> None:
    rng = np.random.default_rng(0)
    per_file = rows // files
    tokenizer = {"name": "dall-e", "fingerprint": "0" * 64, "vocab": vocab, "input_size": 112, "grid": grid}
    meta = file_meta(tokenizer, ViewRecipe(views=views), decoder_meta("lanczos3"), min_size=112)
    for f in range(files):
        images = per_file // views
        keys = [f"{f * images + i:09d}" for i in range(images)]
        rows_ = [{"key": k, "view": v, "x": 0, "y": 0, "w": 100, "h": 100, "flip": False, "brightness": 1.0,
                  "contrast": 1.0, "saturation": 1.0, "width": 500, "height": 375} for k in keys for v in range(views)]
        tokens = rng.integers(0, vocab, (len(rows_), grid * grid), dtype=np.int16)
        write_tokens(Location(folder / f"shard-{f:06d}.parquet"), build_table(rows_, tokens, grid),
                     replace(meta, source=f"shard-{f:06d}.tar"))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--files", type=int, default=10)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_files(Path(tmp), args.rows, args.files)
        written = time.perf_counter() - start
        size = sum(f.stat().st_size for f in Path(tmp).glob("*.parquet"))
        out = subprocess.run([sys.executable, "-c", MEASURE, tmp], capture_output=True, text=True, check=True)
        result = json.loads(out.stdout)
    print(json.dumps({"benchmark": "inspect_summary", "rows": result["rows"], "images": result.images,
                      "files": args.files, "parquet_mb": round(size / 2**20, 1),
                      "seconds": round(result["seconds"], 2), "peak_rss_mb": round(result["peak_rss_mb"], 1),
                      "rss_after_imports_mb": round(result["rss_after_imports_mb"], 1),
                      "write_seconds": round(written, 1)}))


if __name__ == "__main__":
    main()
