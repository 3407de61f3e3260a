"""The token Parquet format: one file per shard, rows sorted by (key, view).

This module is the format's one home: the schema, the metadata, how rows are built, how
files are written, listed and read back, and the check that files belong together.

Columns: ``key``, ``view``, the crop window ``x, y, w, h`` (pixels of the decoded, EXIF-rotated
image), ``flip``, the jitter factors ``brightness, contrast, saturation``, the original
``width, height`` and ``tokens``, a fixed-size list of int16 of length grid*grid.

The key-value metadata holds JSON under ``beit_data.*`` keys: the format version, the
tokenizer (name, fingerprint, vocab, input size, grid), the view recipe, the decoder and
resize filters, the minimum image size, the source shard's name (``source``) and fingerprint
(``shard``: size and member hash), the samples rejected in that shard and the tool version.
It is read and written as one ``TokenMeta``: no other module reads a key of it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from beit_common import BeitDataError, Location, __version__, storage, write_atomic
from beit_common.listing import list_files
from beit_data.views import JITTER_ORDER, View, ViewRecipe, outside_image

__all__ = ["FORMAT_VERSION", "VIEW_COLUMNS", "WINDOW_COLUMNS", "SIGNATURE_KEYS", "TARGET_KEYS", "TokenizerMeta",
           "DecoderMeta", "TokenMeta", "schema", "token_path", "token_files", "file_meta", "decoder_meta", "view_rows",
           "with_more_views", "grows_to", "build_table", "write_tokens", "read_meta", "read_footer", "read_table",
           "check_schema", "check_footer", "check_rows", "file_keys", "parquet_file", "recipe_mismatch",
           "check_recipe", "read_consistent_footers"]

FORMAT_VERSION = 2  # 2: the source shard's fingerprint (``shard``) is recorded
META_PREFIX = "beit_data."
# The metadata that must match for files to be used together, or for a finished file to be reused.
SIGNATURE_KEYS = ("format_version", "tokenizer", "views", "decoder", "min_size")
# What held-out tokens share with the training tokens: the tokenizer, and the filter and jitter rule of its
# views (they may be fewer, or other crops).
TARGET_KEYS = ("tokenizer", "views.interp", "views.target_jitter")
# The columns that describe a stored view, as the training stream replays it.
VIEW_COLUMNS = ("view", "x", "y", "w", "h", "flip", "brightness", "contrast", "saturation")
# A row's place and its crop window in its image, as ``check_rows`` checks them.
WINDOW_COLUMNS = ("key", "view", "x", "y", "w", "h", "width", "height")
_AGAIN = " with `--overwrite`"


# ---- the metadata -------------------------------------------------------------------------------
# The parts' fields are in the footer JSON's (sorted) order, so that ``as_dict`` reads as the file does.


@dataclass(frozen=True, kw_only=True)
class TokenizerMeta:
    """The tokenizer whose ids a token file holds, as it describes itself (``describe()``);
    files from before BEiT v2 name no ``kind``: theirs is a dVAE."""

    fingerprint: str
    grid: int
    input_size: int
    kind: str = "dvae"
    name: str
    vocab: int

    @classmethod
    def from_dict(cls, d: dict) -> TokenizerMeta:
        """From ``describe()``, or the ``tokenizer`` JSON of a footer or a checkpoint."""
        return cls(**d)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class DecoderMeta:
    """How the views were decoded, resized and jittered, in words (``decoder_meta``)."""

    decoder: str
    exif: str
    jitter_order: str
    resize: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class TokenMeta:
    """A token file's metadata, as its footer holds it (``from_footer`` / ``as_footer``).

    The targets of online training have no file: their metadata is the tokenizer and the view
    recipe alone, the rest left at its defaults.

    Attributes:
        format_version: ``FORMAT_VERSION`` of the writer.
        tokenizer: What made the ids.
        views: The recipe that drew the views.
        decoder: How the views were decoded and resized.
        min_size: Images with a shorter side were rejected.
        source: The source shard's name.
        shard: The source shard's fingerprint (``beit_data.shard_index.shard_fingerprint``);
            None in files made before it was recorded.
        rejects: ``(key, reason)`` of each sample of the shard left out.
        tool_version: The beit-data that wrote the file.
    """

    format_version: int = FORMAT_VERSION
    tokenizer: TokenizerMeta
    views: ViewRecipe
    decoder: DecoderMeta | None = None
    min_size: int | None = None
    source: str | None = None
    shard: dict | None = None
    rejects: tuple[tuple[str, str], ...] = ()
    tool_version: str | None = __version__

    @classmethod
    def from_footer(cls, footer: dict, path) -> TokenMeta:
        """The metadata of a footer's decoded ``beit_data.*`` JSON (prefix removed). A file from
        before the BEiT v2 recipe gets its defaults (a dVAE, BEiT's recipe and its Lanczos
        filter), so files of either version compare equal where they agree.

        Raises:
            BeitDataError: For metadata without a format version, a tokenizer grid or vocab, or
                with a part the format does not know, naming ``path``.
        """
        if "format_version" not in footer:
            raise BeitDataError(f"{path} is not a beit-data token file (no beit_data.* metadata)")
        tokenizer = footer.get("tokenizer")
        grid, vocab = (tokenizer.get(k) if isinstance(tokenizer, dict) else None for k in ("grid", "vocab"))
        if not (isinstance(grid, int) and isinstance(vocab, int) and grid > 0 and vocab > 0):
            raise BeitDataError(f"{path} records no tokenizer grid and vocab (beit_data.tokenizer); tokenize its "
                                f"shard again{_AGAIN}")
        try:
            decoder = footer.get("decoder")
            return cls(format_version=footer["format_version"], tokenizer=TokenizerMeta.from_dict(tokenizer),
                       views=ViewRecipe.from_dict(footer["views"]),
                       decoder=DecoderMeta(**decoder) if decoder is not None else None,
                       min_size=footer.get("min_size"), source=footer.get("source"), shard=footer.get("shard"),
                       rejects=tuple((r["key"], r["reason"]) for r in footer.get("rejects", [])),
                       tool_version=footer.get("tool_version"))
        except (TypeError, KeyError, AttributeError, BeitDataError) as exc:
            raise BeitDataError(f"{path} records metadata the token format does not know ({type(exc).__name__}: "
                                f"{exc}); tokenize its shard again{_AGAIN}") from None

    def as_footer(self) -> dict:
        """The footer's JSON value of each key (``beit_data.`` left off): what ``write_tokens``
        writes and ``from_footer`` reads back."""
        return {"format_version": self.format_version, "tokenizer": self.tokenizer.as_dict(),
                "views": dict(sorted(self.views.as_dict().items())),
                "decoder": self.decoder.as_dict() if self.decoder is not None else None, "min_size": self.min_size,
                "source": self.source, "shard": self.shard,
                "rejects": [{"key": key, "reason": reason} for key, reason in self.rejects],
                "tool_version": self.tool_version}

    def targets(self) -> dict:
        """The tokenizer and the view recipe, as the footer holds them: what a run records of its
        targets (its checkpoint's data)."""
        footer = self.as_footer()
        return {"tokenizer": footer["tokenizer"], "views": footer["views"]}

    def described(self) -> dict:
        """``targets()`` and the decoder: how the tokens were made, as ``inspect`` reports it."""
        return {**self.targets(), "decoder": self.as_footer()["decoder"]}

    @classmethod
    def of_targets(cls, targets: dict) -> TokenMeta:
        """The metadata of what ``targets()`` recorded (a run's checkpoint), with the defaults a
        run from before the BEiT v2 recipe lacks."""
        return cls(tokenizer=TokenizerMeta.from_dict(targets["tokenizer"]),
                   views=ViewRecipe.from_dict(targets["views"]))


def schema(grid: int) -> pa.Schema:
    return pa.schema([
        ("key", pa.string()), ("view", pa.int16()),
        ("x", pa.int32()), ("y", pa.int32()), ("w", pa.int32()), ("h", pa.int32()),
        ("flip", pa.bool_()),
        ("brightness", pa.float32()), ("contrast", pa.float32()), ("saturation", pa.float32()),
        ("width", pa.int32()), ("height", pa.int32()),
        ("tokens", pa.list_(pa.int16(), grid * grid)),
    ])


def token_path(out_dir: Location, shard: Location) -> Location:
    """``train-000001.tar`` -> ``OUT/train-000001.parquet`` (``OUT`` may be an ``s3://`` or ``gs://`` prefix)."""
    return out_dir / (shard.stem + ".parquet")


def token_paths(out_dir: Location, shards: Sequence[Location]) -> list[Location]:
    """The token file of each shard; two shards that would share one are refused, naming both.

    Raises:
        BeitDataError: ``a/train-000000.tar`` and ``b/train-000000.tar`` in one spec.
    """
    paths, seen = [], {}
    for shard in shards:
        path = token_path(out_dir, shard)
        name = path.name
        if name in seen:
            raise BeitDataError(f"shards {seen[name]} and {shard} have one name, so both would have the token file "
                                f"{name}; give each shard a name of its own")
        seen[name] = shard
        paths.append(path)
    return paths


def token_files(folder: Location, *, allow_empty: bool = False) -> list[Location]:
    """The token files of a folder or object-storage prefix, sorted by name (with ``allow_empty``,
    none is not an error)."""
    files = list_files(folder, ".parquet", what="token folder")
    if not files and not allow_empty:
        raise BeitDataError(f"no .parquet files in {folder}")
    return files


def read_table(path: Location, columns: Sequence[str] | None = None, filters=None) -> pa.Table:
    """A token file's table (or some of its columns), from a local path or an object URL.
    Without ``filters`` the file is read as itself: ``pq.read_table`` goes through Arrow's dataset
    layer, whose first use imports pandas, a third of a second in every new process (each
    forked loader, each held-out evaluation's)."""
    where, fs = storage.arrow_source(path)
    with storage.remote_errors(path):
        if filters is not None:
            return pq.read_table(where, columns=columns, filters=filters, filesystem=fs)
        with pq.ParquetFile(where, filesystem=fs) as file:
            return file.read(columns=columns)


def parquet_file(path: Location) -> pq.ParquetFile:
    """A token file opened for its metadata and row groups."""
    where, fs = storage.arrow_source(path)
    with storage.remote_errors(path):
        return pq.ParquetFile(where, filesystem=fs)


def file_meta(tokenizer: dict, recipe: ViewRecipe, decoder: DecoderMeta, min_size: int) -> TokenMeta:
    """The metadata that every file of one tokenize run shares (each file adds its shard's).

    Args:
        tokenizer: The tokenizer's ``describe()``: kind, name, fingerprint, vocab, input_size and grid.
        recipe: The view recipe.
        decoder: How views were decoded and resized (``decoder_meta``).
        min_size: Images with a shorter side were rejected.
    """
    return TokenMeta(tokenizer=TokenizerMeta.from_dict(tokenizer), views=recipe, decoder=decoder, min_size=min_size)


def decoder_meta(resize_filter: str) -> DecoderMeta:
    """How the views were decoded and resized."""
    from beit_data.images import EXIF_RULE  # PIL; the training stream's loader process never needs it

    return DecoderMeta(decoder="DALI decoders.image (nvImageCodec), RGB", exif=EXIF_RULE,
                       resize=f"DALI resize, ROI = view window, {resize_filter}, antialiased",
                       jitter_order=JITTER_ORDER)


def view_rows(key: str, views: Sequence[View], width: int, height: int, first: int = 0) -> list[dict]:
    """The rows (every column but ``tokens``) of one image's views, numbered from ``first``
    (``beit_data.views.row_view`` is the inverse)."""
    return [{"key": key, "view": first + v, "x": view.x, "y": view.y, "w": view.w, "h": view.h, "flip": view.flip,
             "brightness": view.brightness, "contrast": view.contrast, "saturation": view.saturation,
             "width": width, "height": height} for v, view in enumerate(views)]


def with_more_views(old: pa.Table, new: pa.Table, path) -> pa.Table:
    """A token file's rows and the rows of further views of the same images, sorted by key and
    view as a fresh run's: the old rows are kept as they are.

    Raises:
        BeitDataError: When the two do not hold the same images (the shard changed).
    """
    keys = (set(t.column("key").to_pylist()) for t in (old, new))
    if next(keys) != next(keys):
        raise BeitDataError(f"{path} holds other images than its shard gives now; pass `overwrite` to replace it")
    both = pa.concat_tables([old.replace_schema_metadata(None).select(new.schema.names).cast(new.schema), new])
    return both.sort_by([("key", "ascending"), ("view", "ascending")])


def grows_to(meta: TokenMeta, reference: TokenMeta) -> int | None:
    """The views of a token file that a run of ``reference``'s recipe with more views extends:
    the file's view count where all else matches and it is smaller; None otherwise."""
    have = meta.views.views
    if have >= reference.views.views:
        return None
    same = replace(reference, views=replace(reference.views, views=have))
    return have if not recipe_mismatch(meta, same) else None


def build_table(rows: list[dict], tokens: np.ndarray, grid: int) -> pa.Table:
    """A table from row dicts (all columns but tokens) and tokens (N, grid*grid), sorted."""
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["key"], rows[i]["view"]))
    sch = schema(grid)
    cols = {name: [rows[i][name] for i in order] for name in sch.names if name != "tokens"}
    flat = np.ascontiguousarray(tokens.reshape(len(rows), grid * grid)[order], dtype=np.int16).reshape(-1)
    cols["tokens"] = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.int16()), grid * grid)
    return pa.table([pa.array(cols[n], type=sch.field(n).type) if n != "tokens" else cols[n] for n in sch.names],
                    schema=sch)


def write_tokens(path: Location, table: pa.Table, meta: TokenMeta) -> Path:
    """Write ``table`` with ``meta`` (JSON-encoded per key) atomically: a temporary file, then a rename."""
    encoded = {f"{META_PREFIX}{k}".encode(): json.dumps(v, sort_keys=True).encode()
               for k, v in meta.as_footer().items()}
    table = table.replace_schema_metadata(encoded)
    return write_atomic(path, lambda tmp: pq.write_table(table, tmp, row_group_size=8192, compression="zstd"))


def read_meta(path: Location) -> TokenMeta:
    """The ``beit_data.*`` metadata of a token file.

    Raises:
        BeitDataError: If the file is not Parquet or carries no beit-data metadata.
    """
    return read_footer(path)[0]


def read_footer(path: Location) -> tuple[TokenMeta, int]:
    """``(metadata, rows)`` of a token file, from one read of its Parquet footer.

    Raises:
        BeitDataError: If the file is not Parquet or carries no beit-data metadata.
    """
    try:
        where, fs = storage.arrow_source(path)
        with storage.remote_errors(path):
            footer = pq.read_metadata(where, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as exc:
        raise BeitDataError(f"{path} is not a readable Parquet file: {exc}") from None
    raw = footer.metadata or {}
    meta = TokenMeta.from_footer({k.decode()[len(META_PREFIX):]: json.loads(v) for k, v in raw.items()
                                  if k.decode().startswith(META_PREFIX)}, path)
    check_footer(footer, meta, path)
    return meta, footer.num_rows


# Each column's smallest valid value, as row-group statistics can prove it for a whole file at once.
_AT_LEAST = {"x": 0, "y": 0, "w": 1, "h": 1, "width": 1, "height": 1, "tokens": 0}


def check_schema(arrow_schema: pa.Schema, grid: int, path) -> None:
    """Refuse a token file without a column of the format, or with one of another type (a
    ``tokens`` list of another length than ``grid * grid`` included); other columns may follow.

    Raises:
        BeitDataError: ``"{path}: schema does not match the token format: ..."``, naming the column.
    """
    for want in schema(grid):
        at = arrow_schema.get_field_index(want.name)
        if at < 0:
            problem = f"no column {want.name}"
        elif not arrow_schema.field(at).type.equals(want.type):
            have = arrow_schema.field(at).type
            problem = f"column {want.name} is {have}, not {want.type}"
            if want.name == "tokens" and pa.types.is_fixed_size_list(have) and have.value_type == pa.int16():
                problem = f"column tokens holds {have.list_size} ids a row, not {grid * grid} (the tokenizer's grid " \
                          f"{grid}x{grid})"
        else:
            continue
        raise BeitDataError(f"{path}: schema does not match the token format: {problem}; tokenize its shard "
                            f"again{_AGAIN}")


def check_footer(footer: pq.FileMetaData, meta: TokenMeta, path) -> None:
    """Refuse what a token file's footer shows to be wrong, before its rows are read: the schema
    (``check_schema``), and from each row group's statistics, nulls, ids outside ``0 .. vocab - 1``
    and windows with a negative corner or an empty side. A row group whose statistics show a
    fault, or that has none, is read and checked row by row (``check_rows``) to name the row.
    Whether each window lies inside its image needs the rows: ``check_rows`` again, where they
    are read.
    """
    grid, vocab = meta.tokenizer.grid, meta.tokenizer.vocab
    check_schema(footer.schema.to_arrow_schema(), grid, path)
    start = 0
    for g in range(footer.num_row_groups):
        group = footer.row_group(g)
        if group.num_rows and not all(_sound(group.column(j), vocab) for j in range(group.num_columns)):
            table = parquet_file(path).read_row_group(g, columns=[f.name for f in schema(grid)])
            check_rows(table, vocab, path, start)
        start += group.num_rows


def _sound(column: pq.ColumnChunkMetaData, vocab: int) -> bool:
    """Whether a column chunk's statistics prove it has no null and no value out of range."""
    name, stats = column.path_in_schema.split(".")[0], column.statistics
    if stats is None or not stats.has_null_count or stats.null_count:
        return False
    if name not in _AT_LEAST:
        return True
    return stats.has_min_max and stats.min >= _AT_LEAST[name] and (name != "tokens" or stats.max < vocab)


def check_rows(table: pa.Table | pa.RecordBatch, vocab: int, path, start: int = 0) -> None:
    """Refuse token rows that training cannot use, naming the first such row (counted from
    ``start``, its first row's number in the file): a null, an id outside ``0 .. vocab - 1`` (the
    tokenizer's), or a crop window not inside its image. Only the columns ``table`` has are
    checked, each in a few vectorised passes.

    Raises:
        BeitDataError: ``"{path}: row {i} (key {k}, view {v}): ..."``.
    """
    names, n = set(table.schema.names), table.num_rows
    faults: list[tuple[int, str]] = []  # (row, what is wrong), the first row of each kind
    for name in table.schema.names:
        if table.column(name).null_count:
            faults.append((_first(np.asarray(pc.is_null(table.column(name)))), f"{name} is null"))
    flat = pc.list_flatten(table.column("tokens")) if "tokens" in names else None
    if flat is not None and flat.null_count:
        faults.append((_first(np.asarray(pc.is_null(flat)).reshape(n, -1).any(axis=1)), "a token id is null"))
    if faults:  # nothing below reads nulls well
        _refuse(table, path, start, *min(faults))
    if flat is not None and n:
        ids = np.asarray(flat).reshape(n, -1)
        low, high = ids.min(axis=1), ids.max(axis=1)
        bad = (low < 0) | (high >= vocab)
        if bad.any():
            row = _first(bad)
            value = low[row] if low[row] < 0 else high[row]
            faults.append((row, f"token id {value} is outside the tokenizer's vocab 0..{vocab - 1}"))
    window = ("x", "y", "w", "h", "width", "height")
    if names.issuperset(window) and n:
        x, y, w, h, width, height = (table.column(c).to_numpy().astype(np.int64) for c in window)
        bad = outside_image(x, y, w, h, width, height)
        if bad.any():
            row = _first(bad)
            faults.append((row, f"crop window x {x[row]} y {y[row]} w {w[row]} h {h[row]} is not inside its "
                                f"{width[row]}x{height[row]} image"))
    if faults:
        _refuse(table, path, start, *min(faults))


def _first(flags: np.ndarray) -> int:
    return int(np.argmax(flags))


def _refuse(table, path, start: int, row: int, problem: str) -> None:
    names = table.schema.names
    which = ", ".join(f"{c} {table.column(c)[row].as_py()}" for c in ("key", "view") if c in names)
    raise BeitDataError(f"{path}: row {start + row}{f' ({which})' if which else ''}: {problem}; tokenize its shard "
                        f"again{_AGAIN}")


def file_keys(keys: pa.Array | pa.ChunkedArray, views: int, path) -> list[str]:
    """A token file's keys in order, from its ``key`` column: the format holds each key once,
    on ``views`` rows next to each other.

    Raises:
        BeitDataError: Naming the file, for any other layout.
    """
    if len(keys) == 0:  # every image of the shard was rejected
        return []
    first = keys.take(pa.array(np.arange(0, len(keys), views)))
    repeated = pc.take(first, pa.array(np.repeat(np.arange(len(first)), views)))
    if len(keys) % views or not pc.all(pc.equal(keys, repeated)).as_py() \
            or pc.count_distinct(first).as_py() != len(first):
        raise BeitDataError(f"{path} does not hold {views} rows for each key, each key once ({len(keys)} rows for "
                            f"{pc.count_distinct(keys).as_py()} keys); tokenize it again")
    return first.to_pylist()


def recipe_mismatch(meta: TokenMeta, reference: TokenMeta, keys: Sequence[str] = SIGNATURE_KEYS) -> str:
    """Which parts of two files' metadata differ, e.g. ``tokenizer.fingerprint: ab12.. != cd34..``;
    empty when they match.

    Args:
        keys: What is compared: footer keys (``SIGNATURE_KEYS``: all of a part), or a part's
            field (``views.interp``).
    """
    have, want = meta.as_footer(), reference.as_footer()
    diffs = []
    for name in keys:
        key, _, field = name.partition(".")
        a, b = have[key], want[key]
        if field:
            pairs = [(name, a.get(field), b.get(field))]
        elif isinstance(a, dict) and isinstance(b, dict):
            pairs = [(f"{key}.{sub}", a.get(sub), b.get(sub)) for sub in sorted(set(a) | set(b))]
        else:
            diffs += [f"{key}: {a} != {b}"] if a != b else []
            continue
        diffs += [f"{what}: {x!s:.16} != {y!s:.16}" for what, x, y in pairs if x != y]
    return "; ".join(diffs)


def check_recipe(meta: TokenMeta, reference: TokenMeta, what: str, hint: str = "",
                 keys: Sequence[str] = SIGNATURE_KEYS) -> None:
    """Refuse token metadata that does not share ``reference``'s tokenizer and recipe (the
    ``keys`` of ``recipe_mismatch``).

    Args:
        what: The two things compared, as the message names them (``"a.parquet and b.parquet"``).
        hint: What to do about it, appended to the message.

    Raises:
        BeitDataError: ``"{what} come from different tokenizers or recipes: {differences}{hint}"``.
    """
    diff = recipe_mismatch(meta, reference, keys)
    if diff:
        raise BeitDataError(f"{what} come from different tokenizers or recipes: {diff}{hint}")


def read_consistent_footers(paths: Sequence[Location]) -> list[tuple[TokenMeta, int]]:
    """``(metadata, rows)`` of every file, after checking that they all share the first one's
    tokenizer and recipe. Files on object storage are read many at once."""
    footers = storage.map_concurrently(read_footer, paths)
    for path, (meta, _) in zip(paths[1:], footers[1:]):
        check_recipe(meta, footers[0][0], f"{path} and {paths[0]}")
    return footers
