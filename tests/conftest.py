"""Fixtures that build tiny shards, tokenizers and token files in temporary folders."""

from __future__ import annotations

import os

# MKL picks code paths by memory alignment unless told not to, which moves the last bits of a
# float32 result between otherwise identical runs. Exact-resume tests compare losses bitwise.
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")

import io  # noqa: E402
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from PIL import Image

from beit_data.sample import write_sample_list
from pipelines.shards import ShardsConfig, run_shards

REPO = Path(__file__).resolve().parents[1]

# Property tests explore new shapes on every local run; CI (.ci/run) replays a fixed set.
settings.register_profile("ci", derandomize=True, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``beit-data ARGS`` in a fresh interpreter, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], cwd=cwd or REPO, env=full_env,
        capture_output=True, text=True, timeout=900,
    )


def invoke(*args: str):
    """Run ``beit-data ARGS`` in this process (click's ``CliRunner``): exit code, stdout and stderr
    as the command line gives them, without starting an interpreter."""
    from click.testing import CliRunner

    import cli

    return CliRunner().invoke(cli.main, [str(a) for a in args], prog_name="beit-data")


def jpeg_bytes(size=(64, 48), seed=0, **save_kw) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", **save_kw)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory) -> Path:
    """The embedded photographs as two shards (8 + 6 samples) with .idx files."""
    out = tmp_path_factory.mktemp("sample_shards")
    listing = write_sample_list(out / "list.txt")
    run_shards(ShardsConfig(sources=[listing], out=out / "shards", maxcount=8, prefix="sample",
                            progress=False))
    return out / "shards"


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """An untrained tiny dVAE checkpoint: deterministic tokens that depend on the pixels."""
    import torch

    from beit_model.dvae import CONFIGS, save_checkpoint

    cfg = CONFIGS["tiny"]
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tokenizer") / "tiny.pt"
    save_checkpoint(path, cfg, *cfg.build())
    return path


@pytest.fixture(scope="session")
def sample_tokens(sample_shards, tiny_tokenizer, tmp_path_factory) -> Path:
    """The sample shards tokenized with the tiny tokenizer, 4 views per image."""
    from pipelines.tokenize_shards import TokenizeConfig, run_tokenize

    out = tmp_path_factory.mktemp("tokens")
    run_tokenize(TokenizeConfig(shards=str(sample_shards), tokenizer=str(tiny_tokenizer), out=str(out), views=4,
                                batch_size=8, device="cpu", progress=False))
    return out


@pytest.fixture(scope="session")
def trained_tokenizer(sample_shards, tmp_path_factory) -> Path:
    """The tiny dVAE trained on the sample for 150 steps (half of `make demo`'s 300: about a minute on
    two cores), enough for its tokens to carry the content (tests/test_pretrain.py's learning test)."""
    from pipelines.train_dvae import TrainDVAEConfig, run_train_dvae

    out = tmp_path_factory.mktemp("trained") / "dvae.pt"
    run_train_dvae(TrainDVAEConfig(shards=str(sample_shards), out=str(out), steps=150, batch_size=16, device="cpu",
                                   progress=False))
    return out


def class_image(label: int, seed: int, size: int = 128) -> Image.Image:
    """A picture of class ``label`` (0: red stripes, 1: green dots, 2: blue checks), varied by ``seed``."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    period = int(rng.integers(10, 20))
    pattern = [(y // (period // 2)) % 2, ((x % period - period / 2) ** 2 + (y % period - period / 2) ** 2
                                          < (period / 3) ** 2), ((x // period + y // period) % 2)][label]
    colour = np.zeros(3)
    colour[label] = rng.uniform(150, 255)
    pixels = pattern[..., None] * colour + rng.normal(40, 15, (size, size, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="session")
def labeled_shards(tmp_path_factory) -> Path:
    """Labeled shards of three visibly different classes: ``train/`` (10 a class) and ``val/`` (6 a class),
    each written from an ImageFolder tree, so their samples carry ``.cls`` members."""
    root = tmp_path_factory.mktemp("labeled")
    for part, count, offset in (("train", 10, 0), ("val", 6, 1000)):
        for label, name in enumerate(("red_stripes", "green_dots", "blue_checks")):
            folder = root / "images" / part / name
            folder.mkdir(parents=True)
            for i in range(count):
                class_image(label, offset + 100 * label + i).save(folder / f"{i}.jpg", quality=90)
        run_shards(ShardsConfig(sources=[root / "images" / part], out=root / part, maxcount=64, prefix=part,
                                progress=False))
    return root


@pytest.fixture(scope="session")
def labeled_val_tokens(labeled_shards, tiny_tokenizer, tmp_path_factory) -> Path:
    """The labeled ``val/`` shards tokenized with the tiny tokenizer, 2 views per image: a held-out set."""
    from pipelines.tokenize_shards import TokenizeConfig, run_tokenize

    out = tmp_path_factory.mktemp("val_tokens")
    run_tokenize(TokenizeConfig(shards=str(labeled_shards / "val"), tokenizer=str(tiny_tokenizer), out=str(out),
                                views=2, batch_size=8, device="cpu", progress=False))
    return out


def write_shards(folder: Path, sizes: list[int], *, indexed=True, image_size: int = 16, seed: int = 0,
                 corrupt: tuple[int, ...] = ()) -> Path:
    """Shards ``s-000000.tar``... holding ``sizes[i]`` tiny JPEGs each, keys unique across shards.

    Args:
        indexed: Write a ``.idx`` beside every shard (True), none (False), or beside the shards
            whose index is in the collection.
        corrupt: Shards whose images are all undecodable (tokenize rejects them: empty token files).
    """
    from beit_data.shard_index import write_index

    folder.mkdir(parents=True, exist_ok=True)
    for s, size in enumerate(sizes):
        members = []
        for i in range(size):
            image = b"not a jpeg" if s in corrupt else jpeg_bytes((image_size, image_size), seed=seed + 1000 * s + i)
            members += [(f"k{s:04d}{i:03d}.jpg", image), (f"k{s:04d}{i:03d}.cls", str(i % 3).encode())]
        shard = write_tar(folder / f"s-{s:06d}.tar", members)
        if size and (indexed is True or (indexed is not False and s in indexed)):
            write_index(shard)
    return folder


def tokenize_folder(shards: Path, out: Path, tokenizer: Path, views: int = 2) -> Path:
    """Token files for ``shards``: the tiny tokenizer, every image kept however small."""
    from pipelines.tokenize_shards import TokenizeConfig, run_tokenize

    run_tokenize(TokenizeConfig(shards=str(shards), tokenizer=str(tokenizer), out=str(out), views=views,
                                batch_size=32, min_size=0, device="cpu", progress=False))
    return out
