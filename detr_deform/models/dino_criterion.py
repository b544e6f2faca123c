"""DINO's losses: Deformable DETR's matched losses (final layer and auxiliary layers),
the interm losses of the selected encoder tokens (real class labels), and the
denoising losses of every layer (no matching: positive slot g·2M + t learns box t;
negatives and padding learn "no object"), normalised by num_boxes · G."""
from __future__ import annotations

import torch

from detr_deform.models.criterion import SetCriterion, _to_float, box_normalizer
from detr_deform.models.denoising import denoising_pairs

DN_TERMS = ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error")


def build_dino_weight_dict(cls_loss_coef: float, bbox_loss_coef: float, giou_loss_coef: float, dec_layers: int,
                           aux_loss: bool, use_dn: bool, interm_loss_coef: float = 1.0,
                           no_interm_box_loss: bool = False) -> dict[str, float]:
    """The original's weight dict: 39 terms for 6 layers with denoising (final, _dn,
    _0…_4 and _dn_0…_dn_4, _interm)."""
    base = {"loss_ce": cls_loss_coef, "loss_bbox": bbox_loss_coef, "loss_giou": giou_loss_coef}
    per_layer = dict(base)
    if use_dn:
        per_layer.update({f"{k}_dn": v for k, v in base.items()})
    weight_dict = dict(per_layer)
    if aux_loss:
        for i in range(dec_layers - 1):
            weight_dict.update({f"{k}_{i}": v for k, v in per_layer.items()})
    box = 0.0 if no_interm_box_loss else 1.0
    weight_dict.update({f"{k}_interm": v * interm_loss_coef * (1.0 if k == "loss_ce" else box)
                        for k, v in base.items()})
    return weight_dict


class DINOCriterion(SetCriterion):
    """Computes the UNWEIGHTED loss terms of a DINO output dict; ``weight_dict`` holds
    their coefficients. Keys: those of SetCriterion (final ``loss_*`` and ``_i``), plus
    ``_interm``, and with ``use_dn`` ``_dn`` / ``_dn_i`` — zeros (in the graph's
    dtype and device) when the batch has no denoising part, so the keys never change."""

    def __init__(self, *args, use_dn: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.use_dn = use_dn

    def forward(self, outputs: dict, targets: list[dict], num_boxes: float | None = None) -> dict[str, torch.Tensor]:
        device = outputs["pred_logits"].device
        if num_boxes is None:
            num_boxes = box_normalizer(sum(len(t["labels"]) for t in targets), device)
        matched = {k: v for k, v in outputs.items() if k in ("pred_logits", "pred_boxes", "aux_outputs")}
        losses = super().forward(matched, targets, num_boxes=num_boxes)
        with torch.autocast(device_type=device.type, enabled=False):
            if "interm_outputs" in outputs:
                interm = _to_float(outputs["interm_outputs"])
                losses.update({f"{k}_interm": v for k, v in self._all_losses(
                    interm, targets, self.matcher(interm, targets), num_boxes, log=False).items()})
            if self.use_dn:
                losses.update(self._denoising_losses(outputs, targets, num_boxes, device))
        return losses

    def _denoising_losses(self, outputs: dict, targets: list[dict], num_boxes: float,
                          device: torch.device) -> dict[str, torch.Tensor]:
        layers = 1 + len(outputs.get("aux_outputs", []))
        suffixes = ["_dn"] + [f"_dn_{i}" for i in range(layers - 1)]
        if "dn_outputs" not in outputs:
            zero = torch.zeros((), device=device)
            return {f"{k}{s}": zero for s in suffixes for k in DN_TERMS}
        meta = outputs["dn_meta"]
        dn = _to_float(outputs["dn_outputs"])
        pairs = denoising_pairs(targets, meta["pad_size"], meta["num_dn_group"], device)
        normaliser = num_boxes * meta["num_dn_group"]
        losses = {}
        for suffix, layer in zip(suffixes, [dn] + dn.get("aux_outputs", [])):
            layer = {k: v for k, v in layer.items() if k != "aux_outputs"}
            losses.update({f"{k}{suffix}": v for k, v in
                           self._all_losses(layer, targets, pairs, normaliser, log=False).items()})
        return losses
