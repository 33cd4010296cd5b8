"""Uploaded bytes -> an RGB Pillow image, or an `ApiError` that says why not.

Defences: only common photo decoders are enabled (rare decoders keep
producing CVEs); the pixel count is checked from the header before any pixel is decoded, because a small
file can declare a huge canvas; truncated files are errors, not silently padded.
"""

from __future__ import annotations

import io
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from app.errors import ApiError
from model_store.inference import to_rgb

FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"GIF87a": "GIF", b"GIF89a": "GIF"}


def _claimed_format(data: bytes) -> str | None:
    """The accepted format a file's magic bytes claim, to tell a corrupt photo from a non-photo."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in SIGNATURES.items() if data.startswith(magic)), None)


def image_pixels(file: BinaryIO) -> int:
    """Width x height from an upload's header, without decoding it; 0 for what is not a readable image (the
    decoder refuses it later, saying why). Leaves the file at its start."""
    try:
        with Image.open(file, formats=FORMATS) as image:
            return image.width * image.height
    except Exception:  # any header a decoder trips on
        return 0
    finally:
        file.seek(0)


def decode_image(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Decode one upload. Animated files give their first frame; EXIF orientation is applied."""
    if not data:
        raise ApiError(422, f"{name}: empty file")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        if claimed := _claimed_format(data):
            raise ApiError(422, f"{name}: corrupt {claimed} file (its header cannot be read)") from None
        raise ApiError(415, f"{name}: not an image in a supported format ({', '.join(FORMATS)})") from None
    except Image.DecompressionBombError as e:
        raise ApiError(413, f"{name}: {e}") from None
    except Exception as e:  # a broken header can trip any decoder; it is still the upload's fault
        raise ApiError(422, f"{name}: unreadable image ({e})") from None

    width, height = image.size
    if width * height > max_pixels:
        raise ApiError(413, f"{name}: {width}x{height} pixels is more than the limit of {max_pixels}")
    try:
        image.load()  # decodes the first frame only
        return to_rgb(image)
    except Exception as e:
        raise ApiError(422, f"{name}: cannot decode {image.format} image ({e})") from None
