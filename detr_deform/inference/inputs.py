"""What the Detector accepts as images, turned into (3, H, W) tensors.

Every input becomes one or more :class:`ImageInput` (a name for messages and a
loader), checked when the inputs are listed — so a bad item of a long list fails
at once, naming it — and decoded only when its batch runs:

- ``str`` / ``os.PathLike`` (``~`` expanded): an image file (any PIL mode, EXIF
  orientation applied, via :func:`detr_deform.data.images.load_rgb_image`) or a
  folder (its image files, sorted by name, not recursive). A video file is refused with a
  pointer to :func:`detr_deform.detect_video` and ``tools/infer.py``.
- ``PIL.Image.Image``: any mode (RGB, RGBA, L, LA, P, CMYK, YCbCr, 16-bit, 32-bit,
  float), EXIF orientation applied (images from ``Image.open`` keep it).
- ``numpy.ndarray``: (H, W) grayscale or (H, W, C) with C = 1, 3 (RGB) or 4 (RGBA,
  alpha dropped); uint8 (0-255) or floating point (0-1).
- ``torch.Tensor``: (C, H, W) with C = 1 or 3 (RGB), or a (B, C, H, W) batch; uint8
  (0-255) or floating point (0-1). Left on its device.
- a list or tuple of these (folders and batches expand in place).

Loaders return (3, H, W) uint8, or float32 in [0, 1] for floating-point arrays and
tensors (kept as floats so that nothing is rounded to 8 bits).
"""
from __future__ import annotations

import glob
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from detr_deform.data import images
from detr_deform.data.images import load_rgb_image
from detr_deform.errors import DetrDeformError


class InputError(DetrDeformError, ValueError):
    """An input image (array, tensor, file) is unusable; the message names it and what is expected."""


class InputTypeError(DetrDeformError, TypeError):
    """An input of a type the Detector does not take; the message lists the accepted ones."""


class MissingInputError(DetrDeformError, FileNotFoundError):
    """An image path, folder or pattern that matches no image file."""


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")

ImageLike = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor
Inputs = ImageLike | Sequence[ImageLike]

_ACCEPTED = "a path, a folder, a PIL image, a numpy array, a torch tensor or a list of these"


@dataclass(frozen=True)
class ImageInput:
    """One image: ``source`` names it (file path, or ``inputs[i]`` for in-memory
    images); ``load()`` returns it as a (3, H, W) uint8 or float32 (0-1) tensor."""
    source: str
    load: Callable[[], torch.Tensor]


def image_inputs(inputs: Inputs) -> list[ImageInput]:
    """The images in ``inputs`` (see the module docstring), in order. Raises
    FileNotFoundError (missing path, folder without images), TypeError
    (unsupported type) or ValueError (unusable array or tensor, a video file),
    each in one line naming the input."""
    if isinstance(inputs, (list, tuple)):
        named = [(f"inputs[{i}]", item) for i, item in enumerate(inputs)]
        if not named:
            raise InputError("no images: the input list is empty")
    else:
        named = [("input", inputs)]
    found: list[ImageInput] = []
    for name, item in named:
        found.extend(_expand(item, name))
    return found


def _expand(item: Any, name: str) -> list[ImageInput]:
    if isinstance(item, (str, os.PathLike)):
        return _path_inputs(Path(item).expanduser())
    if isinstance(item, Image.Image):
        return [ImageInput(name, lambda: pil_to_tensor(item))]
    if isinstance(item, np.ndarray):
        return [ImageInput(name, _constant(array_to_tensor(item, name)))]
    if isinstance(item, torch.Tensor):
        if item.dim() == 4:  # a batch: one image per entry
            return [ImageInput(f"{name}[{b}]", _constant(tensor_to_image(image, f"{name}[{b}]")))
                    for b, image in enumerate(item)]
        return [ImageInput(name, _constant(tensor_to_image(item, name)))]
    if isinstance(item, (list, tuple)):
        raise InputTypeError(f"{name}: a nested list; pass one flat list of images")
    raise InputTypeError(f"{name}: unsupported input of type {type(item).__name__}; expected {_ACCEPTED}")


def _constant(tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A loader for an image already in memory (arrays and tensors are views: no copy to defer)."""
    return lambda: tensor


def _path_inputs(path: Path) -> list[ImageInput]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise MissingInputError(f"no image files in folder {path} (looked for {', '.join(IMAGE_SUFFIXES)})")
        return [_file_input(p) for p in files]
    if not path.exists():
        raise MissingInputError(f"no such image file or folder: {path}")
    if path.suffix.lower() in VIDEO_SUFFIXES:
        raise InputError(f"{path} is a video, not an image: use "
                         f"detr_deform.detect_video(detector, path) "
                         f"or tools/infer.py {path.name} --draw")
    return [_file_input(path)]


def _file_input(path: Path) -> ImageInput:
    # load_rgb_image: every PIL mode, EXIF orientation, decompression bombs -> DatasetError naming the file
    return ImageInput(str(path), lambda: pil_to_tensor(load_rgb_image(path), exif=False))


def to_rgb(image: Image.Image, exif: bool = True) -> Image.Image:
    """A PIL image of any mode as 8-bit RGB (the rule of :func:`detr_deform.data.images.to_rgb`),
    EXIF orientation applied (``exif``)."""
    return images.to_rgb(ImageOps.exif_transpose(image) if exif else image)


def pil_to_tensor(image: Image.Image, exif: bool = True) -> torch.Tensor:
    """PIL image (any mode) -> (3, H, W) uint8 tensor."""
    array = np.asarray(to_rgb(image, exif))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def array_to_tensor(array: np.ndarray, name: str = "input") -> torch.Tensor:
    """(H, W) or (H, W, 1|3|4) uint8 or float (0-1) array -> (3, H, W) tensor (a view
    when possible)."""
    described = f"{name}: numpy array of shape {tuple(array.shape)} and dtype {array.dtype}"
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        hint = "; channels first? use array.transpose(1, 2, 0)" if array.ndim == 3 and array.shape[0] in (1, 3, 4) \
            else ""
        raise InputError(f"{described}: expected (H, W) or (H, W, C) with C = 1, 3 (RGB) or 4 (RGBA){hint}")
    if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.floating):
        raise InputError(f"{described}: expected uint8 (0-255) or floating point (0-1) values; convert it, e.g. "
                         f"to uint8, first")
    array = np.ascontiguousarray(array[:, :, :3])
    if not array.flags.writeable:  # e.g. np.asarray(pil_image); torch warns about sharing read-only memory
        array = array.copy()
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    return tensor_to_image(tensor, name, described)


def tensor_to_image(tensor: torch.Tensor, name: str = "input", described: str | None = None) -> torch.Tensor:
    """(1|3, H, W) uint8 or float (0-1) tensor -> (3, H, W) uint8 or float32 tensor."""
    described = described or f"{name}: tensor of shape {tuple(tensor.shape)} and dtype {tensor.dtype}"
    if tensor.dim() != 3 or tensor.shape[0] not in (1, 3):
        hint = "; channels last? use tensor.permute(2, 0, 1)" if tensor.dim() == 3 and tensor.shape[-1] in (1, 3) \
            else ""
        raise InputError(f"{described}: expected (C, H, W) with C = 1 or 3 (RGB), or a (B, C, H, W) batch{hint}")
    if tensor.shape[1] == 0 or tensor.shape[2] == 0:
        raise InputError(f"{described}: the image is empty")
    if tensor.dtype == torch.uint8:
        return tensor if tensor.shape[0] == 3 else tensor.expand(3, -1, -1).contiguous()
    if not tensor.is_floating_point():
        raise InputError(f"{described}: expected uint8 (0-255) or floating point (0-1) values")
    tensor = tensor.detach().float()
    low, high = float(tensor.min()), float(tensor.max())
    if not (0.0 <= low and high <= 1.0):  # also catches NaN
        raise InputError(f"{described}: floating-point images take values in [0, 1], these range over "
                         f"[{low:.3g}, {high:.3g}] (already normalised? pass the image before normalisation)")
    return tensor if tensor.shape[0] == 3 else tensor.expand(3, -1, -1).contiguous()


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) uint8 or float (0-1) tensor -> RGB PIL image."""
    if image.is_floating_point():
        image = (image * 255).round().to(torch.uint8)
    return Image.fromarray(image.detach().cpu().permute(1, 2, 0).contiguous().numpy(), mode="RGB")


def collect_images(sources: Sequence[str], suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Files from paths, folders (not recursive) and glob patterns, in a stable
    order, each once (for the tools). Folders and patterns contribute the files
    with one of ``suffixes``; a file named explicitly is taken whatever its suffix.
    A source that matches nothing raises FileNotFoundError."""
    found: list[Path] = []
    seen: set[Path] = set()
    for source in sources:
        path = Path(source)
        if path.is_dir():
            matches = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).suffix.lower() in suffixes)
        if not matches:
            raise MissingInputError(f"no image files found for {source!r} (a file, a folder or a glob pattern)")
        for match in matches:
            if match not in seen:
                seen.add(match)
                found.append(match)
    return found


def other_files(sources: Sequence[str], suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Path]:
    """The files of the folders among ``sources`` that :func:`collect_images` leaves
    out (no suffix of ``suffixes``), sorted, for the tools to report as skipped;
    hidden files (a name starting with ".", e.g. .DS_Store) are not listed."""
    found: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() not in suffixes
                                and not p.name.startswith(".")))
    return found


def is_video_file(path: Path) -> bool:
    """By suffix; a file with neither an image nor a video suffix is a video when
    PIL cannot identify it (PyAV then opens it, or says why not)."""
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES or suffix in IMAGE_SUFFIXES:
        return suffix in VIDEO_SUFFIXES
    try:
        with Image.open(path):
            return False
    except Image.DecompressionBombError:  # an image, too large: load_rgb_image says so
        return False
    except (OSError, ValueError):
        return True


__all__ = ["IMAGE_SUFFIXES", "VIDEO_SUFFIXES", "ImageInput", "ImageLike", "InputError", "InputTypeError", "Inputs",
           "MissingInputError", "array_to_tensor", "collect_images", "image_inputs", "is_video_file", "other_files",
           "pil_to_tensor", "tensor_to_image", "tensor_to_pil", "to_rgb"]
