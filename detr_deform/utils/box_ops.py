"""Box helpers. Boxes are (cx, cy, w, h) or (x0, y0, x1, y1), last axis 4."""
from __future__ import annotations

import torch
from torchvision.ops import box_convert
from torchvision.ops import generalized_box_iou as _generalized_box_iou


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(boxes, "cxcywh", "xyxy")


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU of xyxy boxes: (N, 4), (M, 4) -> (N, M)."""
    return _generalized_box_iou(boxes1, boxes2)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """log(x / (1 - x)) with x clamped to [0, 1] and both terms to >= eps (official)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
