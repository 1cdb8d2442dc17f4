"""Checks on what a client sends, each failure a :class:`RequestError` with an HTTP status and one line.

A server answers bad input with a 4xx and keeps running: nothing here raises anything else.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

from PIL import Image

from vitlora.images import BadImage, load_rgb

MAX_IMAGE_BYTES = 10_000_000  # a large phone photo is 3-8 MB
MAX_TOP_K = 100


class RequestError(ValueError):
    """A request the server refuses: ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. ``max_image_bytes`` counts the image file, before base64."""

    max_image_bytes: int = MAX_IMAGE_BYTES
    max_top_k: int = MAX_TOP_K

    @property
    def max_body_bytes(self) -> int:
        """The largest JSON body worth reading: the base64 of the largest image plus room for the fields."""
        return self.max_image_bytes * 4 // 3 + 64_000


class _Upload(io.BytesIO):
    """The uploaded bytes, named "image" in :class:`BadImage` messages (instead of an object repr)."""

    def __str__(self) -> str:
        return "image"


def decode_image(encoded: str, limits: Limits) -> Image.Image:
    """The RGB picture in ``encoded`` (base64 of an image file, optionally a ``data:`` URL).

    Raises:
        RequestError: 413 over ``limits.max_image_bytes``, 400 for bad base64 or an image
            :func:`vitlora.images.load_rgb` refuses (not an image, truncated, decompression bomb).
    """
    if encoded.startswith("data:"):
        encoded = encoded.partition(",")[2]
    if len(encoded) > limits.max_body_bytes:
        raise RequestError(413, f"image: more than {limits.max_image_bytes} bytes")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestError(400, f"image: not valid base64 ({error})") from error
    if not data:
        raise RequestError(400, "image: empty")
    if len(data) > limits.max_image_bytes:
        raise RequestError(413, f"image: {len(data)} bytes is over the limit of {limits.max_image_bytes}")
    try:
        return load_rgb(_Upload(data))
    except BadImage as error:
        raise RequestError(400, str(error)) from error


def check_top_k(top_k: int, limits: Limits) -> int:
    """``top_k`` if it is between 1 and ``limits.max_top_k``, else a 422 RequestError."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= limits.max_top_k:
        raise RequestError(422, f"top_k: must be an integer from 1 to {limits.max_top_k}, got {top_k!r}")
    return top_k
