"""Shared set-up for the benchmarks: shards of the embedded photographs, repeated."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from beit_data.sample import sample_images
from beit_model.dvae import CONFIGS, save_checkpoint
from pipelines.shards import ShardsConfig, run_shards
from pipelines.tokenize_shards import TokenizeConfig, run_tokenize


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


def make_tokens(out: Path, images: int, *, per_shard: int = 512, tokenizer_config: str = "dalle", views: int = 2,
                device: str = "cpu") -> tuple[Path, Path, Path]:
    """Shards, a tokenizer and the shards tokenized: the paths (shards, tokenizer, tokens)."""
    shards = make_shards(out, images, per_shard)
    tokenizer = make_tokenizer(out / "tok.pt", tokenizer_config)
    run_tokenize(TokenizeConfig(shards=str(shards), tokenizer=str(tokenizer), out=str(out / "tokens"), views=views,
                                batch_size=32, device=device, progress=False))
    return shards, tokenizer, out / "tokens"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)
