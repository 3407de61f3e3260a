"""``beit-data shards`` from a Parquet image dataset: wall time and peak memory against file size.

Writes one Hugging Face-layout Parquet file (an image struct of JPEG bytes, a label with
ClassLabel names) of about ``--mb`` megabytes of small images (the embedded photographs,
resized to 160 pixels and re-encoded with varied quality, about 10 KB each), in row groups of
``--row-group`` rows, then runs ``shards`` on it in a fresh process and reads that process's
peak resident memory. Rows are read a row group at a time (a window of 4 when shuffling), so
the peak should not grow with the file. Prints one JSON object.

    python -m benchmarks.parquet_shards [--mb 500 --row-group 1000]
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from beit_data.sample import sample_images

MEASURE = """
import json, sys, time
from pipelines.shards import ShardsConfig, run_shards
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
before = hwm()
start = time.perf_counter()
result = run_shards(ShardsConfig(sources=[sys.argv[1]], out=sys.argv[2], maxcount=10000, progress=False))
print(json.dumps({"seconds": round(time.perf_counter() - start, 1), "images": result.images,
                  "peak_rss_mb": round(hwm()), "rss_after_imports_mb": round(before)}))
"""


def small_jpegs(count: int = 64) -> list[bytes]:
    out = []
    for i in range(count):
        photo = sample_images()[i % len(sample_images())]
        image = Image.open(photo).convert("RGB")
        image.thumbnail((160 + i % 7, 160))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=70 + i % 25)
        out.append(buffer.getvalue())
    return out


def write_dataset(path: Path, megabytes: int, row_group: int) -> int:
    images = small_jpegs()
    features = {"image": {"_type": "Image"}, "label": {"names": [f"c{i}" for i in range(10)], "_type": "ClassLabel"}}
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())],
                       metadata={"huggingface": json.dumps({"info": {"features": features}})})
    rows, size = 0, 0
    with pq.ParquetWriter(path, schema, use_dictionary=False, compression="none") as writer:
        while size < megabytes * 2**20:
            batch = [images[(rows + i) % len(images)] for i in range(row_group)]
            writer.write_table(pa.table({"image": [{"bytes": b, "path": None} for b in batch],
                                         "label": [(rows + i) % 10 for i in range(row_group)]}, schema=schema))
            rows, size = rows + row_group, size + sum(map(len, batch))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=500)
    p.add_argument("--row-group", type=int, default=1000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train-00000.parquet"
        rows = write_dataset(path, args.mb, args.row_group)
        done = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(Path(tmp) / "shards")],
                              capture_output=True, text=True, check=True)
        print(json.dumps({"benchmark": "parquet_shards", "parquet_mb": round(path.stat().st_size / 2**20),
                          "rows": rows, "row_group": args.row_group, **json.loads(done.stdout)}))


if __name__ == "__main__":
    main()
