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

__all__ = ["ImageInfo", "ImageError", "ImageTooLarge", "probe_image", "jpeg_end", "FORMAT_EXT", "EXIF_RULE",
           "MAX_PIXELS", "BATCH_PIXELS"]

# Images over this many pixels are rejected as likely decompression bombs: Pillow's own limit
# (twice its warning level). beit-data checks it itself, so that ``max_pixels`` can raise it;
# Pillow's global check is turned off for that reason.
MAX_PIXELS = 2 * 89_478_485
Image.MAX_IMAGE_PIXELS = None
# Decoded pixels one batch may hold (tokenize's ``batch_pixels``). Memory follows the pixels a
# batch decodes, not its images: a 20 KB PNG of 13000 x 13000 decodes to 507 MB of RGB. About
# 1.6 GB of 8-bit RGB, three such images; a batch of 64 photographs of 12 megapixels is split in two.
BATCH_PIXELS = 2**29

FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
# Recorded in the token metadata. DALI's decoders apply EXIF orientation by default, and
# view windows are drawn in the pixels of the image as it is displayed.
EXIF_RULE = "applied: windows are in the pixels of the EXIF-rotated image"
_ORIENTATION_TAG = 0x0112
_TRANSPOSED = {5, 6, 7, 8}


class ImageError(ValueError):
    """An image that cannot be decoded; its message is the reject reason."""


class ImageTooLarge(ImageError):
    """An image over a pixel limit: the guard against decompression bombs (``--max-pixels``), or
    what one batch may decode (``--batch-pixels``). ``reason`` says which; the message adds the
    setting that raises it, which the commands that first read images have."""

    def __init__(self, reason: str, setting: str = "--max-pixels"):
        super().__init__(reason, setting)  # both in args: the exception pickles whole

    @property
    def reason(self) -> str:
        return self.args[0]

    @property
    def setting(self) -> str:
        return self.args[1]

    def __str__(self) -> str:
        return f"{self.reason}; raise it with {self.setting}"


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int
    orientation: int = 1


def jpeg_end(data: bytes) -> int | None:
    """Where a JPEG's own bytes end: just past the end-of-image marker that closes its scans.

    Walks the marker segments (skipping each by its length, so a thumbnail inside EXIF does
    not count) and each scan's entropy-coded data (where 0xFF is followed by a stuffed 0x00,
    a restart marker or fill bytes). Whatever follows the marker, such as the video of a
    phone's motion photo or trailing junk, is not part of the image; decoders stop there too.

    Returns:
        The offset after the end-of-image marker, or None if the data ends before it.
    """
    n, pos = len(data), 2
    if data[:2] != b"\xff\xd8":
        return None
    while pos + 1 < n:
        if data[pos] != 0xFF:
            return None  # not at a marker: damaged
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
        elif marker == 0xD9:
            return pos + 2
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            pos += 2
        elif pos + 4 > n:
            return None
        else:
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
            if marker == 0xDA:  # start of scan: entropy-coded data up to the next real marker
                pos = _scan_end(data, pos)
                if pos is None:
                    return None
    return None


def _scan_end(data: bytes, pos: int) -> int | None:
    """The offset of the first marker after entropy-coded data starting at ``pos``."""
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(data):
            return None
        follower = data[pos + 1]
        if follower == 0x00 or 0xD0 <= follower <= 0xD7:  # stuffed byte, restart marker
            pos += 2
        elif follower == 0xFF:  # fill bytes
            pos += 1
        else:
            return pos


def _check_complete(fmt: str, data: bytes) -> None:
    if fmt == "JPEG" and jpeg_end(data) is None:
        raise ImageError("truncated JPEG (its scans end before an end-of-image marker)")
    if fmt == "PNG" and b"IEND" not in data.rstrip(b"\0")[-16:]:
        raise ImageError("truncated PNG (no IEND chunk)")
    if fmt == "WEBP":
        (riff_size,) = struct.unpack("<I", data[4:8])
        if len(data) < riff_size + 8:
            raise ImageError("truncated WebP (shorter than its RIFF size)")


def probe_image(data: bytes, *, decode: bool = False, max_pixels: int | None = None,
                batch_pixels: int | None = None) -> ImageInfo:
    """Read an encoded image's format and displayed size, and check that it is whole.

    Args:
        data: The encoded bytes.
        decode: Also decode every pixel (slow, thorough).
        max_pixels: Larger images are rejected before any pixel is decoded (default ``MAX_PIXELS``).
        batch_pixels: Larger images are rejected too, as more than a batch may decode (no limit
            when None).

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
            limit = MAX_PIXELS if max_pixels is None else max_pixels
            if width * height > limit:
                raise ImageTooLarge(f"{width}x{height} is {width * height:,} pixels, over the limit of {limit:,} "
                                    "that guards against decompression bombs")
            if batch_pixels is not None and width * height > batch_pixels:
                raise ImageTooLarge(f"{width}x{height} is {width * height:,} pixels, more than one batch may "
                                    f"decode ({batch_pixels:,})", "--batch-pixels")
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
