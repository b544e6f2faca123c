"""Decoding image files as 8-bit RGB, whatever their mode, EXIF orientation
or size claims; one DatasetError naming the file for anything unreadable."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from detr_deform.data.errors import DatasetError

WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_EXIF_ORIENTATION = 0x0112
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB (grayscale, palette, CMYK, RGBA, 16-bit, float).

    Alpha is dropped; a palette with a transparent entry goes through RGBA so that
    the transparent colour is the palette's. 16-bit, 32-bit and float images keep
    8-bit values as they are and scale wider data by its bit depth."""
    if image.mode in WIDE_MODES:
        array = np.asarray(image, dtype=np.float64)
        peak = float(array.max(initial=0))
        # 8-bit values stored in a wide mode stay as they are; 10/12/16-bit data is scaled by its bit depth
        high = 255.0 if peak <= 255 else float(2 ** math.ceil(math.log2(peak + 1)) - 1)
        array = np.clip(array / high * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode == "La":  # premultiplied alpha: PIL converts it to RGB only through LA
        image = image.convert("LA")
    return image.convert("RGB")


def load_rgb_image(path: Path, expected_size: tuple[int, int] | None = None, where: str = "") -> Image.Image:
    """Decodes ``path`` fully as RGB. EXIF orientation is applied when that makes
    the image agree with ``expected_size`` (width, height from the JSON) — or
    when the JSON gives no size — and ignored when the JSON size matches the
    stored pixels (the annotations were then made on the unrotated image).
    Raises DatasetError naming the file for missing, unreadable, truncated or
    wrongly-sized images."""
    prefix = f"{where}: " if where else ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                stored = image.size
                rotated = ImageOps.exif_transpose(image)
                if expected_size is None or rotated.size == tuple(expected_size):
                    result = rotated
                elif stored == tuple(expected_size):
                    result = image
                else:
                    raise DatasetError(
                        f"{prefix}{path}: the JSON says {expected_size[0]}x{expected_size[1]} (width x height) but "
                        f"the file is {stored[0]}x{stored[1]}; the boxes would land in the wrong place. Fix the "
                        f"'width'/'height' of this image in the JSON or replace the file", kind="size_mismatch")
                return to_rgb(result)
    except DatasetError:
        raise
    except FileNotFoundError as error:
        raise DatasetError(f"{prefix}image file not found: {path}", kind="missing_file") from error
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        # PIL warns above MAX_IMAGE_PIXELS and raises above twice that, from the header alone.
        raise DatasetError(f"{prefix}refusing to decode image {path}: {error} (raise PIL.Image.MAX_IMAGE_PIXELS if the "
                           f"file is trusted)", kind="unreadable_image") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise DatasetError(f"{prefix}cannot read image {path}: {error} (corrupt or truncated file?)",
                           kind="unreadable_image") from error


def oriented_size(path: Path) -> tuple[int, int]:
    """(width, height) after the EXIF orientation, from the file's header."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(_EXIF_ORIENTATION)
    except FileNotFoundError as error:
        raise DatasetError(f"image file not found: {path}", kind="missing_file") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise DatasetError(f"cannot read image {path}: {error} (corrupt or truncated file?)",
                           kind="unreadable_image") from error
    return (height, width) if orientation in _ROTATED else (width, height)
