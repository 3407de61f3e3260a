"""``beit-data export``: the encoder of a run loads in timm."""

import json

import pytest
import torch

from pipelines.pretrain import PretrainConfig, run_pretrain
from tests.conftest import invoke, run_cli
from tests.test_pretrain import TINY


def test_cli_export_of_a_run_loads_in_timm(sample_shards, sample_tokens, tmp_path):
    import timm

    run_pretrain(PretrainConfig.from_flat(shards=str(sample_shards), tokens=str(sample_tokens),
                                          out=str(tmp_path / "run"),
                                steps=2, **TINY))
    result = invoke("export", tmp_path / "run", "--out", tmp_path / "enc.pth")
    assert result.exit_code == 0, result.output
    assert "timm.create_model('beit_base_patch16_224'" in result.stdout
    info = json.loads((tmp_path / "enc.json").read_text())
    model = timm.create_model(info["timm_model"], checkpoint_path=str(tmp_path / "enc.pth"), **info["timm_kwargs"])
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert torch.equal(model.patch_embed.proj.weight, ckpt["model"]["patch_embed.proj.weight"])
    missing = invoke("export", tmp_path, "--out", tmp_path / "x.pth")
    assert missing.exit_code == 1 and "no checkpoint" in missing.stderr and "Traceback" not in missing.stderr
    # An export is not replaced silently: --overwrite says so.
    before = (tmp_path / "enc.pth").read_bytes()
    again = invoke("export", tmp_path / "run", "--out", tmp_path / "enc.pth")
    assert again.exit_code == 1 and again.stderr.strip() == f"Error: {tmp_path / 'enc.pth'} exists; pass --overwrite " \
        "to replace it"
    assert (tmp_path / "enc.pth").read_bytes() == before
    assert invoke("export", tmp_path / "run", "--out", tmp_path / "enc.pth", "--overwrite").exit_code == 0


def test_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path):
    from beit_common import BeitDataError
    from pipelines.checkpoint import load_checkpoint

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    result = run_cli("export", str(tmp_path / "run"), "--out", str(tmp_path / "e.pth"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "checkpoint.pt is not a readable checkpoint" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(BeitDataError, match="other.pt is not a beit-data pretrain checkpoint .missing optimizer"):
        load_checkpoint(tmp_path / "other.pt")
    assert not (tmp_path / "e.pth").exists()


def test_safetensors_export_loads_in_timm(sample_shards, sample_tokens, tmp_path):
    import timm

    run_pretrain(PretrainConfig.from_flat(shards=str(sample_shards), tokens=str(sample_tokens),
                                          out=str(tmp_path / "run"),
                                steps=1, **TINY))
    result = run_cli("export", str(tmp_path / "run"), "--out", str(tmp_path / "sub" / "enc.safetensors"))
    assert result.returncode == 0, result.stderr
    info = json.loads((tmp_path / "sub" / "enc.json").read_text())
    assert info["timm_model"] == "beit_base_patch16_224"  # tiny has no timm name: base with the tiny sizes
    model = timm.create_model(info["timm_model"], checkpoint_path=str(tmp_path / "sub" / "enc.safetensors"),
                              **info["timm_kwargs"])
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert torch.equal(model.patch_embed.proj.weight, ckpt["model"]["patch_embed.proj.weight"])
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["enc.json", "enc.safetensors"]

