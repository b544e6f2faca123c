"""Convert model outputs to detections in image coordinates (official PostProcess)."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import batched_nms

from detr_deform.utils.box_ops import box_cxcywh_to_xyxy


class PostProcess(nn.Module):
    """Sigmoid scores, top-k over all (query, class) pairs — one query may yield
    several labels — and boxes as absolute (x0, y0, x1, y1). Each result also
    has ``queries``, the decoder query of every detection.

    ``nms_iou`` (not in the official model, off by default): class-wise NMS on
    the top-k at this IoU. Briefly trained DETRs with few decoder layers still
    emit duplicates, which NMS removes (DETR paper, section 4.2); a well-trained
    model does not need it.
    """

    def __init__(self, num_select: int = 100, nms_iou: float | None = None) -> None:
        super().__init__()
        self.num_select = num_select
        self.nms_iou = nms_iou

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """target_sizes (B, 2) as (height, width) of the original images."""
        out_logits, out_bbox = outputs["pred_logits"], outputs["pred_boxes"]
        target_sizes = torch.as_tensor(target_sizes, device=out_logits.device)
        if target_sizes.shape != (out_logits.shape[0], 2):
            raise ValueError(
                f"target_sizes must be (B, 2) = ({out_logits.shape[0]}, 2) as (height, width), "
                f"got {tuple(target_sizes.shape)}"
            )
        prob = out_logits.sigmoid()
        k = min(self.num_select, prob.shape[1] * prob.shape[2])
        scores, topk_indexes = torch.topk(prob.view(out_logits.shape[0], -1), k, dim=1)
        topk_boxes = torch.div(topk_indexes, out_logits.shape[2], rounding_mode="floor")
        labels = topk_indexes % out_logits.shape[2]
        boxes = box_cxcywh_to_xyxy(out_bbox)
        boxes = torch.gather(boxes, 1, topk_boxes.unsqueeze(-1).repeat(1, 1, 4))
        img_h, img_w = target_sizes.unbind(1)
        scale = torch.stack([img_w, img_h, img_w, img_h], dim=1).to(boxes.dtype)
        boxes = boxes * scale[:, None, :]
        results = [{"scores": s, "labels": label, "boxes": b, "queries": q}
                   for s, label, b, q in zip(scores, labels, boxes, topk_boxes)]
        if self.nms_iou is not None:
            # batched_nms returns the kept indices by decreasing score, like the top-k order.
            results = [{k: v[batched_nms(r["boxes"].float(), r["scores"].float(), r["labels"], self.nms_iou)]
                        for k, v in r.items()} for r in results]
        return results
