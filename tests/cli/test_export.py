"""``beit-data export``: the encoder of a run loads in timm."""

import json

import pytest
import torch
from helpers import REPO, invoke, run_cli

from beit_data.dali_views import IMAGENET_MEAN, IMAGENET_STD


@pytest.fixture
def trained_run(two_step_run):
    """A pretrain run of two steps (shared, read only), exported by the tests below."""
    return two_step_run


def test_cli_export_of_a_run_loads_in_timm(trained_run, tmp_path):
    import timm

    result = invoke("export", trained_run, "--out", tmp_path / "enc.pth")
    assert result.exit_code == 0, result.output
    assert "timm.create_model('beit_base_patch16_224'" in result.stdout
    info = json.loads((tmp_path / "enc.json").read_text())
    model = timm.create_model(info["timm_model"], checkpoint_path=str(tmp_path / "enc.pth"), **info["timm_kwargs"],
                              pretrained_cfg_overlay=info["pretrained_cfg"])
    ckpt = torch.load(trained_run / "checkpoint.pt", weights_only=True)
    assert torch.equal(model.patch_embed.proj.weight, ckpt["model"]["patch_embed.proj.weight"])
    missing = invoke("export", tmp_path, "--out", tmp_path / "x.pth")
    assert missing.exit_code == 1 and "no checkpoint" in missing.stderr and "Traceback" not in missing.stderr
    # An export is not replaced silently: --overwrite says so.
    before = (tmp_path / "enc.pth").read_bytes()
    again = invoke("export", trained_run, "--out", tmp_path / "enc.pth")
    assert again.exit_code == 1 and again.stderr.strip() == f"Error: {tmp_path / 'enc.pth'} exists; pass --overwrite " \
        "to replace it"
    assert (tmp_path / "enc.pth").read_bytes() == before
    assert invoke("export", trained_run, "--out", tmp_path / "enc.pth", "--overwrite").exit_code == 0
    # The JSON names the input the encoder was pretrained on, and timm resolves it from there.
    from timm.data import resolve_data_config

    assert tuple(resolve_data_config({}, model=model)["mean"]) == IMAGENET_MEAN
    assert info["pretrained_cfg"] == {"input_size": [3, 224, 224], "interpolation": "bicubic",
                                      "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


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


def test_safetensors_export_loads_in_timm(trained_run, tmp_path):
    import timm

    result = invoke("export", trained_run, "--out", tmp_path / "sub" / "enc.safetensors")
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "sub" / "enc.json").read_text())
    assert info["timm_model"] == "beit_base_patch16_224"  # tiny has no timm name: base with the tiny sizes
    model = timm.create_model(info["timm_model"], checkpoint_path=str(tmp_path / "sub" / "enc.safetensors"),
                              **info["timm_kwargs"])
    ckpt = torch.load(trained_run / "checkpoint.pt", weights_only=True)
    assert torch.equal(model.patch_embed.proj.weight, ckpt["model"]["patch_embed.proj.weight"])
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["enc.json", "enc.safetensors"]



def test_folder_export_fine_tunes_in_timm_with_its_pretraining_normalisation(trained_run, tmp_path):
    """timm opens the folder as ``local-dir:``, with a new classifier for any number of classes,
    resolves the mean and std of pretraining (not its BEiT default of 0.5), and fine-tunes it
    with layer decay 0.65 through its own optimizer factory and transforms."""
    import timm
    from PIL import Image
    from timm.data import create_transform, resolve_data_config
    from timm.optim import create_optimizer_v2

    result = invoke("export", trained_run, "--out", tmp_path / "encoder")
    assert result.exit_code == 0, result.output
    assert f"timm.create_model('local-dir:{tmp_path / 'encoder'}', pretrained=True" in result.stdout
    assert sorted(p.name for p in (tmp_path / "encoder").iterdir()) == ["config.json", "model.safetensors"]
    ckpt = torch.load(trained_run / "checkpoint.pt", weights_only=True)
    for classes in (3, 7):
        model = timm.create_model(f"local-dir:{tmp_path / 'encoder'}", pretrained=True, num_classes=classes)
        assert torch.equal(model.patch_embed.proj.weight, ckpt["model"]["patch_embed.proj.weight"])
        assert torch.equal(model.fc_norm.weight, ckpt["model"]["norm.weight"])
        assert model.head.weight.shape == (classes, model.num_features)
    config = resolve_data_config({}, model=model)
    assert tuple(config["mean"]) == IMAGENET_MEAN and tuple(config["std"]) == IMAGENET_STD
    assert config["interpolation"] == "bicubic" and config["input_size"] == (3, 224, 224)
    transform = create_transform(**config, is_training=True)
    normalize = [t for t in transform.transforms if type(t).__name__ == "Normalize"][0]
    assert tuple(normalize.mean.tolist()) == pytest.approx(IMAGENET_MEAN)
    assert tuple(normalize.std.tolist()) == pytest.approx(IMAGENET_STD)

    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.65)
    scales = sorted({round(g["lr_scale"], 6) for g in optimizer.param_groups})
    depth = len(model.blocks)
    assert scales[0] == pytest.approx(0.65 ** (depth + 1), rel=1e-5) and scales[-1] == 1.0
    images_dir = REPO / "beit_data" / "sample_images"
    photos = sorted(images_dir.glob("*.jpg"))[:6]
    images = torch.stack([transform(Image.open(p).convert("RGB")) for p in photos])
    labels = torch.arange(len(photos)) % 7
    before = model.blocks[0].attn.qkv.weight.detach().clone()
    model.train()
    losses = []
    for _ in range(4):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert not torch.equal(model.blocks[0].attn.qkv.weight, before)


def test_folder_export_refuses_to_replace_without_overwrite(trained_run, tmp_path):
    (tmp_path / "encoder").mkdir()
    (tmp_path / "encoder" / "config.json").write_text("{}")
    result = invoke("export", trained_run, "--out", tmp_path / "encoder")
    assert result.exit_code == 1 and result.stderr.strip() == \
        f"Error: {tmp_path / 'encoder' / 'config.json'} exists; pass --overwrite to replace it"
    assert (tmp_path / "encoder" / "config.json").read_text() == "{}"
    assert invoke("export", trained_run, "--out", tmp_path / "encoder", "--overwrite").exit_code == 0
    assert json.loads((tmp_path / "encoder" / "config.json").read_text())["pretrained_cfg"]["mean"] == \
        list(IMAGENET_MEAN)


def test_an_out_with_another_suffix_is_refused_not_made_a_folder(trained_run, tmp_path):
    result = invoke("export", trained_run, "--out", tmp_path / "encoder.pt")
    assert result.exit_code == 1 and result.stderr.strip() == \
        f"Error: --out {tmp_path / 'encoder.pt'}: name a folder (no suffix), or a .pth or .safetensors file"
    assert not (tmp_path / "encoder.pt").exists()
    assert invoke("export", trained_run, "--out", tmp_path / "ENC.PTH").exit_code == 0
    assert (tmp_path / "ENC.PTH").is_file() and (tmp_path / "ENC.json").is_file()
