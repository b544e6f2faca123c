"""Model configuration. Field names are the official command-line argument
names wherever one exists, so official scripts map one to one."""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class ModelConfig:
    # Backbone (official names)
    backbone: str = "resnet50"
    dilation: bool = False
    position_embedding: str = "sine"
    position_embedding_scale: float = 2 * math.pi
    num_feature_levels: int = 4
    # Backbone (ours)
    backbone_norm: str = "frozen_bn"          # frozen_bn | bn | sync_bn | gn
    train_backbone: bool = True               # official: lr_backbone > 0
    freeze_stem_and_layer1: bool = True
    pretrained_backbone: str | None = None    # local .pth, "torchvision" (online), or None
    # DAT backbones (backbone=dat_tiny|dat_small|dat_base)
    backbone_out_indices: list[int] | None = None    # DAT stages fed to the transformer; None: 1,2,3 (or 3)
    backbone_drop_path_rate: float | None = None     # None: the preset's (0.2 / 0.3 / 0.5)
    backbone_grad_checkpointing: bool = False        # recompute DAT blocks in backward (memory)
    dat_kwargs: dict[str, Any] = field(default_factory=dict)  # DAT constructor overrides (official key names)
    # Transformer
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 1024
    hidden_dim: int = 256
    dropout: float = 0.1
    nheads: int = 8
    num_queries: int = 300
    dec_n_points: int = 4
    enc_n_points: int = 4
    activation: str = "relu"
    attn_impl: str = "auto"                   # auto | cpp | pytorch
    # Variants
    with_box_refine: bool = False
    two_stage: bool = False
    aux_loss: bool = True
    # Classes: max category id + 1 (COCO: 91), no background logit. None: read
    # from the dataset by the training tools; build_model needs a value.
    num_classes: int | None = None
    # Matcher
    set_cost_class: float = 2.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    # Loss
    cls_loss_coef: float = 2.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    focal_alpha: float = 0.25
    # Post-processing: detections kept per image (official eval: 100).
    num_select: int = 100
    # Class-wise NMS at this IoU after the top-k (ours; official: none). For briefly trained models.
    nms_iou: float | None = None

    def validate(self) -> "ModelConfig":
        if self.two_stage and not self.with_box_refine:
            raise ValueError(
                "model.two_stage=true requires model.with_box_refine=true (the official implementation supports "
                "two-stage only with iterative box refinement)"
            )
        if self.hidden_dim % self.nheads != 0:
            raise ValueError(f"model.hidden_dim={self.hidden_dim} must be divisible by model.nheads={self.nheads}")
        if self.hidden_dim % 32 != 0:
            raise ValueError(f"model.hidden_dim={self.hidden_dim} must be a multiple of 32 (GroupNorm(32) projections)")
        if self.num_feature_levels < 1:
            raise ValueError(f"model.num_feature_levels must be >= 1, got {self.num_feature_levels}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"model.num_classes must be >= 1, got {self.num_classes}")
        if self.nms_iou is not None and not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(f"model.nms_iou must be in (0, 1] or null, got {self.nms_iou}")
        if self.backbone.startswith("dat") and self.dilation:
            raise ValueError("model.dilation (DC5) applies to ResNet backbones only, not to DAT")
        if self.attn_impl not in ("auto", "cpp", "pytorch"):
            raise ValueError(f"model.attn_impl must be auto, cpp or pytorch, got {self.attn_impl!r}")
        return self

    @classmethod
    def from_dict(cls, values: dict[str, Any], validate: bool = True) -> "ModelConfig":
        """Unknown keys are refused here; values are checked by ``validate`` (now, or
        when ``build_model`` receives the config)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s) {unknown}; valid keys: {sorted(known)}")
        config = cls(**values)
        return config.validate() if validate else config

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_official_args(cls, args: argparse.Namespace | dict, num_classes: int | None = None,
                           validate: bool = True) -> "ModelConfig":
        """Maps the official ``args`` of a model-zoo checkpoint onto a ModelConfig."""
        values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
        config = cls()
        for f in fields(cls):
            if f.name in values and values[f.name] is not None:
                setattr(config, f.name, values[f.name])
        if "lr_backbone" in values:
            config.train_backbone = values["lr_backbone"] > 0
        if values.get("masks"):
            raise ValueError("official checkpoints with segmentation heads (masks=True) are not supported")
        if num_classes is None:
            dataset = values.get("dataset_file", "coco")
            num_classes = {"coco": 91, "coco_panoptic": 250}.get(dataset, 2)  # official build()
        config.num_classes = num_classes
        config.pretrained_backbone = None
        return config.validate() if validate else config
