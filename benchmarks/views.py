"""The views ablation: do V stored views per image train as well as a fresh view every epoch?

On the embedded photographs (10 to train on, 4 held out), a tiny dVAE is trained, then one token
folder is grown view by view (``tokenize --views V`` over fewer views computes only the views it
lacks) and, at each V, a tiny BEiT is pretrained for the same steps with the same seed. The
online arm (``pretrain --targets online``) trains the same model, order, masks and schedule on a
fresh view of every image each epoch, tokenized in the loop: the arms differ by their views
alone (every photograph is large enough for tokenize to keep it). Every arm is evaluated on the
same held-out views and masks (``--val-shards``, one stored view of each held-out photograph).

Per arm: the held-out masked-token loss and top-1 over the run, the share of the most common
held-out code (the top-1 of always predicting it), the k-NN probe of the final encoder, the
tokenize and pretrain wall times. The probe is an instance probe, the only labels real
photographs give here: crops of each of the 14 photographs form a class (6 crops vote, 3 are
scored; chance is 1/14), so it asks whether the encoder puts crops of one photograph together.
Prints one JSON object.

    python -m benchmarks.views [--views 1 2 5 10 20] [--no-online] [--steps 2000] [--batch-size 10] [--model M]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import emit


def val_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("event") == "val"]


def probe_sets(root: Path, crops: int = 9, held: int = 3, seed: int = 0) -> tuple[Path, Path]:
    """Labeled shards of crops of the photographs, one class per photograph: ``crops - held`` of
    each vote, ``held`` are scored."""
    from PIL import Image

    from beit_data.sample import sample_images
    from pipelines.shards import ShardsConfig, run_shards

    rng = np.random.default_rng(seed)
    folder = root / "probe-images"
    for photo in sample_images():
        (folder / photo.stem).mkdir(parents=True)
        with Image.open(photo) as im:
            im = im.convert("RGB")
            for i in range(crops):
                side = int(min(im.size) * rng.uniform(0.5, 0.8))
                x, y = (int(rng.integers(0, d - side + 1)) for d in im.size)
                im.crop((x, y, x + side, y + side)).save(folder / photo.stem / f"crop{i}.jpg", quality=95)
    run_shards(ShardsConfig(sources=[str(folder)], out=str(root / "probe-train"), holdout_per_class=held,
                            holdout_out=str(root / "probe-val"), shuffle=True, progress=False))
    return root / "probe-train", root / "probe-val"


def train_arm(args, root: Path, name: str, **data) -> dict:
    """Pretrain one arm and read its held-out figures and its probe."""
    from pipelines.config import ProbeConfig
    from pipelines.pretrain import PretrainConfig, run_pretrain
    from pipelines.probe import run_probe

    run = root / f"run-{name}"
    start = time.perf_counter()
    run_pretrain(PretrainConfig.from_flat(
        shards=str(root / "shards"), out=str(run), model=args.model, steps=args.steps, batch_size=args.batch_size,
        warmup_steps=args.steps // 20, lr=args.lr, drop_path=0.0, seed=args.seed, val_shards=str(root / "holdout"),
        val_tokens=str(root / "holdout_tokens"), val_every=args.val_every, val_images=args.holdout,
        log_every=args.val_every, checkpoint_every=args.steps, device=args.device, progress=False, **data))
    seconds = time.perf_counter() - start
    probe = run_probe(ProbeConfig(model=str(run), train_shards=str(root / "probe-train"),
                                  val_shards=str(root / "probe-val"), k=args.k, device=args.device, progress=False))
    val = val_rows(run)
    return {"arm": name, "val_steps": [r["step"] for r in val], "val_loss": [round(r["val_loss"], 4) for r in val],
            "val_top1": [round(r["val_top1"], 4) for r in val], "val_majority": round(val[-1]["val_majority"], 4),
            "final_val_loss": round(val[-1]["val_loss"], 4), "final_val_top1": round(val[-1]["val_top1"], 4),
            "best_val_loss": round(min(r["val_loss"] for r in val), 4),
            "knn_top1": round(probe["knn"]["top1"], 4), "pretrain_seconds": round(seconds, 1)}


def stored_arm(args, root: Path, views: int) -> dict:
    """Grow the token folder to ``views`` views (only the missing ones are computed), then train on it."""
    from pipelines.tokenize_shards import TokenizeConfig, run_tokenize

    start = time.perf_counter()
    run_tokenize(TokenizeConfig(shards=str(root / "shards"), tokenizer=str(root / "dvae.pt"), out=str(root / "tokens"),
                                views=views, device=args.device, progress=False))
    grown = time.perf_counter() - start
    return {"views": views, "tokenize_seconds": round(grown, 1), **train_arm(args, root, f"v{views}",
                                                                               tokens=str(root / "tokens"))}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--views", type=int, nargs="*", default=[1, 2, 5, 10, 20])
    p.add_argument("--no-online", dest="online", action="store_false", help="leave out the online arm")
    p.add_argument("--model", default="beit_mim_tiny_patch16_224")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--dvae-steps", type=int, default=300)
    p.add_argument("--holdout", type=int, default=4, help="photographs held out (of the 14)")
    p.add_argument("--k", type=int, default=10, help="the probe's neighbours")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="keep the shards, tokens and runs here")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    from beit_common import Location
    from pipelines.shards import write_sample
    from pipelines.tokenize_shards import TokenizeConfig, run_tokenize
    from pipelines.train_dvae import TrainDVAEConfig, run_train_dvae

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        for _ in write_sample(Location(root / "shards"), holdout=args.holdout,
                              holdout_out=Location(root / "holdout")):
            pass
        probe_sets(root)
        dvae = run_train_dvae(TrainDVAEConfig(shards=str(root / "shards"), out=str(root / "dvae.pt"),
                                              steps=args.dvae_steps, device=args.device, progress=False))
        run_tokenize(TokenizeConfig(shards=str(root / "holdout"), tokenizer=str(root / "dvae.pt"),
                                    out=str(root / "holdout_tokens"), views=1, device=args.device, progress=False))
        arms = [stored_arm(args, root, v) for v in sorted(args.views)]
        if args.online:
            arms.append({"views": "online", **train_arm(args, root, "online", targets="online",
                                                         tokenizer=str(root / "dvae.pt"))})
    images = 14 - args.holdout
    emit({"benchmark": "views", "device": args.device, "train_images": images, "held_out_images": args.holdout,
          "steps": args.steps, "batch_size": args.batch_size, "epochs": args.steps * args.batch_size // images,
          "model": args.model, "tokenizer": f"tiny dVAE, {args.dvae_steps} steps on the training photographs",
          "dvae_psnr": dvae["psnr"], "dvae_psnr_mean_colour": dvae["psnr_mean_colour"],
          "probe": "k-NN, one class per photograph: 6 crops of each vote, 3 are scored (chance 1/14)",
          "seconds": round(time.perf_counter() - start, 1), "arms": arms})


if __name__ == "__main__":
    main()
