import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from beit_common import BeitDataError
from beit_data.dali_views import DaliViews, ViewSpec
from beit_data.images import probe_image
from beit_data.views import View


def rotated_jpeg(orientation: int) -> bytes:
    rng = np.random.default_rng(orientation)
    small = (rng.random((25, 50, 3)) * 255).astype(np.uint8)
    im = Image.fromarray(small).resize((200, 100), Image.BICUBIC)  # smooth, so JPEG keeps it
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def test_exif_rule_is_the_same_in_probe_full_decode_and_roi_decode():
    for orientation in (1, 3, 6, 8):
        data = rotated_jpeg(orientation)
        info = probe_image(data)
        upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
        assert (info.width, info.height) == (upright.shape[1], upright.shape[0])
        view = View(10, 20, 60, 40, False, 1.0, 1.0, 1.0)
        unit = dict(size=32, interp="bilinear", jitter=False)
        full = DaliViews(ViewSpec(views=1, **unit), batch_size=1)([data], [[view]])[0, 0]
        roi = DaliViews(ViewSpec(views=1, roi_decode=True, **unit), batch_size=1)([data], [[view]])[0, 0]
        crop = upright[20:60, 10:70]
        ref = torch.from_numpy(np.asarray(Image.fromarray(crop).resize((32, 32), Image.BILINEAR), np.float32) / 255)
        assert (full.permute(1, 2, 0) - ref).abs().mean() < 0.03, orientation
        assert (roi.permute(1, 2, 0) - ref).abs().mean() < 0.03, orientation


def test_flip_and_jitter_factors_are_applied():
    data = rotated_jpeg(1)
    graph = DaliViews(ViewSpec(views=3, size=32, interp="bilinear"), batch_size=1)
    plain, flipped, dark = graph([data], [[View(0, 0, 200, 100, False, 1, 1, 1), View(0, 0, 200, 100, True, 1, 1, 1),
                                          View(0, 0, 200, 100, False, 0.5, 1, 1)]])[0]
    assert torch.allclose(flipped, plain.flip(-1), atol=1e-5)
    assert torch.allclose(dark, plain * 0.5, atol=1e-5)


def test_the_loader_is_forked_on_the_cpu_only_while_no_remote_io_runs(monkeypatch):
    """A fork would share this process's object-storage connections and their event loop with the
    loader: with fsspec's loop running, the loader is spawned; on the GPU always; the variable wins."""
    import fsspec.asyn

    from beit_data.dali_views import loader_start

    monkeypatch.delenv("BEIT_DATA_LOADER_START", raising=False)
    monkeypatch.setattr(fsspec.asyn, "loop", [None])
    assert (loader_start(gpu=False), loader_start(gpu=True)) == ("fork", "spawn")
    monkeypatch.setattr(fsspec.asyn, "loop", [object()])
    assert (loader_start(gpu=False), loader_start(gpu=True)) == ("spawn", "spawn")
    monkeypatch.setenv("BEIT_DATA_LOADER_START", "fork")
    assert loader_start(gpu=False) == "fork"
    with pytest.raises(BeitDataError, match="^BEIT_DATA_LOADER_START=fork: a loader on the GPU must be spawned"):
        loader_start(gpu=True)
    monkeypatch.setenv("BEIT_DATA_LOADER_START", "thread")
    with pytest.raises(BeitDataError, match=r"^BEIT_DATA_LOADER_START='thread': use fork or spawn$"):
        loader_start(gpu=False)
