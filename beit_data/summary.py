"""Reading token Parquet files for people: summaries, codebook usage, coverage and validation.

Everything streams by row group, so memory stays bounded by the keys (the distinct ones, and
one file's key column) and the codebook size, not by the number of rows.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from beit_common import BeitDataError, Location
from beit_data.shard_index import check_fingerprint, read_index
from beit_data.shards import expand_shards
from beit_data.tokens import (
    TokenMeta,
    check_recipe,
    check_rows,
    file_keys,
    parquet_file,
    read_meta,
    token_files,
    token_paths,
)

__all__ = ["summarise", "codebook_warnings"]


# What inspect reads of each token file: the keys and ids it counts, and what ``check_rows`` checks.
_CHECKED = ["key", "view", "x", "y", "w", "h", "width", "height", "tokens"]


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


@dataclass
class _Tally:
    """What the token files of a folder add up to, read one row group at a time."""

    errors: list[str] = field(default_factory=list)
    reference: TokenMeta | None = None
    ref_file: str | None = None
    keys: dict[str, set[str]] = field(default_factory=dict)  # by token file
    rows: int = 0
    counts: np.ndarray | None = None
    rejects: list[dict] = field(default_factory=list)
    readable: int = 0
    fingerprints: dict[str, dict | None] = field(default_factory=dict)

    def add(self, path: Location, batch_rows: int) -> None:
        """Read one token file into the tally; what is wrong with it becomes an error line."""
        name = path.name
        try:
            meta, file = read_meta(path), parquet_file(path)  # the schema and what the statistics show
            if self.reference is None:
                self.reference, self.ref_file = meta, name
            check_recipe(meta, self.reference, f"{name} and {self.ref_file}")
        except BeitDataError as exc:
            self.errors.append(str(exc))
            return
        vocab = meta.tokenizer.vocab
        if self.counts is None:
            self.counts = np.zeros(vocab, dtype=np.int64)
        keys, column, rows = self.keys.setdefault(name, set()), [], 0
        try:
            for batch in file.iter_batches(batch_size=batch_rows, columns=_CHECKED):
                check_rows(batch, vocab, name, start=rows)  # ids and windows, as pretrain checks them
                keys.update(batch.column("key").to_pylist())
                column.append(batch.column("key"))
                flat = batch.column("tokens").flatten().to_numpy()
                self.counts += np.bincount(flat, minlength=len(self.counts))[: len(self.counts)]
                rows += batch.num_rows
        except (pa.ArrowException, OSError, ValueError) as exc:
            self.errors.append(f"{name}: unreadable: {exc}")
            return
        except BeitDataError as exc:
            self.errors.append(str(exc))
            return
        self.rows += rows
        try:
            file_keys(pa.chunked_array(column, pa.string()), meta.views.views, name)  # as pretrain lays them out
        except BeitDataError as exc:
            self.errors.append(str(exc))
        self.rejects += [{"key": key, "reason": reason, "file": name} for key, reason in meta.rejects]
        self.readable += 1
        self.fingerprints[name] = meta.shard


def codebook_warnings(codebook: dict, max_share: float = 0.1, max_dead: float = 0.5) -> list[str]:
    """One line for each sign of a codebook that gives poor targets, with its figure and threshold:
    one code holding more than ``max_share`` of the tokens, or more than ``max_dead`` of the
    codes never used."""
    warnings = []
    top = codebook["top_codes"][0] if codebook["top_codes"] else None
    if top is not None and top["share"] > max_share:
        warnings.append(f"code {top['code']} holds {100 * top['share']:.1f}% of the tokens (more than "
                        f"{100 * max_share:g}%): a model can score that top-1 by always predicting it")
    dead = codebook["dead_codes"] / max(codebook["vocab"], 1)
    if dead > max_dead:
        warnings.append(f"{codebook['dead_codes']:,} of {codebook['vocab']:,} codes ({100 * dead:.1f}%) never occur "
                        f"(more than {100 * max_dead:g}%): the tokenizer uses little of its codebook here (expected "
                        "on a few images; on a large set, a collapsed tokenizer)")
    return warnings


def summarise(folder: Location, shards: str | None = None, batch_rows: int = 8192, max_share: float = 0.1,
              max_dead: float = 0.5) -> dict:
    """The whole summary as one JSON-ready dict; ``errors`` lists what failed validation and
    ``warnings`` what says the targets will train poorly (see ``codebook_warnings``)."""
    files = token_files(folder)
    tally = _Tally()
    for path in files:
        tally.add(path, batch_rows)
    if tally.reference is None:
        raise BeitDataError(f"no readable token files in {folder}: " + "; ".join(tally.errors))
    ref = tally.reference
    # Images are counted by (token file, key): separate `shards` runs reuse keys.
    images = sum(len(k) for k in tally.keys.values())
    summary = {
        "folder": str(folder), "files": len(files), "readable_files": tally.readable, "rows": tally.rows,
        "images": images, "views_per_image": round(tally.rows / max(images, 1), 3),
        "recipe_views": ref.views.views, **ref.described(),
        "codebook": _codebook(tally.counts if tally.counts is not None else np.zeros(1, np.int64)),
        "rejects": {"total": len(tally.rejects), "by_reason": _by_reason(tally.rejects)},
        "errors": tally.errors,
    }
    summary["warnings"] = codebook_warnings(summary["codebook"], max_share, max_dead)
    if shards is not None:
        summary["coverage"] = _coverage(folder, shards, tally.keys, tally.rejects, tally.fingerprints, tally.errors,
                                        {p.name for p in files})
    return summary


def _by_reason(rejects: list[dict]) -> dict[str, int]:
    # Reasons carry details after a colon (a DALI message, a size); group on the part before it.
    return dict(Counter(r["reason"].split(":")[0].split(" (")[0] for r in rejects).most_common())


def _coverage(folder: Location, spec: str, keys: dict[str, set[str]], rejects: list[dict], fingerprints: dict,
              errors: list[str], present: set[str]) -> dict:
    """Keys of the shards against the token files' keys, by (token file, key). An unreadable
    shard, or one that has changed since it was tokenized, becomes an error line and is left
    out, with its token file."""
    tar_keys: set[tuple[str, str]] = set()
    no_file, unusable = [], []
    parquet_keys = {(name, k) for name, found in keys.items() for k in found}
    listed = expand_shards(spec)
    for shard, path in zip(listed, token_paths(folder, listed)):
        name = path.name
        try:
            index = read_index(shard)
            if name in fingerprints:
                check_fingerprint(shard, fingerprints[name], path, index=index)
        except BeitDataError as exc:
            errors.append(str(exc))
            unusable.append(shard.name)
            parquet_keys -= {(name, k) for k in keys.get(name, set())}
            continue
        if name not in present:
            no_file.append(shard.name)
        tar_keys |= {(name, s.key) for s in index if s.image_ext is not None}
    rejected = {(r["file"], r["key"]) for r in rejects}
    missing = sorted(tar_keys - parquet_keys - rejected)
    extra = sorted(parquet_keys - tar_keys)
    return {"shard_keys": len(tar_keys), "shards_without_token_file": no_file, "unusable_shards": unusable,
            "keys_missing_from_parquet": len(missing), "missing_examples": [k for _, k in missing[:20]],
            "rejected_keys": len(rejected & tar_keys),
            "keys_not_in_shards": len(extra), "not_in_shards_examples": [k for _, k in extra[:20]]}
