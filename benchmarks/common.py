"""Shared set-up for the benchmarks: shards of the embedded photographs, repeated."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from beit_data.sample import sample_images
from beit_model.dvae import CONFIGS, save_checkpoint
from pipelines.shards import ShardsConfig, run_shards


def make_shards(out: Path, images: int, per_shard: int = 512) -> Path:
    """``images`` samples cycling through the embedded photographs, ``per_shard`` per shard."""
    photos = sample_images()
    listing = out / "list.txt"
    listing.write_text("".join(f"{photos[i % len(photos)]}\n" for i in range(images)))
    run_shards(ShardsConfig(sources=[listing], out=out / "shards", maxcount=per_shard, prefix="bench",
                            progress=False))
    return out / "shards"


def make_tokenizer(path: Path, config: str = "dalle") -> Path:
    """A DALL-E-architecture tokenizer with random weights: the same cost as OpenAI's."""
    cfg = CONFIGS[config]
    torch.manual_seed(0)
    save_checkpoint(path, cfg, *cfg.build())
    return path


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)
