import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, cached

from beit_common import BeitDataError
from beit_model.dvae import CONFIGS, DVAEConfig, save_checkpoint
from beit_model.tokenizer import load_tokenizer

FAKE = REPO / "tests" / "fake_dall_e"

MAKE_PICKLES = """
import sys, torch
from dall_e.encoder import Encoder
from dall_e.decoder import Decoder
from dall_e.utils import map_pixels
torch.manual_seed(0)
enc = Encoder(n_hid=16, n_blk_per_group=2, vocab_size=64)
dec = Decoder(n_init=8, n_hid=16, n_blk_per_group=2, vocab_size=64)
with torch.no_grad():
    for p in list(enc.parameters()) + list(dec.parameters()):
        p.add_(torch.randn_like(p) * 0.05)
out = sys.argv[1]
torch.save(enc, out + '/encoder.pkl')
torch.save(dec, out + '/decoder.pkl')
x = torch.rand(2, 3, 32, 40)
ids = torch.randint(0, 64, (2, 4, 5))
z = torch.nn.functional.one_hot(ids, 64).permute(0, 3, 1, 2).float()
with torch.no_grad():
    torch.save({'x': x, 'logits': enc(map_pixels(x)), 'ids': ids, 'stats': dec(z)}, out + '/expected.pt')
"""


@pytest.fixture(scope="module")
def openai_files():
    """OpenAI-style pickles made where ``dall_e`` imports (the fake package), kept for its code."""
    def build(out):
        subprocess.run([sys.executable, "-c", MAKE_PICKLES, str(out)], check=True,
                       env={**os.environ, "PYTHONPATH": str(FAKE)})  # the same threads and MKL mode as this process

    fake = sorted((p.name, p.read_bytes()) for p in FAKE.rglob("*.py"))
    return cached("openai_pickles", build, MAKE_PICKLES, fake)


def test_openai_pickles_load_without_dall_e_and_give_same_logits(openai_files):
    with pytest.raises(ImportError):
        import dall_e  # noqa: F401
    expected = torch.load(openai_files / "expected.pt")
    tok = load_tokenizer(openai_files / "encoder.pkl")
    assert tok.name == "dall-e" and tok.vocab_size == 64 and tok.input_size == 112 and tok.grid == 14
    assert len(tok.fingerprint) == 64
    assert torch.equal(tok.logits(expected["x"]), expected["logits"])
    assert torch.equal(tok.encode(expected["x"]), expected["logits"].argmax(1))
    recon = tok.decode(expected["ids"])
    want = torch.clamp((torch.sigmoid(expected["stats"][:, :3]) - 0.1) / 0.8, 0, 1)
    assert recon.shape == (2, 3, 32, 40)
    assert torch.allclose(recon, want, atol=1e-6)


def test_state_dicts_and_checkpoints_load(tmp_path, openai_files):
    tok = load_tokenizer(openai_files / "encoder.pkl")
    torch.save(tok.encoder.state_dict(), tmp_path / "enc.pt")
    plain = load_tokenizer(tmp_path / "enc.pt")
    assert plain.fingerprint == tok.fingerprint and plain.decoder is None
    both = {**{f"encoder.{k}": v for k, v in tok.encoder.state_dict().items()},
            **{f"decoder.{k}": v for k, v in tok.decoder.state_dict().items()}}
    torch.save(both, tmp_path / "both.pt")
    assert load_tokenizer(tmp_path / "both.pt").decoder is not None
    cfg = CONFIGS["tiny"]
    save_checkpoint(tmp_path / "tiny.pt", cfg, *cfg.build())
    own = load_tokenizer(tmp_path / "tiny.pt")
    assert (own.name, own.vocab_size, own.input_size, own.encoder.n_hid) == ("dvae", 512, 112, cfg.n_hid)
    assert own.describe() == {"kind": "dvae", "name": "dvae", "fingerprint": own.fingerprint, "vocab": 512,
                              "input_size": 112, "grid": 14}
    x = torch.rand(1, 3, 112, 112)
    assert own.encode(x).shape == (1, 14, 14)
    assert own.decode(own.encode(x)).shape == (1, 3, 112, 112)


def test_wrong_files_get_clear_errors(tmp_path, openai_files):
    with pytest.raises(BeitDataError, match="tokenizer file not found"):
        load_tokenizer(tmp_path / "missing.pkl")
    (tmp_path / "junk.pkl").write_bytes(b"this is not a torch file")
    with pytest.raises(BeitDataError, match=r"junk.pkl is not a PyTorch file: it is a text file starting "
                                            r"'this is not a torch file'$"):
        load_tokenizer(tmp_path / "junk.pkl")
    (tmp_path / "tokens.parquet").write_bytes(b"PAR1" + bytes(100))
    with pytest.raises(BeitDataError, match=r"tokens.parquet is not a PyTorch file: it is a Parquet file$"):
        load_tokenizer(tmp_path / "tokens.parquet")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(BeitDataError, match="expected parameters such as blocks.input.w"):
        load_tokenizer(tmp_path / "other.pt")
    state = load_tokenizer(openai_files / "encoder.pkl").encoder.state_dict()
    state["blocks.output.conv.b"] = torch.zeros(7)
    torch.save(state, tmp_path / "bad_shape.pt")
    with pytest.raises(BeitDataError, match="blocks.output.conv.b"):
        load_tokenizer(tmp_path / "bad_shape.pt")
    with pytest.raises(BeitDataError, match="decoder weights; give the encoder"):
        load_tokenizer(openai_files / "decoder.pkl")


def test_bad_image_batches_are_refused(openai_files):
    tok = load_tokenizer(openai_files / "encoder.pkl")
    with pytest.raises(BeitDataError, match=r"in \[0,1\]"):
        tok.logits(torch.rand(1, 3, 16, 16) * 255)
    with pytest.raises(BeitDataError, match=r"\(B,3,H,W\)"):
        tok.logits(torch.rand(1, 1, 16, 16))
    with pytest.raises(BeitDataError, match="divisible by 8"):
        tok.logits(torch.rand(1, 3, 20, 16))
    with pytest.raises(BeitDataError, match="float"):
        tok.logits(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(BeitDataError, match="divisible by 8"):
        DVAEConfig(input_size=100)
    with pytest.raises(BeitDataError, match="divisible by 8"):
        load_tokenizer(openai_files / "encoder.pkl", input_size=100)


def test_trusted_views_skip_only_the_value_check_and_only_for_that_call(openai_files):
    """Online pretraining passes its own loader's views as trusted: no wait on the device for
    their range, the same ids; the shape check stays, and the next call checks again."""
    tok = load_tokenizer(openai_files / "encoder.pkl")
    views = torch.rand(2, 3, 16, 16)
    assert torch.equal(tok.ids(views, trusted=True), tok.ids(views))
    tok.ids(views * 255, trusted=True)
    with pytest.raises(BeitDataError, match=r"in \[0,1\]"):
        tok.ids(views * 255)
    with pytest.raises(BeitDataError, match="divisible by 8"):
        tok.ids(torch.rand(1, 3, 20, 16), trusted=True)
    with pytest.raises(BeitDataError, match=r"in \[0,1\]"):
        tok.ids(views * 255)


def test_train_dvae_checkpoints_resumes_exactly_and_reports(sample_shards, tmp_path, monkeypatch):
    from helpers import run_cli

    import pipelines.train_dvae as train_dvae
    from pipelines.train_dvae import TrainDVAEConfig, run_train_dvae

    common = dict(shards=str(sample_shards), config="tiny", batch_size=4, steps=6, checkpoint_every=3, device="cpu",
                  progress=False)
    straight = run_train_dvae(TrainDVAEConfig(out=str(tmp_path / "a.pt"), **common))
    assert straight["steps"] == 6 and straight["images"] == 16
    assert set(straight) >= {"psnr", "psnr_mean_colour", "perplexity", "codes_used"}
    assert 0 < straight["codes_used"] <= 1 and straight["perplexity"] >= 1
    assert json.loads(Path(str(tmp_path / "a.pt") + ".report.json").read_text())["psnr"] == straight["psnr"]
    tok = load_tokenizer(tmp_path / "a.pt")
    assert (tok.name, tok.vocab_size, tok.input_size, tok.decoder is not None) == ("dvae", 512, 112, True)
    # A run that dies at step 5, after its checkpoint at step 3.
    real, calls = train_dvae._train_step, []

    def dies_at_step_5(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_dvae, "_train_step", dies_at_step_5)
    out = tmp_path / "b.pt"
    with pytest.raises(KeyboardInterrupt):
        run_train_dvae(TrainDVAEConfig(out=str(out), **common))
    monkeypatch.undo()
    assert torch.load(out, weights_only=True)["step"] == 3
    for name, value in {"steps": 9, "batch_size": 2, "lr": 1e-3, "seed": 1, "kl_weight": 0.1}.items():
        with pytest.raises(BeitDataError, match=rf"^`{name}` is .* in the run being resumed, not {value!r}; a resumed "
                                                r"run keeps it"):
            run_train_dvae(TrainDVAEConfig(out=str(out), resume=True, **{**common, name: value}))
    resumed = run_train_dvae(TrainDVAEConfig(out=str(out), resume=True, **{**common, "checkpoint_every": 2}))
    assert {k: v for k, v in resumed.items() if k not in ("seconds", "out")} == \
        {k: v for k, v in straight.items() if k not in ("seconds", "out")}
    a, b = (torch.load(p, weights_only=True) for p in (tmp_path / "a.pt", out))
    assert all(torch.equal(a["encoder"][k], b["encoder"][k]) for k in a["encoder"])  # the same run
    again = run_cli("train-dvae", "--shards", str(sample_shards), "--out", str(out), "--device", "cpu")
    assert again.returncode != 0 and "pass --resume" in again.stderr and "Traceback" not in again.stderr


class Payload:
    """Runs a shell command when unpickled, as a hostile weights file would."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_no_tokenizer_file_runs_code_when_loaded(tmp_path, openai_files):
    import pickle
    import shutil

    marker = tmp_path / "ran"
    enc = load_tokenizer(openai_files / "encoder.pkl").encoder.state_dict()
    # A state dict with a payload, as .pt and as a train-dvae checkpoint: weights_only refuses it.
    torch.save({**enc, "extra": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(BeitDataError, match=r"evil.pt holds more than tensors, and only OpenAI's .pkl files"):
        load_tokenizer(tmp_path / "evil.pt")
    # The same payload as an encoder.pkl, in torch's format and as a bare pickle: the allow-list refuses it.
    (tmp_path / "pkl").mkdir()
    torch.save(Payload(marker), tmp_path / "pkl" / "encoder.pkl")
    with pytest.raises(BeitDataError, match=r"encoder.pkl was not unpickled: it asks for posix.system, which no "
                                            r"DALL-E file holds; only OpenAI's dall_e modules load this way$"):
        load_tokenizer(tmp_path / "pkl" / "encoder.pkl")
    with open(tmp_path / "pkl" / "encoder.pkl", "wb") as f:
        pickle.dump(Payload(marker), f)
    with pytest.raises(BeitDataError, match=r"encoder.pkl (was not unpickled|could not be unpickled)"):
        load_tokenizer(tmp_path / "pkl" / "encoder.pkl")
    # A hostile decoder.pkl beside a plain state dict is never opened ...
    torch.save(enc, tmp_path / "pkl" / "enc.pt")
    torch.save(Payload(marker), tmp_path / "pkl" / "decoder.pkl")
    assert load_tokenizer(tmp_path / "pkl" / "enc.pt").decoder is None
    # ... and beside OpenAI's encoder.pkl it is refused.
    shutil.copy(openai_files / "encoder.pkl", tmp_path / "pkl" / "encoder.pkl")
    with pytest.raises(BeitDataError, match=r"decoder.pkl was not unpickled: it asks for posix.system"):
        load_tokenizer(tmp_path / "pkl" / "encoder.pkl")
    assert not marker.exists()
    # OpenAI's own files still load, with their decoder, and give the same tokens.
    x = torch.load(openai_files / "expected.pt")["x"]
    tok = load_tokenizer(openai_files / "encoder.pkl")
    assert tok.decoder is not None and torch.equal(tok.encode(x), load_tokenizer(tmp_path / "pkl" / "enc.pt").encode(x))


def test_train_dvae_warns_below_the_mean_colour_psnr(sample_shards, tmp_path):
    from helpers import invoke

    from pipelines.train_dvae import report_warnings

    assert report_warnings({"psnr": 14.0, "psnr_mean_colour": 15.25}) == [
        "held-out PSNR 14.00 dB is below the mean-colour baseline 15.25 dB (each image painted its mean colour): "
        "the codes carry less than that; train longer (--steps) or on more images"]
    assert report_warnings({"psnr": 15.25, "psnr_mean_colour": 15.25}) == []
    result = invoke("train-dvae", "--shards", sample_shards, "--out", tmp_path / "d.pt", "--config", "tiny",
                    "--steps", "1", "--batch-size", "2", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "d.pt.report.json").read_text())
    printed = [line for line in result.stderr.splitlines() if "warning" in line]
    assert printed == [f"train-dvae: warning: {w}" for w in report_warnings(report)] and report["warnings"] == \
        report_warnings(report)


def test_train_dvae_resumes_from_its_record_alone_extends_and_keeps_fp16s_scaler(sample_shards, tmp_path):
    """``train-dvae --out F --resume`` takes the settings the checkpoint records (a codebook of
    ``--vocab-size`` codes too); ``--extend`` trains a finished run longer; an fp16 run keeps its
    gradient scaler in the checkpoint."""
    from helpers import invoke

    out = tmp_path / "d.pt"
    first = invoke("train-dvae", "--shards", sample_shards, "--out", out, "--steps", "2", "--batch-size", "4",
                   "--lr", "1e-3", "--seed", "3", "--device", "cpu", "--precision", "fp16", "--vocab-size", "16",
                   "--quiet")
    assert first.exit_code == 0, first.output
    assert "train-dvae: precision fp16 autocast with a gradient scaler, as asked" in first.stderr
    saved = torch.load(out, weights_only=True)
    assert saved["scaler"]["scale"] > 0 and saved["train"]["lr"] == 1e-3
    assert load_tokenizer(out).vocab_size == 16 and saved["train"]["vocab_size"] == 16
    other = invoke("train-dvae", "--out", out, "--resume", "--vocab-size", "32", "--quiet")
    assert other.exit_code == 1 and other.stderr.strip().splitlines()[-1] == (
        "Error: --vocab-size is 16 in the run being resumed, not 32; a resumed run keeps it (start a new run to "
        "change it)")
    too_small = invoke("train-dvae", "--shards", sample_shards, "--out", tmp_path / "e.pt", "--vocab-size", "1")
    assert too_small.exit_code == 2 and "Invalid value for '--vocab-size'" in too_small.stderr
    longer = invoke("train-dvae", "--out", out, "--resume", "--steps", "3", "--quiet")
    assert longer.exit_code == 1 and "pass --extend to train it longer" in longer.stderr
    done = invoke("train-dvae", "--out", out, "--resume", "--extend", "--steps", "3", "--quiet")
    assert done.exit_code == 0, done.output
    assert "train-dvae: extending the run to 3 steps; it has trained 2" in done.stderr
    assert "train-dvae: resuming with steps 2 -> 3, extend False -> True" in done.stderr
    after = torch.load(out, weights_only=True)
    train = after["train"]
    assert (after["step"], train["lr"], train["seed"], train["batch_size"]) == (3, 1e-3, 3, 4)
    assert after["train"]["precision"] == "fp16" and after["scaler"]["scale"] > 0
    assert load_tokenizer(out).vocab_size == 16
