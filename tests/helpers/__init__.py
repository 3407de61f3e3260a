"""What tests share besides fixtures: running the command, making tiny images, tars, shards and
token folders, and reading a run's log. Tests import from here, never from each other."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import traceback
from pathlib import Path

import numpy as np
from filelock import FileLock
from PIL import Image

REPO = Path(__file__).resolve().parents[2]

# The settings of a tiny pretrain run on the CPU: what most pretrain tests start from.
TINY = dict(model="beit_mim_tiny_patch16_224", batch_size=4, warmup_steps=2, lr=1e-3, log_every=1,
            device="cpu", progress=False, num_threads=1)


# -- what tests build once ------------------------------------------------------------------------

# What a cached fixture is made from (benchmarks: the random VQ-KD tokenizer of the tests).
SOURCES = ("beit_common", "beit_data", "beit_model", "pipelines", "benchmarks", "tests/helpers")


def _code_key() -> str:
    """A digest of the package's code and these helpers: a cached fixture is made again whenever
    any of it changes."""
    digest = hashlib.sha256()
    for package in SOURCES:
        for path in sorted((REPO / package).rglob("*.py")):
            digest.update(str(path.relative_to(REPO)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


CODE_KEY = _code_key()


def cached(name: str, build, *parts: object) -> Path:
    """``build(folder)`` run once for (``name``, the package's code, the file ``build`` is written
    in, ``parts``) and kept in
    ``$BEIT_DATA_TEST_CACHE`` (default ``$BEIT_DATA_CACHE/tests``, beside beit-data's own cache):
    later runs of this clone and the other xdist workers build nothing, they read the same folder.
    A build that fails leaves nothing behind; workers that race for it wait on one lock."""
    root = Path(os.environ.get("BEIT_DATA_TEST_CACHE")
                or Path(os.environ.get("BEIT_DATA_CACHE") or Path.home() / ".cache" / "beit-data") / "tests")
    root.mkdir(parents=True, exist_ok=True)
    # The clone's own path is part of the key: a fixture may hold paths into it (a list of the
    # embedded sample's files), so another clone builds its own.
    # So is the file that says how to build it (a fixture's steps, a test module's shapes).
    recipe = hashlib.sha256(Path(inspect.getsourcefile(build)).read_bytes()).hexdigest()
    key = hashlib.sha256(repr((name, CODE_KEY, recipe, str(REPO), parts)).encode()).hexdigest()[:16]
    folder = root / f"{name}-{key}"
    with FileLock(str(folder) + ".lock"):
        if not (folder / ".done").exists():
            shutil.rmtree(folder, ignore_errors=True)
            work = root / f".{folder.name}.partial"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            build(work)
            (work / ".done").write_text("")
            work.rename(folder)
            _prune(root, name, keep=folder)
    return folder


def _prune(root: Path, name: str, keep: Path, days: float = 2) -> None:
    """Drop the folders ``name`` was kept in for other code, once unused for ``days``."""
    import time

    for old in root.glob(f"{name}-*"):
        if old.is_dir() and old != keep and time.time() - old.stat().st_mtime > days * 86400:
            shutil.rmtree(old, ignore_errors=True)


# -- running the command ------------------------------------------------------------------------

def invoke(*args: str, env: dict | None = None):
    """Run ``beit-data ARGS`` in this process (click's ``CliRunner``): exit code, stdout and stderr
    as the command line gives them, without starting an interpreter."""
    from click.testing import CliRunner

    import cli

    return CliRunner(env=env).invoke(cli.main, [str(a) for a in args], prog_name="beit-data")


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``beit-data ARGS`` in this process and answer as a fresh interpreter would: the exit code,
    stdout, and stderr ending in the traceback of any exception the command let through (as Python
    prints it), so a test that asks for one-line errors still catches a traceback."""
    with contextlib.chdir(cwd or os.getcwd()):
        result = invoke(*args, env=env)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(["beit-data", *map(str, args)], result.exit_code, result.stdout, stderr)


def run_process(*args: str, cwd: Path | None = None, env: dict | None = None,
                timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``beit-data ARGS`` in a fresh interpreter, for tests about the process itself (its
    environment, signals, imports)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "cli", *map(str, args)], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (for a torchrun rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> set[int]:
    """Every process below ``pid``, from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


# -- images, tars and shards --------------------------------------------------------------------

def jpeg_bytes(size=(64, 48), seed=0, **save_kw) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", **save_kw)
    return buf.getvalue()


def image_bytes(i: int, fmt: str) -> bytes:
    """A small random image of ``fmt`` (JPEG, PNG, WEBP), different for each ``i``."""
    pixels = np.random.default_rng(i).integers(0, 256, (20 + i % 5, 24, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


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


def make_tree(root: Path, classes: int = 4, per_class: int = 6) -> Path:
    """An ImageFolder tree: ``root/c0/0.jpg`` ... with a different JPEG per file."""
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            (root / f"c{c}" / f"{i}.jpg").write_bytes(jpeg_bytes(size=(16, 16), seed=c * per_class + i))
    return root


def class_tree(root: Path, classes: dict[str, int]) -> Path:
    """An ImageFolder tree with ``classes[name]`` 32-pixel JPEGs in each class folder."""
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            (root / name / f"{i}.jpg").write_bytes(jpeg_bytes((32, 32), seed=hash(name) % 1000 + i))
    return root


HF_NAMES = ["tench", "goldfish", "shark"]


def hf_parquet(path, rows: int = 10, first: int = 0, corrupt: tuple = (), row_group_size: int = 3):
    """The Hugging Face layout: an image struct {bytes, path}, a label, ClassLabel names in the
    schema's metadata; JPEG, PNG and WebP bytes. Returns each row's (bytes, label)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    formats = ["JPEG", "PNG", "WEBP"]
    data = [(image_bytes(first + i, formats[i % 3]) if i not in corrupt else b"not an image", (first + i) % 3)
            for i in range(rows)]
    features = {"image": {"_type": "Image"}, "label": {"names": HF_NAMES, "_type": "ClassLabel"}}
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())],
                       metadata={"huggingface": json.dumps({"info": {"features": features}})})
    table = pa.table({"image": [{"bytes": b, "path": f"n{first + i}.img"} for i, (b, _) in enumerate(data)],
                      "label": [label for _, label in data]}, schema=schema)
    pq.write_table(table, path, row_group_size=row_group_size)
    return data


def samples(folder) -> list:
    """Every sample of the shards in ``folder``, in shard order."""
    from beit_data.shards import expand_shards, iter_samples

    return [s for shard in expand_shards(str(folder)) for s in iter_samples(shard)]


def write_shards(folder: Path, sizes: list[int], *, indexed=True, image_size: int = 16, seed: int = 0,
                 corrupt: tuple[int, ...] = ()) -> Path:
    """Shards ``s-000000.tar``... holding ``sizes[i]`` tiny JPEGs each, keys unique across shards.

    Args:
        indexed: Write a ``.idx`` beside every shard (True), none (False), or beside the shards
            whose index is in the collection.
        corrupt: Shards whose images are all undecodable (tokenize rejects them: empty token files).
    """
    from beit_common import Location
    from beit_data.shard_index import write_index

    folder.mkdir(parents=True, exist_ok=True)
    for s, size in enumerate(sizes):
        members = []
        for i in range(size):
            image = b"not a jpeg" if s in corrupt else jpeg_bytes((image_size, image_size), seed=seed + 1000 * s + i)
            members += [(f"k{s:04d}{i:03d}.jpg", image), (f"k{s:04d}{i:03d}.cls", str(i % 3).encode())]
        shard = write_tar(folder / f"s-{s:06d}.tar", members)
        if size and (indexed is True or (indexed is not False and s in indexed)):
            write_index(Location(shard))
    return folder


def reordered_copy(shard, out, *, index: bool):
    """The same samples in reverse order, with the same tar headers: the same size, other offsets."""
    from beit_common import Location
    from beit_data.shard_index import write_index

    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    keys = sorted({m.name.split(".")[0] for m, _ in members}, reverse=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key in keys:
            for info, data in members:
                if info.name.split(".")[0] == key:
                    tar.addfile(info, io.BytesIO(data))
    with open(out, "ab") as f:  # zero blocks after the end of the archive are still a valid tar
        f.write(b"\0" * (shard.stat().st_size - out.stat().st_size))
    assert out.stat().st_size == shard.stat().st_size
    if index:
        write_index(Location(out))
    return out


# -- tokenizers, token folders and runs ---------------------------------------------------------

DEMO = REPO / "scripts" / "demo.sh"


def demo_commands(out: Path, *names: str) -> list[list[str]]:
    """The ``beit-data`` commands of ``scripts/demo.sh`` named ``names`` (``sample``, ``train-dvae``...),
    as written there (continued lines joined), with its output folder ``$out`` the folder ``out``."""
    import shlex

    commands = []
    for line in DEMO.read_text().replace("\\\n", " ").splitlines():
        if line.startswith("beit-data "):
            words = shlex.split(line.replace('"$out', f'"{out}'), comments=True)[1:]
            if words[0] in names:
                commands.append(words)
    return commands


def run_commands(commands: list[list[str]]) -> None:
    """Each of ``commands`` through ``invoke``; the first that fails stops the rest, with its output."""
    for args in commands:
        done = invoke(*args)
        assert done.exit_code == 0, (args, done.output)


def cached_tokens(name: str, shards: Path, tokenizer: Path, views: int) -> Path:
    """``shards`` tokenized by ``tokenizer``, ``views`` views an image, built once (``cached``)."""
    from pipelines.tokenize_shards import TokenizeConfig, run_tokenize

    def build(folder: Path) -> None:
        run_tokenize(TokenizeConfig(shards=str(shards), tokenizer=str(tokenizer), out=str(folder / "t"), views=views,
                                    batch_size=8, device="cpu", progress=False))

    return cached(name, build, shards, tokenizer) / "t"


def tokenize_folder(shards: Path, out: Path, tokenizer: Path, views: int = 2) -> Path:
    """Token files for ``shards``: the tiny tokenizer, every image kept however small."""
    from pipelines.tokenize_shards import TokenizeConfig, run_tokenize

    run_tokenize(TokenizeConfig(shards=str(shards), tokenizer=str(tokenizer), out=str(out), views=views,
                                batch_size=32, min_size=0, device="cpu", progress=False))
    return out


def __getattr__(name: str):
    """``SMALL``, a small VQ-KD tokenizer's config (2 blocks, 512 codes), made when first asked
    for: importing the helpers (as every xdist worker and the controller do) loads no torch."""
    if name == "SMALL":
        from beit_model.vqkd import VQKDConfig

        return VQKDConfig(embed_dim=128, depth=2, num_heads=2, vocab_size=512, code_dim=8)
    raise AttributeError(name)


def save_released(path, tokenizer, *, key="model"):
    """``tokenizer`` saved in the layout of BEiT v2's released VQ-KD checkpoints."""
    import torch

    from benchmarks.random_vqkd import released_layout

    ckpt = released_layout(tokenizer)
    ckpt["args"] = argparse.Namespace(model="vqkd_encoder_base_decoder_3x768x12_clip", codebook_n_emd=8192)
    if key != "model":
        ckpt[key] = ckpt.pop("model")
    torch.save(ckpt, path)
    return path


def records(run) -> list[dict]:
    """The rows of a run's ``log.jsonl``."""
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def losses(run) -> list[float]:
    """The training losses a run logged, step by step."""
    return [r["loss"] for r in records(run) if "loss" in r]


def evaluate_untrained(tokens, val_shards, val_tokens, count: int) -> dict:
    """The held-out figures of the model a run with seed 0 starts from, in this one process."""
    import torch

    from beit_common import Location
    from beit_data.holdout import load_holdout
    from beit_data.tokens import read_meta, token_files
    from pipelines.evaluation import evaluate
    from pipelines.training import build_model

    meta = read_meta(token_files(Location(tokens))[0])
    held = load_holdout(str(val_shards), Location(val_tokens), count=count, seed=0, meta=meta, image_size=224,
                        num_masked=75)
    torch.manual_seed(0)
    model = build_model("beit_mim_tiny_patch16_224", meta.tokenizer.vocab, drop_path=0.1, layer_scale=0.1)
    return evaluate(model, held, max_masked=75, device=torch.device("cpu"))


def online_stream(shards, tokenizer_path, batch_size=3, device="cpu"):
    """A training stream with online targets over ``shards``, and its view recipe."""
    from beit_data.stream import StreamConfig, TrainStream
    from beit_model.tokenizer import load_tokenizer
    from pipelines.recipes import view_recipe

    cfg = StreamConfig(shards=str(shards), targets="online", tokenizer=str(tokenizer_path), batch_size=batch_size,
                       num_threads=1)
    recipe = view_recipe("beit", views=1, seed=0)
    return TrainStream(cfg, tokenizer=load_tokenizer(tokenizer_path), recipe=recipe, device=device), recipe
