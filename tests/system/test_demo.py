"""`make demo` learns: the pretrain of scripts/demo.sh, run with the flags written there, predicts
the masked tokens of the 2 held-out photographs better than always predicting the most common code;
and its tokenizer draws the cat back from its tokens.

A system test because it is the demo's own training: its shards and tokenizer are the session's
``demo_tokenizer`` (built once, also the other tests' trained tokenizer), its tokenize and pretrain
steps about a minute on one core.
"""

import json
import shutil

import numpy as np
import pytest
from helpers import DEMO, cached, demo_commands, run_commands
from PIL import Image


@pytest.fixture(scope="module")
def demo_run(demo_tokenizer):
    """scripts/demo.sh's ``tokenize``, ``pretrain`` and ``inspect`` steps, on the demo's shards and tokenizer."""
    def build(folder):
        for name in ("shards", "holdout"):
            shutil.copytree(demo_tokenizer / name, folder / name)
        shutil.copy(demo_tokenizer / "dvae_tiny.pt", folder / "dvae_tiny.pt")
        run_commands(demo_commands(folder, "tokenize", "pretrain", "inspect"))

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


@pytest.mark.xdist_group("trained_tokenizer")
def test_the_demos_render_draws_the_view_back_from_its_tokens(demo_run):
    """The render of scripts/demo.sh: image, view, tokens and reconstruction, the reconstruction
    of the trained tokenizer nearer the view it encodes than the other panels are."""
    render = demo_commands(demo_run, "inspect")[-1]
    out = render[render.index("--out") + 1]
    img = np.asarray(Image.open(out).convert("RGB")).astype(float)
    panels = [img[40:320, 20 + 320 * i: 300 + 320 * i] for i in range(4)]
    image, view, tokens, back = panels
    for i, a in enumerate(panels):
        assert a.std() > 5, f"panel {i} is blank"
    near = np.abs(back - view).mean()
    print(f"reconstruction to view {near:.1f}, image to view {np.abs(image - view).mean():.1f}, "
          f"tokens to view {np.abs(tokens - view).mean():.1f}")
    assert near < np.abs(image - view).mean() and near < np.abs(tokens - view).mean()
