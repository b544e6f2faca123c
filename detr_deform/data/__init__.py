"""Datasets (COCO format), the official augmentations, and the built-in demo data.
The exports are imported on first use (utils/lazy.py): the light modules (schema, demo, sizes)
load without torch."""
from typing import TYPE_CHECKING

from detr_deform.utils.lazy import lazy_exports

if TYPE_CHECKING:
    from detr_deform.data.coco import CocoDetection, collate_fn
    from detr_deform.data.transforms import build_transforms

__getattr__, __dir__ = lazy_exports(__name__, {"CocoDetection": "detr_deform.data.coco",
                                               "collate_fn": "detr_deform.data.coco",
                                               "build_transforms": "detr_deform.data.transforms"})

__all__ = ["CocoDetection", "build_transforms", "collate_fn"]
