"""The train-dvae checkpoint: one save and one restore carry a run's step, settings, weights,
optimizer and generator; its file stays a tokenizer file, and files written before load."""

from dataclasses import asdict

import pytest
import torch
from helpers import REPO

from beit_common import BeitDataError, Location, redacted
from beit_model.dvae import CONFIGS
from beit_model.tokenizer import load_tokenizer
from beit_model.tokenizer_base import fingerprint
from pipelines.checkpoint import DVAECheckpointMeta, restore_dvae_checkpoint, save_dvae_checkpoint
from pipelines.config import TrainDVAEConfig

ARCH = CONFIGS["tiny"]
# As run_train_dvae records them: plain strings (a Location is no weights-only data).
SETTINGS = redacted(asdict(TrainDVAEConfig(shards="s/{0..1}.tar", out="d.pt", config="tiny", steps=9)))
# The keys of a file written by train-dvae before its checkpoint moved to pipelines.checkpoint.
OLD_KEYS = {"format", "config", "encoder", "decoder", "step", "optimizer", "rng", "train"}


def trained_run(seed: int = 0):
    """A tiny encoder, decoder and AdamW after two steps: every part has a state of its own."""
    torch.manual_seed(seed)
    encoder, decoder = ARCH.build()
    optimizer = torch.optim.AdamW([*encoder.parameters(), *decoder.parameters()], lr=1e-3)
    for _ in range(2):
        for p in optimizer.param_groups[0]["params"]:
            p.grad = torch.randn_like(p)
        optimizer.step()
    return encoder, decoder, optimizer


def fresh_run():
    encoder, decoder = ARCH.build()
    return encoder, decoder, torch.optim.AdamW([*encoder.parameters(), *decoder.parameters()], lr=1e-3)


def assert_same_run(a, b):
    for x, y in zip(a[:2], b[:2], strict=True):
        assert all(torch.equal(x.state_dict()[k], y.state_dict()[k]) for k in x.state_dict())
    sa, sb = a[2].state_dict(), b[2].state_dict()
    assert sa["param_groups"] == sb["param_groups"] and sa["state"].keys() == sb["state"].keys()
    assert all(torch.equal(sa["state"][i][k], sb["state"][i][k]) for i in sa["state"] for k in sa["state"][i])


def test_a_checkpoint_round_trips_and_stays_a_tokenizer_file(tmp_path):
    run, path = trained_run(), Location(tmp_path / "d.pt")
    torch.manual_seed(7)
    save_dvae_checkpoint(path, DVAECheckpointMeta(step=2, train=SETTINGS), ARCH, *run)
    after_save = torch.rand(4)
    resumed = fresh_run()
    torch.manual_seed(8)
    record, changed = restore_dvae_checkpoint(path, {**SETTINGS, "device": "cuda", "checkpoint_every": 3},
                                              TrainDVAEConfig.RESUMABLE, *resumed)
    assert record == DVAECheckpointMeta(step=2, train=SETTINGS, report=None)
    assert changed == {"device": ("auto", "cuda"), "checkpoint_every": (200, 3)}
    assert torch.equal(torch.rand(4), after_save)  # the generator goes on where it was saved
    assert_same_run(resumed, run)
    assert set(torch.load(path, weights_only=True)) == OLD_KEYS  # no report before the run's end
    tokenizer = load_tokenizer(path)
    assert tokenizer.fingerprint == fingerprint(run[0].state_dict()) and tokenizer.decoder is not None
    # The last save holds the report, which the record gives back.
    save_dvae_checkpoint(path, DVAECheckpointMeta(step=9, train=SETTINGS, report={"psnr": 20.5}), ARCH, *run)
    assert set(torch.load(path, weights_only=True)) == OLD_KEYS | {"report"}
    assert restore_dvae_checkpoint(path, SETTINGS, (), *fresh_run())[0].report == {"psnr": 20.5}


def test_a_checkpoint_written_before_restores(tmp_path):
    """The dict train-dvae wrote before its checkpoint had a record, spelled out."""
    run, path = trained_run(), Location(tmp_path / "old.pt")
    encoder, decoder, optimizer = run
    torch.manual_seed(3)
    torch.save({"format": "beit-data-dvae/1", "config": asdict(ARCH), "encoder": encoder.state_dict(),
                "decoder": decoder.state_dict(), "step": 5, "optimizer": optimizer.state_dict(),
                "rng": torch.get_rng_state(), "train": {"config": "tiny", **SETTINGS}}, path)
    after_save = torch.rand(3)
    resumed = fresh_run()
    record, changed = restore_dvae_checkpoint(path, SETTINGS, TrainDVAEConfig.RESUMABLE, *resumed)
    assert (record.step, record.train, record.report, changed) == (5, SETTINGS, None, {})
    assert torch.equal(torch.rand(3), after_save)
    assert_same_run(resumed, run)
    assert load_tokenizer(path).fingerprint == fingerprint(encoder.state_dict())
    with pytest.raises(BeitDataError, match=r"^`steps` is 9 in the run being resumed, not 12; a resumed run keeps it"):
        restore_dvae_checkpoint(path, {**SETTINGS, "steps": 12}, TrainDVAEConfig.RESUMABLE, *fresh_run())


def test_files_that_cannot_resume_are_refused_in_one_line(tmp_path):
    old_tokenizer = REPO / "tests" / "data" / "v1_run" / "tokenizer.pt"
    assert load_tokenizer(old_tokenizer).vocab_size == ARCH.vocab_size  # a tokenizer file, with no training state
    with pytest.raises(BeitDataError, match=r"tokenizer.pt is not a tiny dVAE training checkpoint "
                                            r"\(missing step, train, optimizer, rng\)$"):
        restore_dvae_checkpoint(Location(old_tokenizer), SETTINGS, (), *fresh_run())
    save_dvae_checkpoint(Location(tmp_path / "d.pt"), DVAECheckpointMeta(step=2, train=SETTINGS), ARCH, *trained_run())
    with pytest.raises(BeitDataError, match=r"d.pt is not a dalle dVAE training checkpoint$"):
        restore_dvae_checkpoint(Location(tmp_path / "d.pt"), {**SETTINGS, "config": "dalle"}, (), *fresh_run())
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(BeitDataError, match=r"tensor.pt is not a tiny dVAE training checkpoint$"):
        restore_dvae_checkpoint(Location(tmp_path / "tensor.pt"), SETTINGS, (), *fresh_run())
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(BeitDataError, match=r"junk.pt is not a readable checkpoint: it is a text file"):
        restore_dvae_checkpoint(Location(tmp_path / "junk.pt"), SETTINGS, (), *fresh_run())
    with pytest.raises(BeitDataError, match=r"^no checkpoint at .*gone.pt$"):
        restore_dvae_checkpoint(Location(tmp_path / "gone.pt"), SETTINGS, (), *fresh_run())
