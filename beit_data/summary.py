"""Reading token Parquet files for people: summaries, codebook usage, coverage and validation.

Everything streams by row group, so memory stays bounded by the number of distinct keys and
the codebook size, not by the number of rows.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from beit_common import BeitDataError, Location
from beit_data.shard_index import check_fingerprint, read_index
from beit_data.shards import expand_shards
from beit_data.tokens import check_recipe, parquet_file, read_meta, schema, token_files, token_paths

__all__ = ["summarise"]


def _codebook(counts: np.ndarray, top: int = 10) -> dict:
    total = counts.sum()
    p = counts[counts > 0] / max(total, 1)
    order = np.argsort(-counts, kind="stable")[:top]
    dead = np.flatnonzero(counts == 0)
    return {"codes_used": int((counts > 0).sum()), "vocab": int(len(counts)),
            "perplexity": round(float(math.exp(-(p * np.log(p)).sum())) if total else 0.0, 2),
            "top_codes": [{"code": int(c), "count": int(counts[c]), "share": round(float(counts[c] / total), 5)}
                          for c in order if counts[c] > 0],
            "dead_codes": int(len(dead)), "dead_code_examples": [int(c) for c in dead[:20]],
            "counts": [int(c) for c in counts]}


def summarise(folder: str | Path, shards: str | None = None, batch_rows: int = 8192) -> dict:
    """The whole summary as one JSON-ready dict; ``errors`` lists what failed validation."""
    files = token_files(folder)
    errors: list[str] = []
    reference, ref_file = None, None
    keys: dict[str, set[str]] = {}  # by token file
    rows = 0
    counts = None
    rejects: list[dict] = []
    readable: list[Path] = []
    fingerprints: dict[str, dict | None] = {}
    for path in files:
        try:
            meta = read_meta(path)
            file = parquet_file(path)
        except BeitDataError as exc:
            errors.append(str(exc))
            continue
        grid = meta.get("tokenizer", {}).get("grid")
        if grid is None or not file.schema_arrow.equals(schema(grid), check_metadata=False):
            errors.append(f"{Location(path).name}: schema does not match the token format: {file.schema_arrow}")
            continue
        if reference is None:
            reference, ref_file = meta, path
        try:
            check_recipe(meta, reference, f"{Location(path).name} and {Location(ref_file).name}")
        except BeitDataError as exc:
            errors.append(str(exc))
            continue
        if counts is None:
            counts = np.zeros(meta["tokenizer"]["vocab"], dtype=np.int64)
        name, file_rows = Location(path).name, 0
        try:
            for batch in file.iter_batches(batch_size=batch_rows, columns=["key", "tokens"]):
                keys.setdefault(name, set()).update(batch.column("key").to_pylist())
                flat = batch.column("tokens").flatten().to_numpy()
                counts += np.bincount(flat, minlength=len(counts))[: len(counts)]
                file_rows += batch.num_rows
        except (pa.ArrowException, OSError, ValueError) as exc:
            errors.append(f"{name}: unreadable: {exc}")
            continue
        rows += file_rows
        if file_rows != len(keys.get(name, ())) * meta["views"]["views"]:
            errors.append(f"{name}: {file_rows} rows for {len(keys.get(name, ()))} keys, not "
                          f"{meta['views']['views']} rows for each key once; tokenize it again")
        rejects += [{**r, "file": Location(path).name} for r in meta.get("rejects", [])]
        readable.append(path)
        fingerprints[Location(path).name] = meta.get("shard")
    if reference is None:
        raise BeitDataError(f"no readable token files in {folder}: " + "; ".join(errors))
    # Images are counted by (token file, key): separate `shards` runs reuse keys.
    views, images = reference["views"]["views"], sum(len(k) for k in keys.values())
    summary = {
        "folder": str(folder), "files": len(files), "readable_files": len(readable), "rows": rows,
        "images": images, "views_per_image": round(rows / max(images, 1), 3), "recipe_views": views,
        "tokenizer": reference["tokenizer"], "views": reference["views"], "decoder": reference.get("decoder"),
        "codebook": _codebook(counts if counts is not None else np.zeros(1, np.int64)),
        "rejects": {"total": len(rejects), "by_reason": _by_reason(rejects)},
        "errors": errors,
    }
    if shards is not None:
        summary["coverage"] = _coverage(folder, shards, keys, rejects, fingerprints, errors,
                                        {Location(p).name for p in files})
    return summary


def _by_reason(rejects: list[dict]) -> dict[str, int]:
    # Reasons carry details after a colon (a DALI message, a size); group on the part before it.
    return dict(Counter(r["reason"].split(":")[0].split(" (")[0] for r in rejects).most_common())


def _coverage(folder: Path | str, spec: str, keys: dict[str, set[str]], rejects: list[dict], fingerprints: dict,
              errors: list[str], present: set[str]) -> dict:
    """Keys of the shards against the token files' keys, by (token file, key). An unreadable
    shard, or one that has changed since it was tokenized, becomes an error line and is left
    out, with its token file."""
    tar_keys: set[tuple[str, str]] = set()
    no_file, unusable = [], []
    parquet_keys = {(name, k) for name, found in keys.items() for k in found}
    listed = expand_shards(spec)
    for shard, path in zip(listed, token_paths(folder, listed)):
        name = Location(path).name
        try:
            index = read_index(shard)
            if name in fingerprints:
                check_fingerprint(shard, fingerprints[name], path, index=index)
        except BeitDataError as exc:
            errors.append(str(exc))
            unusable.append(Location(shard).name)
            parquet_keys -= {(name, k) for k in keys.get(name, set())}
            continue
        if name not in present:
            no_file.append(Location(shard).name)
        tar_keys |= {(name, s.key) for s in index if s.image_ext is not None}
    rejected = {(r["file"], r["key"]) for r in rejects}
    missing = sorted(tar_keys - parquet_keys - rejected)
    extra = sorted(parquet_keys - tar_keys)
    return {"shard_keys": len(tar_keys), "shards_without_token_file": no_file, "unusable_shards": unusable,
            "keys_missing_from_parquet": len(missing), "missing_examples": [k for _, k in missing[:20]],
            "rejected_keys": len(rejected & tar_keys),
            "keys_not_in_shards": len(extra), "not_in_shards_examples": [k for _, k in extra[:20]]}
