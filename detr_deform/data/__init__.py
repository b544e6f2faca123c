"""Datasets (COCO format), the official augmentations, and the built-in demo data."""
from detr_deform.data.coco import CocoDetection, collate_fn
from detr_deform.data.transforms import build_transforms

__all__ = ["CocoDetection", "build_transforms", "collate_fn"]
