"""Set criterion: sigmoid focal classification loss + L1 + GIoU box losses,
with auxiliary-layer and two-stage encoder losses (official definitions)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from detr_deform.models.matcher import HungarianMatcher
from detr_deform.utils.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from detr_deform.utils.distributed import all_reduce_sum, world_size


def build_weight_dict(cls_loss_coef: float, bbox_loss_coef: float, giou_loss_coef: float, dec_layers: int,
                      aux_loss: bool, two_stage: bool) -> dict[str, float]:
    base = {"loss_ce": cls_loss_coef, "loss_bbox": bbox_loss_coef, "loss_giou": giou_loss_coef}
    weight_dict = dict(base)
    if aux_loss:
        for i in range(dec_layers - 1):
            weight_dict.update({f"{k}_{i}": v for k, v in base.items()})
    if two_stage:
        weight_dict.update({f"{k}_enc": v for k, v in base.items()})
    return weight_dict


class SetCriterion(nn.Module):
    """Computes the UNWEIGHTED loss terms; ``weight_dict`` holds their coefficients.

    Keys: loss_ce, loss_bbox, loss_giou, class_error, cardinality_error for the
    final layer; the same with suffix ``_i`` for decoder layer i < D-1 (no
    class_error); with suffix ``_enc`` for the two-stage encoder proposals,
    which are matched to class-agnostic targets (all labels 0).
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: dict[str, float],
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @staticmethod
    def _src_permutation_idx(indices):
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        return batch_idx, src_idx

    def loss_labels(self, outputs, targets, indices, num_boxes, log=True):
        src_logits = outputs["pred_logits"]
        idx = self._src_permutation_idx(indices)
        target_classes_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(src_logits.device)
        target_classes = torch.full(src_logits.shape[:2], self.num_classes, dtype=torch.int64,
                                    device=src_logits.device)
        target_classes[idx] = target_classes_o
        # One-hot with an extra "no object" column that is dropped: unmatched queries are all zeros.
        onehot = torch.zeros([src_logits.shape[0], src_logits.shape[1], src_logits.shape[2] + 1],
                             dtype=src_logits.dtype, layout=src_logits.layout, device=src_logits.device)
        onehot.scatter_(2, target_classes.unsqueeze(-1), 1)
        onehot = onehot[:, :, :-1]
        focal = sigmoid_focal_loss(src_logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma,
                                   reduction="none")
        # Official normalisation: mean over queries, sum, / num_boxes, times num_queries.
        losses = {"loss_ce": focal.mean(1).sum() / num_boxes * src_logits.shape[1]}
        if log:
            if target_classes_o.numel() == 0:
                # Official: the accuracy of zero matches is 0, so the error is 100.
                losses["class_error"] = torch.full((), 100.0, device=src_logits.device)
            else:
                matched = src_logits[idx]
                accuracy = (matched.argmax(-1) == target_classes_o).float().mean() * 100
                losses["class_error"] = 100 - accuracy
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets, indices, num_boxes):
        """Logged only: |#queries whose argmax is not the last class - #targets|
        (the official definition, kept for comparable logs)."""
        pred_logits = outputs["pred_logits"]
        tgt_lengths = torch.as_tensor([len(t["labels"]) for t in targets], device=pred_logits.device)
        card_pred = (pred_logits.argmax(-1) != pred_logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(card_pred.float(), tgt_lengths.float())}

    def loss_boxes(self, outputs, targets, indices, num_boxes):
        idx = self._src_permutation_idx(indices)
        src_boxes = outputs["pred_boxes"][idx]
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], dim=0).to(src_boxes)
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none")
        loss_giou = 1 - torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes)))
        return {"loss_bbox": loss_bbox.sum() / num_boxes, "loss_giou": loss_giou.sum() / num_boxes}

    def _all_losses(self, outputs, targets, indices, num_boxes, log: bool) -> dict:
        losses = self.loss_labels(outputs, targets, indices, num_boxes, log=log)
        losses.update(self.loss_boxes(outputs, targets, indices, num_boxes))
        losses.update(self.loss_cardinality(outputs, targets, indices, num_boxes))
        return losses

    def forward(self, outputs: dict, targets: list[dict], num_boxes: float | None = None) -> dict[str, torch.Tensor]:
        """outputs: the model's dict; targets: per image ``labels`` (T,) int64 and
        ``boxes`` (T, 4) normalised cxcywh. ``num_boxes``: the normaliser of the
        box and class losses; by default that of ``targets`` over all ranks
        (``box_normalizer``); gradient accumulation passes that of the whole
        effective batch."""
        device = outputs["pred_logits"].device
        # Losses in float32 even under autocast.
        with torch.autocast(device_type=device.type, enabled=False):
            outputs = _to_float(outputs)
            main = {k: v for k, v in outputs.items() if k not in ("aux_outputs", "enc_outputs")}
            indices = self.matcher(main, targets)
            if num_boxes is None:
                num_boxes = box_normalizer(sum(len(t["labels"]) for t in targets), device)

            losses = self._all_losses(main, targets, indices, num_boxes, log=True)
            for i, aux in enumerate(outputs.get("aux_outputs", [])):
                aux_indices = self.matcher(aux, targets)
                losses.update({f"{k}_{i}": v for k, v in
                               self._all_losses(aux, targets, aux_indices, num_boxes, log=False).items()})
            if "enc_outputs" in outputs:
                bin_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
                enc_indices = self.matcher(outputs["enc_outputs"], bin_targets)
                losses.update({f"{k}_enc": v for k, v in
                               self._all_losses(outputs["enc_outputs"], bin_targets, enc_indices, num_boxes,
                                                log=False).items()})
        return losses


def box_normalizer(count: int, device: torch.device) -> float:
    """The official loss normaliser: target boxes summed over all ranks, divided by
    the world size (DDP then averages the gradients), at least 1."""
    num_boxes = all_reduce_sum(torch.as_tensor([float(count)], dtype=torch.float, device=device))
    return torch.clamp(num_boxes / world_size(), min=1).item()


def _to_float(outputs):
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {k: _to_float(v) for k, v in outputs.items()}
    if isinstance(outputs, list):
        return [_to_float(v) for v in outputs]
    return outputs
