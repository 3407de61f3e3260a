"""The smaller breaks of issue 36: ``probe`` reads the folder ``export`` writes, whose
``config.json`` names the architecture honestly; Parquet image columns that hold paths; and the
folder a list file's relative paths are read from."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import invoke, jpeg_bytes, samples

# -- probe reads an export folder -------------------------------------------------------------------

def test_probe_reads_the_folder_export_writes_with_the_run_folders_figures(two_step_run, labeled_shards, tmp_path):
    assert invoke("export", two_step_run, "--out", tmp_path / "encoder").exit_code == 0
    assert invoke("export", two_step_run, "--out", tmp_path / "enc.pth").exit_code == 0
    sets = ("--train-shards", labeled_shards / "train", "--val-shards", labeled_shards / "val")
    figures = {}
    for name, model in (("run", two_step_run), ("folder", tmp_path / "encoder"), ("file", tmp_path / "enc.pth")):
        result = invoke("probe", model, *sets, "--device", "cpu", "--quiet", "--json")
        assert result.exit_code == 0, result.output
        figures[name] = json.loads(result.stdout)
    assert figures["run"]["kind"] == "run" and figures["folder"]["kind"] == figures["file"]["kind"] == "encoder"
    for name in ("folder", "file"):  # the same encoder, the same features: the same k-NN
        assert figures[name]["knn"] == pytest.approx(figures["run"]["knn"], abs=1e-6)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text((tmp_path / "encoder" / "config.json").read_text())
    refused = invoke("probe", tmp_path / "half", *sets, "--device", "cpu", "--quiet")
    assert refused.exit_code == 1 and refused.stderr.strip() == (
        f"Error: {tmp_path / 'half'} is neither a pretrain run folder, an export folder (model.safetensors and "
        "config.json) nor an exported encoder with its half.json beside it")


# -- config.json names the architecture and no borrowed tag ---------------------------------------

@pytest.mark.parametrize("name, architecture", [
    ("beit_mim_tiny_patch16_224", "beit_base_patch16_224"),  # timm has no tiny BEiT: its base builder
    ("beitv2_mim_tiny_patch16_224", "beitv2_base_patch16_224"),
    ("beit_mim_base_patch16_224", "beit_base_patch16_224"),
    ("beit_mim_large_patch16_224", "beit_large_patch16_224"),
    ("beitv2_mim_base_patch16_224", "beitv2_base_patch16_224"),
    ("beitv2_mim_large_patch16_224", "beitv2_large_patch16_224"),
])
def test_the_timm_architecture_is_the_one_of_the_same_size_where_timm_has_one(name, architecture):
    import timm

    from beit_model.beit_mim import MIM_VARIANTS
    from pipelines.export import timm_architecture

    assert timm_architecture(name) == architecture
    with torch.device("meta"):
        model = timm.create_model(architecture)
    sizes = (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads)
    wanted = tuple(MIM_VARIANTS[name][k] for k in ("embed_dim", "depth", "num_heads"))
    assert (sizes == wanted) == ("tiny" not in name)


# The tiny models make the round trip; the other sizes' names are held by the test above.
@pytest.mark.parametrize("name", ["beit_mim_tiny_patch16_224", "beitv2_mim_tiny_patch16_224"])
def test_the_export_config_names_its_model_and_carries_no_borrowed_tag(name, tmp_path):
    import timm

    from beit_model.beit_mim import MIM_VARIANTS, encoder_state_dict
    from pipelines.export import _write_folder, input_config, timm_architecture, timm_args

    torch.manual_seed(0)
    mim = timm.create_model(name, vocab_size=64)
    args = timm_args(MIM_VARIANTS[name])
    _write_folder(tmp_path, timm_architecture(name), args, input_config(224), encoder_state_dict(mim), name)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == timm_architecture(name) and config["beit_data_model"] == name
    assert {k: config["model_args"][k] for k in ("embed_dim", "depth", "num_heads")} == \
        {k: MIM_VARIANTS[name][k] for k in ("embed_dim", "depth", "num_heads")}
    assert "tag" not in config["pretrained_cfg"] and "license" not in config["pretrained_cfg"]
    model = timm.create_model(f"local-dir:{tmp_path}", pretrained=True, num_classes=5)
    assert len(model.blocks) == MIM_VARIANTS[name]["depth"] and model.head.out_features == 5
    assert torch.equal(model.patch_embed.proj.weight, mim.patch_embed.proj.weight)
    assert not model.pretrained_cfg.get("tag")


# -- Parquet image columns that hold paths --------------------------------------------------------

def _paths_parquet(path: Path, names: list[str]) -> None:
    """What Hugging Face ``datasets`` writes after ``cast_column('image', Image())`` of files: an
    image struct whose ``bytes`` are null and whose ``path`` names the file."""
    features = {"image": {"_type": "Image"}, "label": {"names": ["a", "b"], "_type": "ClassLabel"}}
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())],
                       metadata={"huggingface": json.dumps({"info": {"features": features}})})
    pq.write_table(pa.table({"image": [{"bytes": None, "path": n} for n in names],
                             "label": [i % 2 for i in range(len(names))]}, schema=schema), path)


@pytest.mark.parametrize("layout, root", [
    ("beside", None),  # relative to the Parquet file's folder
    ("root", "pics"),  # relative to --image-root
    ("absolute", None),
])
def test_parquet_paths_are_read_relative_to_the_file_or_the_image_root(layout, root, tmp_path):
    (tmp_path / "data").mkdir()
    images = tmp_path / ("pics" if layout == "root" else "data")
    (images / "imgs").mkdir(parents=True)
    for i in range(3):
        (images / "imgs" / f"{i}.jpg").write_bytes(jpeg_bytes(seed=i))
    names = [f"imgs/{i}.jpg" for i in range(3)] + ["imgs/missing.jpg"]
    if layout == "absolute":
        names = [str(images / n) for n in names]
    _paths_parquet(tmp_path / "data" / "train.parquet", names)
    extra = ("--image-root", tmp_path / root) if root else ()
    result = invoke("shards", "--min-size", "0",
                    tmp_path / "data" / "train.parquet", "--out", tmp_path / "out", "--no-shuffle",
                    "--quiet", *extra)
    assert result.exit_code == 0, result.output
    written = samples(tmp_path / "out")
    assert [s.image for s in written] == [jpeg_bytes(seed=i) for i in range(3)]
    assert [json.loads(s.members["json"])["source"] for s in written] == [f"train.parquet:{i}" for i in range(3)]
    assert [int(s.members["cls"]) for s in written] == [0, 1, 0]
    missing = images / "imgs" / "missing.jpg"
    reason = f"image file {missing}: No such file or directory"
    assert json.loads((tmp_path / "out" / "rejects.json").read_text()) == [{"path": "train.parquet:3",
                                                                             "reason": reason}]
    assert f"rejected train.parquet:3: {reason}" in result.stderr


def test_image_root_is_refused_for_sources_that_are_not_parquet(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(jpeg_bytes())
    result = invoke("shards", "--min-size", "0",
                    tmp_path / "imgs", "--out", tmp_path / "out", "--image-root", tmp_path, "--quiet")
    assert result.exit_code == 1 and "--image-root is for Parquet sources whose image column holds paths" in \
        result.stderr
    assert not (tmp_path / "out").exists()


# -- a list file's relative paths ------------------------------------------------------------------

@pytest.mark.parametrize("line, found", [
    ("b.jpg", True),  # beside the list
    ("../imgs/a.jpg", True),  # relative to the list's folder, not to the working folder
    ("imgs/a.jpg", False),  # right from the working folder, wrong from the list's: rejected, naming the base
    ("nope.jpg", False),
])
def test_a_list_files_relative_paths_are_read_from_its_folder(line, found, tmp_path, monkeypatch):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(jpeg_bytes(seed=1))
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "b.jpg").write_bytes(jpeg_bytes(seed=2))
    (tmp_path / "c.jpg").write_bytes(jpeg_bytes(seed=3))
    (tmp_path / "lists" / "list.txt").write_text(f"{line}\n{tmp_path / 'c.jpg'}\n")  # an absolute path as it is
    monkeypatch.chdir(tmp_path)
    result = invoke("shards", "--min-size", "0", "lists/list.txt", "--out", tmp_path / "out", "--no-shuffle", "--quiet")
    assert result.exit_code == 0, result.output
    sources = [json.loads(s.members["json"])["source"] for s in samples(tmp_path / "out")]
    assert sources == ([line] if found else []) + [str(tmp_path / "c.jpg")]
    rejects = json.loads((tmp_path / "out" / "rejects.json").read_text())
    if found:
        assert rejects == []
    else:
        reason = (f"No such file or directory: {line!r} in {tmp_path / 'lists'} (a list's relative paths are read "
                  "from the list's own folder)")
        assert rejects == [{"path": f"lists/{line}", "reason": reason}]
        assert f"rejected lists/{line}: {reason}" in result.stderr
