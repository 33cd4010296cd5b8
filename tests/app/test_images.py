"""Image intake: unusual but valid files decode to the right RGB picture; broken ones are refused clearly."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from app.errors import ApiError
from app.images import decode_image
from tests.app.conftest import image_bytes

LIMIT = 10_000_000


def decode(data: bytes) -> Image.Image:
    return decode_image(data, "test", LIMIT)


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height, with no pixel data: a decompression-bomb stand-in."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    values = np.full((8, 8), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, "PNG")
    image = decode(buffer.getvalue())
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (128, 128, 128)


@pytest.mark.parametrize(
    ("data", "pixel"),
    [
        (image_bytes((0, 255, 255, 0), fmt="JPEG", mode="CMYK"), None),
        (image_bytes(5, fmt="PNG", mode="P", transparency=5), None),
        (image_bytes((10, 20, 30, 0), fmt="PNG", mode="RGBA"), (10, 20, 30)),
        (image_bytes((90, 255), fmt="PNG", mode="LA"), (90, 90, 90)),
        (image_bytes(1, fmt="PNG", mode="1"), (255, 255, 255)),
        (image_bytes(77, fmt="JPEG", mode="L"), None),
        (image_bytes((1, 2, 3), size=(1, 1), fmt="PNG"), (1, 2, 3)),
        (image_bytes((200, 10, 10), fmt="WEBP", lossless=True), (200, 10, 10)),
    ],
    ids=["cmyk-jpeg", "palette-transparent", "rgba", "la", "1-bit", "grey-jpeg", "1x1", "webp"],
)
def test_unusual_modes_become_rgb(data, pixel):
    image = decode(data)
    assert image.mode == "RGB"
    if pixel is not None:
        assert image.getpixel((0, 0)) == pixel


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (16, 16), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert decode(buffer.getvalue()).getpixel((0, 0)) == (255, 0, 0)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image = decode(image_bytes(size=(40, 20), fmt="JPEG", exif=exif))
    assert image.size == (20, 40)


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"", 422),
        (b"just some text", 415),
        (image_bytes(fmt="TIFF"), 415),  # a real image, but not an accepted format
        (image_bytes(fmt="PNG")[:60], 422),  # truncated
        (png_header_only(5000, 5000), 413),  # above our limit
        (png_header_only(30000, 30000), 413),  # above Pillow's own bomb limit too
    ],
    ids=["empty", "text", "tiff", "truncated-png", "bomb", "huge-bomb"],
)
def test_refusals(data, status):
    with pytest.raises(ApiError) as info:
        decode(data)
    assert info.value.status_code == status and info.value.message.startswith("test: ")
