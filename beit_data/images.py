"""Cheap checks of encoded images before they reach a decoder.

DALI fails a whole batch on one bad image, so every image is probed here first: its
header gives the format and the size the decoder will produce, and a structural check
catches the common damage (zero bytes, a truncated file) without a full decode.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

__all__ = ["ImageInfo", "ImageError", "probe_image", "FORMAT_EXT", "EXIF_RULE"]

FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
# Recorded in the token metadata. DALI's decoders apply EXIF orientation by default, and
# view windows are drawn in the pixels of the image as it is displayed.
EXIF_RULE = "applied: windows are in the pixels of the EXIF-rotated image"
_ORIENTATION_TAG = 0x0112
_TRANSPOSED = {5, 6, 7, 8}


class ImageError(ValueError):
    """An image that cannot be decoded; its message is the reject reason."""


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int
    orientation: int = 1


def _check_complete(fmt: str, data: bytes) -> None:
    tail = data.rstrip(b"\0")[-16:]
    if fmt == "JPEG" and not tail.endswith(b"\xff\xd9"):
        raise ImageError("truncated JPEG (no end-of-image marker)")
    if fmt == "PNG" and b"IEND" not in tail:
        raise ImageError("truncated PNG (no IEND chunk)")
    if fmt == "WEBP":
        (riff_size,) = struct.unpack("<I", data[4:8])
        if len(data) < riff_size + 8:
            raise ImageError("truncated WebP (shorter than its RIFF size)")


def probe_image(data: bytes, *, decode: bool = False) -> ImageInfo:
    """Read an encoded image's format and displayed size, and check that it is whole.

    Args:
        data: The encoded bytes.
        decode: Also decode every pixel (slow, thorough).

    Raises:
        ImageError: With a reject reason, for empty, unknown, unsupported or damaged data.
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            if fmt not in FORMAT_EXT:
                raise ImageError(f"unsupported image format {fmt} (JPEG, PNG or WebP expected)")
            width, height = im.size
            orientation = int(im.getexif().get(_ORIENTATION_TAG, 1)) if fmt == "JPEG" else 1
            if decode:
                im.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not a decodable image") from None
    except Exception as exc:  # PIL raises many types for damaged data
        raise ImageError(f"cannot decode image: {exc}") from None
    _check_complete(fmt, data)
    if orientation in _TRANSPOSED:
        width, height = height, width
    return ImageInfo(fmt, width, height, orientation)
