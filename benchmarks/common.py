"""Shared set-up for the benchmarks: shards of the embedded photographs, repeated."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from beit_data.sample import sample_images
from beit_model.dvae import CONFIGS, save_checkpoint
from pipelines.shards import ShardsConfig, run_shards
from pipelines.tokenize_shards import TokenizeConfig, run_tokenize


def imagenet_like(out: Path) -> list[Path]:
    """The embedded photographs as ImageNet's typical JPEG: 4:3, 500x375, quality 90, about 110 KB.

    The photographs are smoother than ImageNet's, so film grain (luma sigma 24, chroma 8) is
    added until the files reach ImageNet's size: JPEG decoding costs follow the coded bytes.
    """
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, photo in enumerate(sample_images()):
        with Image.open(photo) as im:
            im = im.convert("RGB")
            w, h = im.size
            cw, ch = min(w, h * 4 // 3), min(h, w * 3 // 4)
            box = ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)
            pixels = np.asarray(im.crop(box).resize((500, 375), Image.BICUBIC), np.float32)
        rng = np.random.default_rng(i)
        pixels = pixels + rng.normal(0, 24, (375, 500, 1)) + rng.normal(0, 8, (375, 500, 3))
        path = out / f"{photo.stem}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def make_shards(out: Path, images: int, per_shard: int = 512, *, imagenet_like_images: bool = False) -> Path:
    """``images`` samples cycling through the embedded photographs, ``per_shard`` per shard. Each is a
    copy of its own: ``shards`` refuses a file listed twice."""
    import shutil

    photos = imagenet_like(out / "imagenet_like") if imagenet_like_images else sample_images()
    copies = out / "copies"
    copies.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(images):
        photo = Path(photos[i % len(photos)])
        names.append(copies / f"{i:07d}{photo.suffix}")
        shutil.copyfile(photo, names[-1])
    listing = out / "list.txt"
    listing.write_text("".join(f"{name}\n" for name in names))
    run_shards(ShardsConfig(sources=[listing], out=out / "shards", maxcount=per_shard, prefix="bench",
                            progress=False))
    return out / "shards"


TOKENIZER_CONFIGS = ("tiny", "dalle", "vqkd")


def make_tokenizer(path: Path, config: str = "dalle") -> Path:
    """A tokenizer with random weights and the cost of the real one: ``dalle`` (OpenAI's
    architecture), ``vqkd`` (BEiT v2's ViT-B/16 VQ-KD, in the released file layout) or ``tiny``."""
    if config == "vqkd":
        from benchmarks.random_vqkd import random_tokenizer, released_layout

        torch.save(released_layout(random_tokenizer()), path)
        return path
    cfg = CONFIGS[config]
    torch.manual_seed(0)
    save_checkpoint(path, cfg, *cfg.build())
    return path


def make_tokens(out: Path, images: int, *, per_shard: int = 512, tokenizer_config: str = "dalle", views: int = 2,
                device: str = "cpu", imagenet_like_images: bool = False) -> tuple[Path, Path, Path]:
    """Shards, a tokenizer and the shards tokenized: the paths (shards, tokenizer, tokens)."""
    shards = make_shards(out, images, per_shard, imagenet_like_images=imagenet_like_images)
    tokenizer = make_tokenizer(out / "tok.pt", tokenizer_config)
    run_tokenize(TokenizeConfig(shards=str(shards), tokenizer=str(tokenizer), out=str(out / "tokens"), views=views,
                                batch_size=32, device=device, progress=False))
    return shards, tokenizer, out / "tokens"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)
