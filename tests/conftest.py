"""Fixtures that build tiny shards, tokenizers and token files, and the kinds of test.

A test's kind is its folder: ``unit/`` (pure functions and formats), ``cli/`` (commands and stages in
this process) and ``system/`` (processes, servers, signals, torchrun, fake Slurm); each gets the
marker of its name, so ``pytest -m "unit or cli"`` runs the fast kinds. The fixtures that cost
seconds (a trained tokenizer, token folders) are built once and kept between runs under a key of
everything they are made from (``helpers.cached``).
"""

from __future__ import annotations

import os

# MKL's reproducible mode, as the command sets it (cli.py): exact-resume tests compare losses
# bitwise between this process and the commands'.
os.environ.setdefault("MKL_CBWR", "AUTO")
# Under pytest-xdist each worker takes one core: torch's own threads on top of the workers would
# ask the cores for twice what they have. Set before torch loads, which reads it once.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from helpers import cached, cached_tokens, class_image  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests explore new shapes on every local run; CI (.ci/run) replays a fixed set.
settings.register_profile("ci", derandomize=True, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

KINDS = ("unit", "cli", "system")


def pytest_collection_modifyitems(config, items):
    import torch

    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        kind = Path(str(item.fspath)).parent.name
        if kind in KINDS:
            item.add_marker(getattr(pytest.mark, kind))
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)


def pytest_configure(config):
    """Tests that share a costly fixture run in one worker (``xdist_group`` under ``--dist
    loadgroup``). pytest 9.2 names tests in a field pytest-xdist 3.8 does not set, so every group
    would be ignored without a word and each worker would build those fixtures again."""
    if config.getoption("dist", "no") == "loadgroup" and tuple(map(int, pytest.__version__.split(".")[:2])) >= (9, 2):
        raise pytest.UsageError(f"pytest {pytest.__version__} runs the tests of an xdist_group on any worker: "
                                "install the pytest of pyproject.toml (pip install -e '.[dev]')")


@pytest.fixture(autouse=True)
def _same_torch_threads():
    """A test that resumes a run may set torch's thread count to the run's; the next test in this
    worker starts from the count it had."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _sample_shards(folder: Path) -> None:
    from beit_common import Location
    from beit_data.sample import write_sample_list
    from pipelines.shards import ShardsConfig, run_shards

    listing = write_sample_list(Location(folder / "list.txt"))
    run_shards(ShardsConfig(min_size=0,
                            sources=[listing], out=folder / "shards", maxcount=8, prefix="sample", progress=False))


@pytest.fixture(scope="session")
def sample_shards() -> Path:
    """The embedded photographs as two shards (8 + 6 samples) with .idx files."""
    return cached("sample_shards", _sample_shards) / "shards"


def _tiny_tokenizer(folder: Path) -> None:
    import torch

    from beit_model.dvae import CONFIGS, save_checkpoint

    cfg = CONFIGS["tiny"]
    torch.manual_seed(0)
    save_checkpoint(folder / "tiny.pt", cfg, *cfg.build())


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Path:
    """An untrained tiny dVAE checkpoint: deterministic tokens that depend on the pixels."""
    return cached("tiny_tokenizer", _tiny_tokenizer) / "tiny.pt"


@pytest.fixture(scope="session")
def sample_tokens(sample_shards, tiny_tokenizer) -> Path:
    """The sample shards tokenized with the tiny tokenizer, 4 views per image."""
    return cached_tokens("sample_tokens", sample_shards, tiny_tokenizer, views=4)


@pytest.fixture(scope="session")
def two_step_run(sample_shards, sample_tokens) -> Path:
    """A tiny pretrain run of two steps on the sample: what export and probe tests read (never write)."""
    from helpers import TINY

    from pipelines.pretrain import PretrainConfig, run_pretrain

    def build(folder: Path) -> None:
        run_pretrain(PretrainConfig.from_flat(shards=str(sample_shards), tokens=str(sample_tokens),
                                              out=str(folder / "run"), steps=2, **TINY))

    return cached("two_step_run", build, sample_shards, sample_tokens) / "run"


@pytest.fixture(scope="session")
def demo_tokenizer() -> Path:
    """The folder of `make demo`'s first two steps, run as scripts/demo.sh writes them (``sample``:
    12 photographs to train on, 2 held out; ``train-dvae``: the tiny dVAE of 16 codes)."""
    from helpers import DEMO, demo_commands, run_commands

    return cached("demo_tokenizer", lambda folder: run_commands(demo_commands(folder, "sample", "train-dvae")),
                  DEMO.read_text())


@pytest.fixture(scope="session")
def trained_tokenizer(demo_tokenizer) -> Path:
    """`make demo`'s trained dVAE: enough for its tokens to carry the content (the learning test in
    tests/system/test_learning.py) and its reconstructions to show it (tests/system/test_demo.py)."""
    return demo_tokenizer / "dvae_tiny.pt"


def _labeled_shards(root: Path) -> None:
    from pipelines.shards import ShardsConfig, run_shards

    for part, count, offset in (("train", 10, 0), ("val", 6, 1000)):
        for label, name in enumerate(("red_stripes", "green_dots", "blue_checks")):
            folder = root / "images" / part / name
            folder.mkdir(parents=True)
            for i in range(count):
                class_image(label, offset + 100 * label + i).save(folder / f"{i}.jpg", quality=90)
        run_shards(ShardsConfig(min_size=0, sources=[root / "images" / part], out=root / part, maxcount=64, prefix=part,
                                progress=False))


@pytest.fixture(scope="session")
def labeled_shards() -> Path:
    """Labeled shards of three visibly different classes: ``train/`` (10 a class) and ``val/`` (6 a class),
    each written from an ImageFolder tree, so their samples carry ``.cls`` members."""
    return cached("labeled_shards", _labeled_shards)


@pytest.fixture(scope="session")
def labeled_val_tokens(labeled_shards, tiny_tokenizer) -> Path:
    """The labeled ``val/`` shards tokenized with the tiny tokenizer, 2 views per image: a held-out set."""
    from pipelines.tokenize_shards import TokenizeConfig, run_tokenize

    def build(folder: Path) -> None:
        run_tokenize(TokenizeConfig(shards=str(labeled_shards / "val"), tokenizer=str(tiny_tokenizer),
                                    out=str(folder / "t"), views=2, batch_size=8, device="cpu", progress=False))

    return cached("labeled_val_tokens", build, labeled_shards, tiny_tokenizer) / "t"
