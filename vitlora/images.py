"""Decoding real-world image files into RGB, or saying precisely why a file cannot be used.

Product photos arrive as CMYK JPEGs, 16-bit PNGs, palette GIFs, transparent PNGs, grayscale
scans, thumbnails and the odd truncated upload. Everything that can be converted faithfully is;
the rest raises :class:`BadImage` with the reason, for the caller to skip or fail on.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

MIN_SIDE = 8  # smaller images carry no usable signal at ViT resolutions
MAX_PIXELS = 64_000_000  # well above any product photo; PIL's own bomb guard is 89M/179M
_WHITE = (255, 255, 255)


class BadImage(ValueError):
    """An image file that cannot be decoded into a usable RGB picture."""


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Opens ``path`` fully decoded as 8-bit RGB; transparency is flattened onto white."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise BadImage(f"{path}: {width}x{height} pixels is decompression-bomb sized")
                if min(width, height) < MIN_SIDE:
                    raise BadImage(f"{path}: {width}x{height} is too small (< {MIN_SIDE} px)")
                image.load()
                return to_rgb(image)
    except BadImage:
        raise
    except FileNotFoundError as error:
        raise BadImage(f"{path}: no such file") from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadImage(f"{path}: decompression-bomb sized ({error})") from error
    except UnidentifiedImageError as error:
        raise BadImage(f"{path}: not a recognised image format") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise BadImage(f"{path}: corrupt or truncated ({error})") from error


def to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") else max(float(values.max()), 1.0)
        image = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low if high > low else 1.0) * 255.0
        image = Image.fromarray(scaled.astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")
