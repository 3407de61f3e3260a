"""`make demo` learns: the pretrain of scripts/demo.sh, run with the flags written there, predicts
the masked tokens of the 2 held-out photographs better than always predicting the most common code.

A system test because it is the demo's own training: its shards and tokenizer are the session's
``demo_tokenizer`` (built once, also the other tests' trained tokenizer), its tokenize and pretrain
steps about a minute on one core.
"""

import json
import shutil

import pytest
from helpers import DEMO, cached, demo_commands, run_commands


@pytest.fixture(scope="module")
def demo_run(demo_tokenizer):
    """scripts/demo.sh's ``tokenize`` and ``pretrain`` steps, on the demo's shards and tokenizer."""
    def build(folder):
        for name in ("shards", "holdout"):
            shutil.copytree(demo_tokenizer / name, folder / name)
        shutil.copy(demo_tokenizer / "dvae_tiny.pt", folder / "dvae_tiny.pt")
        run_commands(demo_commands(folder, "tokenize", "pretrain"))

    return cached("demo_run", build, DEMO.read_text(), demo_tokenizer)


@pytest.mark.xdist_group("trained_tokenizer")  # one worker builds the demo's tokenizer while the other goes on
def test_the_demo_recipe_beats_the_most_common_code_on_the_held_out_photographs(demo_run):
    pretrain = demo_commands(demo_run, "pretrain")
    assert len(pretrain) == 1 and "--val-shards" in pretrain[0]
    steps = int(pretrain[0][pretrain[0].index("--steps") + 1])
    records = [json.loads(line) for line in (demo_run / "run" / "log.jsonl").read_text().splitlines()]
    val = [r for r in records if r.get("event") == "val"]
    assert val[-1]["step"] == steps and val[-1]["val_images"] == 2
    last = val[-1]
    print(f"held-out top-1 {last['val_top1']:.3f}, the most common code {last['val_majority']:.3f}")
    assert last["val_top1"] > last["val_majority"] + 0.1
