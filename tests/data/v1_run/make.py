"""Write the tiny pretrain run that ``tests/cli/test_old_runs.py`` resumes: run once, in a checkout
of the commit named in README.md, from that checkout's root (``PYTHONPATH=.``), with this
folder as the only argument. It only uses the product's own code, so what it leaves is what
that commit writes for a user:

- ``images/`` is not kept; ``shards/`` (2 shards of 8) and ``val/`` (1 held-out shard of 8) come
  from ``run_shards`` over an ImageFolder tree of two classes of generated 112-pixel JPEGs;
- ``tokenizer.pt``: the untrained tiny dVAE (seed 0); ``tokens/`` and ``val_tokens/``: its
  tokens, 2 views per image;
- ``run/``: a 4-step ``beit_mim_tiny_patch16_224`` run on the CPU with held-out figures and a
  k-NN probe every 2 steps, stopped after 2 steps (TensorBoard files dropped: resuming never
  reads them);
- ``expected.json``: the settings, and the losses and log lines (less the wall clock) of the
  same run made without a stop; what ``inspect --json`` says of ``tokens/``, and the pixels
  of the view ``inspect --render`` draws with the tokenizer's reconstruction.

Every path is relative to this folder, so the run resumes wherever the folder is copied.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("MKL_CBWR", "AUTO")  # as tests/conftest.py: the same float32 sums in every process

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

SETTINGS = dict(shards="shards", tokens="tokens", model="beit_mim_tiny_patch16_224", batch_size=4, steps=4,
                warmup_steps=2, lr=1e-3, log_every=1, checkpoint_every=100, device="cpu", progress=False,
                num_threads=1, val_shards="val", val_tokens="val_tokens", val_every=2, val_images=8,
                probe_every=2, probe_train="shards", probe_val="val")

RENDER = "000000000"  # the key ``inspect --render`` draws, with the tokenizer's reconstruction
CLOCK = ("time", "img_s")  # what a log line holds of the wall clock, which no rerun repeats


def picture(label: int, seed: int, size: int = 112) -> Image.Image:
    """Class 0: red stripes, class 1: green dots; period, tint and noise drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    period = int(rng.integers(10, 20))
    pattern = (y // (period // 2)) % 2 if label == 0 else \
        (x % period - period / 2) ** 2 + (y % period - period / 2) ** 2 < (period / 3) ** 2
    colour = np.zeros(3)
    colour[label] = rng.uniform(150, 255)
    pixels = pattern[..., None] * colour + rng.normal(40, 15, (size, size, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def pixels_digest(png: str) -> str:
    """The SHA-256 of a PNG's pixels (not of its bytes, which the PNG encoder may vary)."""
    return hashlib.sha256(np.asarray(Image.open(png).convert("RGB")).tobytes()).hexdigest()


def main(root: Path) -> None:
    import torch

    from beit_model.dvae import CONFIGS, save_checkpoint
    from pipelines.config import InspectConfig, ShardsConfig, TokenizeConfig
    from pipelines.inspect_tokens import run_inspect
    from pipelines.pretrain import PretrainConfig, run_pretrain
    from pipelines.shards import run_shards
    from pipelines.tokenize_shards import run_tokenize

    root.mkdir(parents=True, exist_ok=True)
    os.chdir(root)
    for label, name in enumerate(("red_stripes", "green_dots")):
        Path("images", name).mkdir(parents=True)
        for i in range(12):
            picture(label, 100 * label + i).save(Path("images", name, f"{i}.jpg"), quality=85)
    run_shards(ShardsConfig(sources=[Path("images")], out=Path("shards"), maxcount=8, prefix="train",
                            holdout_per_class=4, holdout_out=Path("val"), progress=False))
    shutil.rmtree("images")
    cfg = CONFIGS["tiny"]
    torch.manual_seed(0)
    save_checkpoint("tokenizer.pt", cfg, *cfg.build())
    for shards, tokens in (("shards", "tokens"), ("val", "val_tokens")):
        run_tokenize(TokenizeConfig(shards=shards, tokenizer="tokenizer.pt", out=tokens, views=2, batch_size=8,
                                    device="cpu", num_threads=1, progress=False))
    summary = json.loads(json.dumps(run_inspect(InspectConfig(tokens="tokens", shards="shards"))))
    run_inspect(InspectConfig(tokens="tokens", shards="shards", render=RENDER, tokenizer="tokenizer.pt",
                              out="view.png"))
    picture_digest = pixels_digest("view.png")
    os.remove("view.png")
    run_pretrain(PretrainConfig.from_flat(out="straight", **SETTINGS))
    run_pretrain(PretrainConfig.from_flat(out="run", stop_after=2, **SETTINGS))
    shutil.rmtree("run/tb", ignore_errors=True)
    log = [json.loads(line) for line in Path("straight/log.jsonl").read_text().splitlines()]
    expected = {"settings": SETTINGS, "losses": [r["loss"] for r in log if r["event"] == "train"],
                "log": [{k: v for k, v in r.items() if k not in CLOCK} for r in log],
                "inspect": summary, "render": {"key": RENDER, "pixels_sha256": picture_digest}}
    Path("expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    shutil.rmtree("straight")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
