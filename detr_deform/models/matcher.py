"""Hungarian matching of predictions to ground truth (official cost)."""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from detr_deform.utils.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher(nn.Module):
    """Per image, C = cost_class * focal-class cost + cost_bbox * L1(cxcywh)
    + cost_giou * (-GIoU(xyxy)), solved with scipy's linear_sum_assignment.

    The focal class cost at the target class is
    alpha (1-p)^gamma (-log(p + 1e-8)) - (1-alpha) p^gamma (-log(1-p + 1e-8)).
    Costs are computed in float32 even under autocast.
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matcher costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """outputs: pred_logits (B, Q, K), pred_boxes (B, Q, 4); targets: per image
        labels (T_i,), boxes (T_i, 4). Returns per image (query indices, target
        indices), each int64 of length min(Q, T_i)."""
        with torch.autocast(device_type=outputs["pred_logits"].device.type, enabled=False):
            batch, num_queries = outputs["pred_logits"].shape[:2]
            out_prob = outputs["pred_logits"].flatten(0, 1).float().sigmoid()
            out_bbox = outputs["pred_boxes"].flatten(0, 1).float()
            tgt_ids = torch.cat([t["labels"] for t in targets])
            tgt_bbox = torch.cat([t["boxes"] for t in targets]).float()
            if tgt_ids.numel() == 0:
                empty = torch.empty(0, dtype=torch.int64)
                return [(empty, empty) for _ in targets]
            alpha, gamma = self.focal_alpha, self.focal_gamma
            neg_cost_class = (1 - alpha) * (out_prob ** gamma) * (-(1 - out_prob + 1e-8).log())
            pos_cost_class = alpha * ((1 - out_prob) ** gamma) * (-(out_prob + 1e-8).log())
            cost_class = pos_cost_class[:, tgt_ids] - neg_cost_class[:, tgt_ids]
            cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
            cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox))
            cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
            cost = cost.view(batch, num_queries, -1).cpu()
        if not torch.isfinite(cost).all():
            raise FloatingPointError(
                "Hungarian matcher: the cost matrix has NaN/inf entries (non-finite predicted boxes or logits)"
            )
        sizes = [len(t["boxes"]) for t in targets]
        indices = [linear_sum_assignment(c[i]) for i, c in enumerate(cost.split(sizes, -1))]
        return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in indices]
