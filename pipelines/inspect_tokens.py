"""``beit-data inspect``: summaries, validation, and pictures of token files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from beit_common import BeitDataError, Location, output_file, write_atomic
from beit_data.shard_index import read_images
from beit_data.shards import expand_shards
from beit_data.summary import summarise
from beit_data.tokens import TokenMeta, read_meta, read_table, token_files
from beit_data.views import row_view
from pipelines.config import InspectConfig

__all__ = ["InspectConfig", "run_inspect", "format_summary", "render_view", "render_histogram"]


def _tokenizer_name(t: dict) -> str:
    kind = t.get("kind", "dvae")
    return kind if t["name"] == kind else f"{kind} ({t['name']})"


def format_summary(s: dict) -> str:
    t, v, cb = s["tokenizer"], s["views"], s["codebook"]
    lines = [
        f"token files   {s['files']} in {s['folder']} ({s['readable_files']} readable)",
        f"rows          {s['rows']:,}  images {s['images']:,}  views/image {s['views_per_image']} "
        f"(recipe {s['recipe_views']})",
        f"tokenizer     {_tokenizer_name(t)}  fingerprint {t['fingerprint'][:16]}  vocab {t['vocab']}  "
        f"input {t['input_size']}  grid {t['grid']}x{t['grid']}",
        f"views         recipe {v.get('recipe', 'beit')}  filter {v.get('interp', 'lanczos')}  seed {v['seed']}  "
        f"scale {v['scale']}  ratio [{v['ratio'][0]:.3f}, {v['ratio'][1]:.3f}]  "
        f"flip {v['flip']}  jitter {v['jitter']}  target jitter {'yes' if v['target_jitter'] else 'no'}",
        f"codebook      {cb['codes_used']}/{cb['vocab']} codes used  perplexity {cb['perplexity']}  "
        f"dead {cb['dead_codes']}",
        "top codes     " + "  ".join(f"{c['code']}:{100 * c['share']:.1f}%" for c in cb["top_codes"][:8]),
        f"rejects       {s['rejects']['total']}"
        + "".join(f"\n  {n:6d}  {reason}" for reason, n in s["rejects"]["by_reason"].items()),
    ]
    if "coverage" in s:
        c = s["coverage"]
        lines.append(f"coverage      {c['shard_keys']:,} keys in shards  {c['keys_missing_from_parquet']} missing "
                     f"from Parquet  {c['rejected_keys']} rejected  {c['keys_not_in_shards']} not in shards  "
                     f"{len(c['shards_without_token_file'])} shards without a token file  "
                     f"{len(c['unusable_shards'])} unusable shards")
        for name, examples in (("missing", c["missing_examples"]), ("not in shards", c["not_in_shards_examples"])):
            if examples:
                lines.append(f"  {name}: {', '.join(examples[:10])}")
    for warning in s.get("warnings", []):
        lines.append(f"WARNING       {warning}")
    for err in s["errors"]:
        lines.append(f"ERROR         {err}")
    return "\n".join(lines)


def _find_row(files: list[Location], key: str, view: int) -> tuple[dict, TokenMeta]:
    for path in files:
        try:
            table = read_table(path, filters=[("key", "=", key)])
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise BeitDataError(f"{path} is not a readable Parquet file: {str(exc).splitlines()[0][:200]}") from None
        if table.num_rows:
            rows = {r["view"]: r for r in table.to_pylist()}
            if view not in rows:
                raise BeitDataError(f"key {key} has views {sorted(rows)}, not {view}")
            return rows[view], read_meta(path)
    raise BeitDataError(f"key {key} is not in any token file")


def _image_bytes(shards: str | None, source: str, key: str) -> bytes:
    """The image of ``key``, looked up first in the shard its token file names."""
    if shards is None:
        raise BeitDataError(f"`render` needs `shards` to find the image of key {key} (source shard {source})")
    candidates = expand_shards(shards)
    for shard in [s for s in candidates if s.name == source] or candidates:
        found = read_images([(shard, key)])  # by its offset in the shard's index, not a scan of the tar
        if found:
            return found[shard, key]
    raise BeitDataError(f"key {key} was not found in the shards")


def render_view(cfg: InspectConfig) -> Path | str:
    """A four-panel PNG: the image with the crop box, the tokenizer's view, the tokens, the reconstruction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from beit_data.dali_views import DaliViews, ViewSpec

    files = token_files(cfg.tokens)
    row, meta = _find_row(files, cfg.render, cfg.view)
    data = _image_bytes(cfg.shards, meta.source, cfg.render)
    size, grid = meta.tokenizer.input_size, meta.tokenizer.grid
    view = row_view(row)
    seen = DaliViews(ViewSpec(views=1, size=size, interp=meta.views.interp, jitter=meta.views.target_jitter),
                     batch_size=1)([data], [[view]])[0, 0].permute(1, 2, 0).numpy()  # (S, S, 3) in [0,1]
    tokens = np.array(row["tokens"]).reshape(grid, grid)
    panels = 4 if cfg.tokenizer else 3
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.4), dpi=100)
    image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    axes[0].imshow(image)
    axes[0].add_patch(plt.Rectangle((view.x, view.y), view.w, view.h, fill=False, color="red", lw=2))
    axes[0].set_title(f"{cfg.render} view {cfg.view}" + (" (flipped)" if view.flip else ""), fontsize=9)
    axes[1].imshow(seen)
    axes[1].set_title(f"tokenizer input {size}px", fontsize=9)
    axes[2].imshow(tokens, cmap="tab20", interpolation="nearest")
    axes[2].set_title(f"token ids {grid}x{grid}", fontsize=9)
    if cfg.tokenizer:
        import torch

        from beit_model.tokenizer import load_tokenizer

        tok = load_tokenizer(cfg.tokenizer)
        if tok.fingerprint != meta.tokenizer.fingerprint:
            raise BeitDataError(f"{cfg.tokenizer} is not the tokenizer these tokens came from "
                                f"(fingerprint {tok.fingerprint[:12]} != {meta.tokenizer.fingerprint[:12]})")
        recon = tok.decode(torch.from_numpy(tokens)[None])[0].permute(1, 2, 0).numpy()
        axes[3].imshow(recon)
        axes[3].set_title("dVAE reconstruction", fontsize=9)
    for ax in axes:
        ax.set_xticks([]), ax.set_yticks([])
    out = output_file(cfg.out, "the picture")
    fig.tight_layout()
    write_atomic(out, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return out


def render_histogram(summary: dict, path: Location) -> Path | str:
    """Token frequencies from ``summary``, sorted by rank: as shares on a linear scale (where a
    dominant code shows as it is), then counts on a log scale; the dead codes, which never
    occur, are marked in red at the tail of both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cb = summary["codebook"]
    ranked = np.sort(np.array(cb["counts"]))[::-1]
    share = ranked / max(ranked.sum(), 1)
    used = int((ranked > 0).sum())
    fig, (linear, log) = plt.subplots(2, 1, figsize=(8, 5.5), dpi=100, sharex=True)
    linear.bar(np.arange(len(ranked)), 100 * share, width=1.0, color="tab:blue")
    linear.set_ylabel("share of tokens (%)")
    log.bar(np.arange(len(ranked)), np.maximum(ranked, 0.8), width=1.0, color="tab:blue")
    log.set_yscale("log")
    log.set_ylabel("count (log)")
    log.set_xlabel("code rank")
    if used < len(ranked):
        for ax in (linear, log):
            ax.axvspan(used - 0.5, len(ranked) - 0.5, color="tab:red", alpha=0.25, lw=0)
        linear.text(used + (len(ranked) - used) / 2, linear.get_ylim()[1] * 0.9, f"{len(ranked) - used:,} dead",
                    ha="center", va="top", color="tab:red", fontsize=9)
    linear.set_title(f"{cb['codes_used']}/{cb['vocab']} codes used, {cb['dead_codes']} dead, perplexity "
                     f"{cb['perplexity']}", fontsize=10)
    fig.tight_layout()
    path = output_file(path, "the histogram")
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def run_inspect(cfg: InspectConfig) -> dict:
    """The summary (with ``errors``); renders the pictures that were asked for."""
    if cfg.render is not None:
        render_view(cfg)
        return {"rendered": cfg.out}
    summary = summarise(cfg.tokens, cfg.shards, max_share=cfg.max_code_share, max_dead=cfg.max_dead_codes)
    if cfg.histogram:
        render_histogram(summary, cfg.histogram)
    return summary
