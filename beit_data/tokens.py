"""The token Parquet format: one file per shard, rows sorted by (key, view).

Columns: ``key``, ``view``, the crop window ``x, y, w, h`` (pixels of the decoded, EXIF-rotated
image), ``flip``, the jitter factors ``brightness, contrast, saturation``, the original
``width, height`` and ``tokens``, a fixed-size list of int16 of length grid*grid.

The key-value metadata holds JSON under ``beit_data.*`` keys: the format version, the
tokenizer (name, fingerprint, vocab, input size, grid), the view recipe, the decoder and
resize filters, the source shard, the tool version, and the samples rejected in that shard.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from beit_data import BeitDataError, __version__, write_atomic

__all__ = ["FORMAT_VERSION", "schema", "token_path", "build_table", "write_tokens", "read_meta",
           "recipe_signature", "describe_mismatch"]

FORMAT_VERSION = 1
META_PREFIX = "beit_data."
# The metadata that must match for a finished file to be reused by a re-run.
SIGNATURE_KEYS = ("format_version", "tokenizer", "views", "decoder")


def schema(grid: int) -> pa.Schema:
    return pa.schema([
        ("key", pa.string()), ("view", pa.int16()),
        ("x", pa.int32()), ("y", pa.int32()), ("w", pa.int32()), ("h", pa.int32()),
        ("flip", pa.bool_()),
        ("brightness", pa.float32()), ("contrast", pa.float32()), ("saturation", pa.float32()),
        ("width", pa.int32()), ("height", pa.int32()),
        ("tokens", pa.list_(pa.int16(), grid * grid)),
    ])


def token_path(out_dir: str | os.PathLike, shard: str | os.PathLike) -> Path:
    """``train-000001.tar`` -> ``OUT/train-000001.parquet``."""
    return Path(out_dir) / (Path(shard).stem + ".parquet")


def build_table(rows: list[dict], tokens: np.ndarray, grid: int) -> pa.Table:
    """A table from row dicts (all columns but tokens) and tokens (N, grid*grid), sorted."""
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["key"], rows[i]["view"]))
    sch = schema(grid)
    cols = {name: [rows[i][name] for i in order] for name in sch.names if name != "tokens"}
    flat = np.ascontiguousarray(tokens.reshape(len(rows), grid * grid)[order], dtype=np.int16).reshape(-1)
    cols["tokens"] = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.int16()), grid * grid)
    return pa.table([pa.array(cols[n], type=sch.field(n).type) if n != "tokens" else cols[n] for n in sch.names],
                    schema=sch)


def write_tokens(path: str | os.PathLike, table: pa.Table, meta: dict) -> Path:
    """Write ``table`` with ``meta`` (JSON-encoded per key) atomically: a temporary file, then a rename."""
    full = {"format_version": FORMAT_VERSION, "tool_version": __version__, **meta}
    encoded = {f"{META_PREFIX}{k}".encode(): json.dumps(v, sort_keys=True).encode() for k, v in full.items()}
    table = table.replace_schema_metadata(encoded)
    return write_atomic(path, lambda tmp: pq.write_table(table, tmp, row_group_size=8192, compression="zstd"))


def read_meta(path: str | os.PathLike) -> dict:
    """The ``beit_data.*`` metadata of a token file, decoded.

    Raises:
        BeitDataError: If the file is not Parquet or carries no beit-data metadata.
    """
    try:
        raw = pq.read_schema(path).metadata or {}
    except (pa.ArrowInvalid, OSError) as exc:
        raise BeitDataError(f"{path} is not a readable Parquet file: {exc}") from None
    meta = {k.decode()[len(META_PREFIX):]: json.loads(v) for k, v in raw.items()
            if k.decode().startswith(META_PREFIX)}
    if "format_version" not in meta:
        raise BeitDataError(f"{path} is not a beit-data token file (no beit_data.* metadata)")
    return meta


def recipe_signature(meta: dict) -> dict:
    return {k: meta.get(k) for k in SIGNATURE_KEYS}


def describe_mismatch(have: dict, want: dict) -> str:
    """Which parts of two signatures differ, e.g. ``tokenizer.fingerprint: ab12.. != cd34..``."""
    diffs = []
    for key in SIGNATURE_KEYS:
        a, b = have.get(key), want.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    diffs.append(f"{key}.{sub}: {a.get(sub)!s:.16} != {b.get(sub)!s:.16}")
        else:
            diffs.append(f"{key}: {a} != {b}")
    return "; ".join(diffs)
