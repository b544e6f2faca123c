"""COCO-format detection dataset (images folder + instances JSON)."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torchvision import tv_tensors


class DatasetError(ValueError):
    """A dataset file or annotation is unusable; the message names it."""


def load_coco_json(annotation_file: str | Path):
    """pycocotools COCO index, quiet, with clear errors for missing/broken files."""
    from pycocotools.coco import COCO

    path = Path(annotation_file)
    if not path.is_file():
        raise DatasetError(f"annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            content = json.load(handle)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path}: not valid JSON ({error})") from error
    for key in ("images", "annotations", "categories"):
        if key not in content:
            raise DatasetError(f"{path}: missing required top-level key '{key}' (COCO instances format)")
    coco = COCO()
    coco.dataset = content
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoDetection(torch.utils.data.Dataset):
    """Returns (image, target) with target = {boxes: tv_tensors.BoundingBoxes (XYXY,
    absolute), labels (int64), image_id, orig_size (h, w)} before transforms;
    the transforms produce a normalised image and normalised cxcywh boxes.

    Crowd annotations are dropped, boxes converted from xywh to xyxy, clamped to
    the image and degenerate ones removed (official ConvertCocoPolysToMask).
    """

    def __init__(self, image_folder: str | Path, annotation_file: str | Path,
                 transforms: Callable | None = None) -> None:
        self.image_folder = Path(image_folder)
        if not self.image_folder.is_dir():
            raise DatasetError(f"image folder not found: {self.image_folder}")
        self.annotation_file = Path(annotation_file)
        self.coco = load_coco_json(annotation_file)
        self.ids = sorted(self.coco.imgs.keys())
        self.transforms = transforms
        categories = self.coco.dataset["categories"]
        if not categories:
            raise DatasetError(f"{self.annotation_file}: 'categories' is empty")
        self.category_names = {int(c["id"]): str(c.get("name", c["id"])) for c in categories}

    @property
    def num_classes(self) -> int:
        """Official convention: max category id + 1 (91 for COCO)."""
        return max(self.category_names) + 1

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, image_id: int) -> Image.Image:
        info = self.coco.imgs[image_id]
        path = self.image_folder / info["file_name"]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except FileNotFoundError as error:
            raise DatasetError(f"image {image_id}: file not found: {path}") from error
        except OSError as error:
            raise DatasetError(f"image {image_id}: cannot read {path}: {error}") from error

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        image = self.load_image(image_id)
        width, height = image.size
        annotations = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        boxes = torch.as_tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(min=0, max=width)
        boxes[:, 1::2].clamp_(min=0, max=height)
        labels = torch.as_tensor([a["category_id"] for a in annotations], dtype=torch.int64)
        keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes[keep], format="XYXY", canvas_size=(height, width)),
            "labels": labels[keep],
            "image_id": torch.tensor(image_id),
            "orig_size": torch.tensor([height, width]),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def collate_fn(batch):
    """List of (image, target) -> (list of images, list of targets); the model pads."""
    images, targets = zip(*batch)
    return list(images), list(targets)
