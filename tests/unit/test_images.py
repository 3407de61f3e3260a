"""Encoded images: what counts as whole, and what the decoder will produce."""

import io

import numpy as np
import pytest
from helpers import jpeg_bytes
from PIL import Image

from beit_data.images import ImageError, jpeg_end, probe_image


def mp4_like(size: int, seed: int = 0) -> bytes:
    """An ISO-BMFF box header and payload, as phones append after a motion photo's JPEG."""
    payload = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    return (24).to_bytes(4, "big") + b"ftypmp42" + b"\0" * 12 + (size + 8).to_bytes(4, "big") + b"mdat" + payload


@pytest.mark.parametrize("progressive", [False, True])
def test_a_jpeg_ends_at_its_end_of_image_marker(progressive):
    data = jpeg_bytes((96, 80), seed=3, progressive=progressive, quality=90)
    assert jpeg_end(data) == len(data)
    for tail in (mp4_like(50_000), np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
                 b"\0" * 64):
        assert jpeg_end(data + tail) == len(data)
        assert probe_image(data + tail).width == 96
    for cut in (len(data) // 2, len(data) - 2, 300):
        assert jpeg_end(data[:cut]) is None
        with pytest.raises(ImageError, match="(?i)truncated"):
            probe_image(data[:cut])


def test_an_exif_thumbnail_does_not_end_the_image():
    thumb = jpeg_bytes((16, 16), seed=1)
    exif = Image.Exif()
    exif[0x010E] = "x"  # an image description, so that the EXIF block is written
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    big.save(buf, format="JPEG", exif=exif.tobytes() + thumb)  # thumbnail bytes inside APP1
    data = buf.getvalue()
    assert thumb in data and jpeg_end(data) == len(data)
    assert jpeg_end(data[: data.index(thumb) + len(thumb) + 40]) is None


def test_dali_decodes_jpegs_with_appended_data_like_the_plain_file():
    from beit_data.dali_views import DaliViews, ViewSpec
    from beit_data.views import View

    data = jpeg_bytes((96, 80), seed=3, quality=95)
    view = View(0, 0, 96, 80, False, 1.0, 1.0, 1.0)
    dali = DaliViews(ViewSpec(views=1, size=32, interp="bilinear", jitter=False), batch_size=2)
    out = dali([data, data + mp4_like(20_000)], [[view], [view]])
    assert out.shape == (2, 1, 3, 32, 32) and np.array_equal(out[0].numpy(), out[1].numpy())
