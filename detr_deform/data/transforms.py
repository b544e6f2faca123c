"""The official Deformable DETR augmentations on torchvision transforms.v2.

train: horizontal flip, then with p = 0.5 either a random resize of the shorter
side to one of ``scales`` (longer side <= max_size) or [random resize to
``crop_resize_sizes``, random crop with sides in [crop_min, crop_max], random
resize as before]; val: shorter side ``val_size`` (longer <= max_size). Then
ImageNet normalisation and boxes as normalised (cx, cy, w, h).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from detr_deform.data.sizes import (  # noqa: F401  (their home for the users of the transforms)
    OFFICIAL_CROP_MAX,
    OFFICIAL_CROP_MIN,
    OFFICIAL_CROP_RESIZE_SIZES,
    OFFICIAL_MAX_SIZE,
    OFFICIAL_TRAIN_SCALES,
    OFFICIAL_VAL_SIZE,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def official_resize_size(height: int, width: int, size: int, max_size: int | None) -> tuple[int, int]:
    """Shorter side to ``size`` unless the longer would exceed ``max_size``
    (official get_size_with_aspect_ratio, including its rounding). For extreme aspect
    ratios (e.g. 5000x2) the official rounding reaches 0 pixels and the resize fails;
    here the shorter side is at least 1 pixel (the longer side may then exceed ``max_size``).
    Every size the official rule gives above 0 is unchanged."""
    if max_size is not None:
        short, long = float(min(width, height)), float(max(width, height))
        if long / short * size > max_size:
            size = max(1, int(round(max_size * short / long)))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


class RandomResize(v2.Transform):
    def __init__(self, sizes: Sequence[int], max_size: int | None = None) -> None:
        super().__init__()
        self.sizes = list(sizes)
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        size = self.sizes[int(torch.randint(len(self.sizes), ()))]
        return {"size": official_resize_size(height, width, size, self.max_size)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=list(params["size"]), antialias=True)


class RandomSizeCrop(v2.Transform):
    """Crop of random height/width in [min_size, min(side, max_size)] at a random place."""

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        self.min_size = min_size
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        crop_w = int(torch.randint(min(self.min_size, width), min(width, self.max_size) + 1, ()))
        crop_h = int(torch.randint(min(self.min_size, height), min(height, self.max_size) + 1, ()))
        top = int(torch.randint(0, height - crop_h + 1, ()))
        left = int(torch.randint(0, width - crop_w + 1, ()))
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


class FinalizeTarget(v2.Transform):
    """Boxes -> normalised cxcywh plain tensor; records the network input size."""

    def forward(self, image, target):
        height, width = image.shape[-2:]
        boxes = target["boxes"]
        cxcywh = F.convert_bounding_box_format(boxes, new_format=tv_tensors.BoundingBoxFormat.CXCYWH)
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        target = dict(target)
        target["boxes"] = cxcywh.as_subclass(torch.Tensor) / scale
        target["size"] = torch.tensor([height, width])
        return image, target


class DropEmptyBoxes(v2.Transform):
    """Official crop rule: keep boxes with x1 > x0 and y1 > y0 after clamping to the
    image (torchvision's SanitizeBoundingBoxes also drops boxes under 1 px)."""

    def forward(self, image, target):
        boxes = target["boxes"]
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target = dict(target)
        target["boxes"] = tv_tensors.wrap(boxes[keep], like=boxes)
        target["labels"] = target["labels"][keep]
        return image, target


def _sanitize() -> v2.Transform:
    return v2.Compose([v2.ClampBoundingBoxes(), DropEmptyBoxes()])


def build_transforms(split: str, scales: Sequence[int] = OFFICIAL_TRAIN_SCALES, max_size: int = OFFICIAL_MAX_SIZE,
                     val_size: int = OFFICIAL_VAL_SIZE, crop_resize_sizes: Sequence[int] = OFFICIAL_CROP_RESIZE_SIZES,
                     crop_min: int = OFFICIAL_CROP_MIN, crop_max: int = OFFICIAL_CROP_MAX) -> v2.Transform:
    normalize = v2.Compose([
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        FinalizeTarget(),
    ])
    if split == "train":
        return v2.Compose([
            v2.RandomHorizontalFlip(),
            v2.RandomChoice([
                RandomResize(scales, max_size=max_size),
                v2.Compose([
                    RandomResize(crop_resize_sizes),
                    RandomSizeCrop(crop_min, crop_max),
                    _sanitize(),
                    RandomResize(scales, max_size=max_size),
                ]),
            ]),
            normalize,
        ])
    if split == "val":
        return v2.Compose([RandomResize([val_size], max_size=max_size), normalize])
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")
