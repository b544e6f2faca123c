"""Model configuration. Field names are the official command-line argument
names wherever one exists, so official scripts map one to one."""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from detr_deform.utils.fields import bounded, check_fields, choice

RESNET_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
DAT_BACKBONES = ("dat_tiny", "dat_small", "dat_base")
BACKBONE_NORMS = ("frozen_bn", "bn", "sync_bn", "gn")


ARCHS = ("deformable_detr", "dino")


@dataclass
class ModelConfig:
    # Detector: Deformable DETR (with_box_refine / two_stage below) or DINO (docs/dino.md).
    arch: str = choice(ARCHS, default="deformable_detr")
    # Backbone (official names)
    backbone: str = choice(RESNET_BACKBONES + DAT_BACKBONES + ("timm",), default="resnet50")
    # backbone=timm: any timm model with features_only (docs/backbones.md), and more create_model arguments
    timm_name: str | None = None
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    dilation: bool = False
    # v2 = sine, v3 = learned (official)
    position_embedding: str = choice(("sine", "learned", "v2", "v3"), default="sine")
    position_embedding_scale: float = bounded(2 * math.pi, gt=0)
    num_feature_levels: int = bounded(4, ge=1)
    # Backbone (ours)
    backbone_norm: str = choice(BACKBONE_NORMS, default="frozen_bn")
    train_backbone: bool = True               # official: lr_backbone > 0
    freeze_stem_and_layer1: bool = True
    pretrained_backbone: str | None = None    # local file | torchvision[:<weights>] | timm | hf-hub:<repo> | None
    # DAT backbones (backbone=dat_tiny|dat_small|dat_base)
    backbone_out_indices: list[int] | None = None    # stages fed to the transformer; None: 1,2,3 (or 3)
    backbone_drop_path_rate: float | None = bounded(None, ge=0, lt=1)  # None: the preset's (0.2 / 0.3 / 0.5)
    backbone_grad_checkpointing: bool = False        # recompute DAT blocks in backward (memory)
    dat_kwargs: dict[str, Any] = field(default_factory=dict)  # DAT constructor overrides (official key names)
    # Transformer
    enc_layers: int = bounded(6, ge=1)
    dec_layers: int = bounded(6, ge=1)
    dim_feedforward: int = bounded(1024, ge=1)
    hidden_dim: int = bounded(256, ge=32)
    dropout: float = bounded(0.1, ge=0, lt=1)
    nheads: int = bounded(8, ge=1)
    num_queries: int = bounded(300, ge=1)
    dec_n_points: int = bounded(4, ge=1)
    enc_n_points: int = bounded(4, ge=1)
    activation: str = choice(("relu", "gelu"), default="relu")
    attn_impl: str = choice(("auto", "cpp", "pytorch"), default="auto")
    # Variants
    with_box_refine: bool = False
    two_stage: bool = False
    aux_loss: bool = True
    # Classes: max category id + 1 (COCO: 91), no background logit. None: read
    # from the dataset by the training tools; build_model needs a value.
    num_classes: int | None = bounded(None, ge=1)
    # Matcher
    set_cost_class: float = bounded(2.0, ge=0)
    set_cost_bbox: float = bounded(5.0, ge=0)
    set_cost_giou: float = bounded(2.0, ge=0)
    # Loss
    cls_loss_coef: float = bounded(2.0, ge=0)
    bbox_loss_coef: float = bounded(5.0, ge=0)
    giou_loss_coef: float = bounded(2.0, ge=0)
    focal_alpha: float = bounded(0.25, ge=0, le=1)
    # DINO only (the original's names; docs/dino.md). Contrastive denoising:
    use_dn: bool = True
    dn_number: int = bounded(100, ge=0)                   # up to 2 * dn_number denoising queries
    dn_label_noise_ratio: float = bounded(0.5, ge=0, le=1)  # a label is redrawn with probability ratio / 2
    dn_box_noise_scale: float = bounded(1.0, ge=0)        # released results: 1.0 (the config file's 0.4 is a typo)
    dn_labelbook_size: int | None = bounded(None, ge=1)   # label-embedding rows - 1; None: num_classes
    # Sine position embedding temperatures (y, x); None: 10000 for deformable_detr, 20 for dino.
    pe_temperatureH: float | None = bounded(None, gt=0)
    pe_temperatureW: float | None = bounded(None, gt=0)
    interm_loss_coef: float = bounded(1.0, ge=0)          # the selected encoder tokens' losses
    no_interm_box_loss: bool = False
    use_detached_boxes_dec_out: bool = False              # true switches look-forward-twice off
    # Post-processing: detections kept per image (official eval: 100).
    num_select: int = bounded(100, ge=1)
    # Class-wise NMS at this IoU after the top-k (ours; official: none). For briefly trained models.
    nms_iou: float | None = bounded(None, gt=0, le=1)

    def validate(self) -> ModelConfig:
        """Checks every field (type, choices, range) and the rules between them;
        raises ValueError with one line naming the key, the value and what is allowed."""
        check_fields(self, "model")
        if self.two_stage and not self.with_box_refine:
            raise ValueError(
                "model.two_stage=true requires model.with_box_refine=true (the official implementation supports "
                "two-stage only with iterative box refinement)"
            )
        if self.hidden_dim % self.nheads != 0:
            raise ValueError(f"model.hidden_dim={self.hidden_dim} must be divisible by model.nheads={self.nheads}")
        if self.hidden_dim % 32 != 0:
            raise ValueError(f"model.hidden_dim={self.hidden_dim} must be a multiple of 32 (GroupNorm(32) projections)")
        if self.set_cost_class == 0 and self.set_cost_bbox == 0 and self.set_cost_giou == 0:
            raise ValueError("model.set_cost_class, set_cost_bbox and set_cost_giou are all 0: the matcher needs "
                             "at least one positive cost")
        self._validate_backbone()
        if self.arch == "dino":
            self._validate_dino()
        return self

    def _validate_dino(self) -> None:
        if self.dn_labelbook_size is not None and self.num_classes is not None and \
                self.dn_labelbook_size < self.num_classes:
            raise ValueError(f"model.dn_labelbook_size={self.dn_labelbook_size} is smaller than model.num_classes="
                             f"{self.num_classes}: the noisy labels (drawn from all classes) index the label "
                             f"embedding; set model.dn_labelbook_size>={self.num_classes} (or leave it null)")
        if self.position_embedding not in ("sine", "v2"):
            raise ValueError(f"model.arch=dino uses the sine position embedding (model.position_embedding=sine), "
                             f"not {self.position_embedding}")
        if self.with_box_refine or self.two_stage:
            raise ValueError(f"model.arch=dino with model.with_box_refine={str(self.with_box_refine).lower()} "
                             f"model.two_stage={str(self.two_stage).lower()}: these select Deformable-DETR variants "
                             f"(DINO always refines its boxes and selects its queries); set both to false, or start "
                             f"from experiment=dino / dino_demo")

    @property
    def selects_encoder_tokens(self) -> bool:
        """Whether the decoder's queries are the top num_queries encoder tokens (two-stage, DINO)."""
        return self.two_stage or self.arch == "dino"

    @property
    def pe_temperature(self) -> tuple[float, float]:
        """(y, x) temperatures of the sine position embedding."""
        default = 20.0 if self.arch == "dino" else 10000
        return (default if self.pe_temperatureH is None else self.pe_temperatureH,
                default if self.pe_temperatureW is None else self.pe_temperatureW)

    def _validate_backbone(self) -> None:
        if self.dilation and self.backbone not in ("resnet50", "resnet101"):
            raise ValueError(f"model.dilation=true (DC5) applies to ResNet backbones only, with Bottleneck blocks "
                             f"(resnet50/resnet101), not model.backbone={self.backbone}")
        weights = self.pretrained_backbone or ""
        from_torchvision = weights == "torchvision" or weights.startswith("torchvision:")
        if from_torchvision and self.backbone_norm != "frozen_bn":
            raise ValueError(f"model.pretrained_backbone={weights} requires model.backbone_norm=frozen_bn")
        if weights == "timm" and self.backbone != "timm":
            raise ValueError(f"model.pretrained_backbone=timm is for model.backbone=timm; the {self.backbone} "
                             f"backbone takes torchvision[:<weights>], hf-hub:<repo> (ResNets) or a local file")
        if (from_torchvision or weights.startswith("hf-hub:")) and self.backbone in DAT_BACKBONES:
            raise ValueError(f"model.pretrained_backbone={weights}: DAT backbones take a local file (the official "
                             f"dat_*_in1k_*.pth; docs/dat.md)")
        if self.backbone == "timm":
            if not self.timm_name:
                raise ValueError("model.backbone=timm needs model.timm_name (e.g. convnext_tiny, "
                                 "swin_tiny_patch4_window7_224, resnet50d; or a preset: backbone=convnext_tiny)")
            if self.backbone_norm == "gn":
                raise ValueError("model.backbone_norm=gn applies to our ResNets; a timm backbone keeps its own norms: "
                                 "set model.backbone_norm=frozen_bn (freezes its BatchNorms) or bn (trains them)")
            if from_torchvision:
                raise ValueError(f"model.pretrained_backbone={weights} is for ResNets; timm backbones take 'timm' "
                                 f"(timm's weights), hf-hub:<repo> or a local file")
            return  # stages and strides are checked against timm's feature_info when the model is built
        if self.timm_name is not None:
            raise ValueError(f"model.timm_name={self.timm_name} needs model.backbone=timm (now "
                             f"{self.backbone})")
        if self.backbone in DAT_BACKBONES:
            outputs = self.backbone_out_indices or ([1, 2, 3] if self.num_feature_levels > 1 else [3])
            if any(i not in range(4) for i in outputs) or list(outputs) != sorted(set(outputs)):
                raise ValueError(f"model.backbone_out_indices={outputs} must be increasing DAT stage indices in 0..3")
        else:
            outputs = self.backbone_out_indices or ([1, 2, 3] if self.num_feature_levels > 1 else [3])
            if any(i not in range(4) for i in outputs) or list(outputs) != sorted(set(outputs)):
                raise ValueError(f"model.backbone_out_indices={outputs} must be increasing ResNet stage indices in "
                                 f"0..3 (0 = layer1, stride 4)")
        if self.num_feature_levels < len(outputs):
            raise ValueError(f"model.num_feature_levels={self.num_feature_levels} is fewer than the "
                             f"{len(outputs)} feature maps the backbone gives (use 1 for single-scale or at least "
                             f"{len(outputs)})")

    @classmethod
    def from_dict(cls, values: dict[str, Any], validate: bool = True) -> ModelConfig:
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
                           validate: bool = True) -> ModelConfig:
        """Maps the official ``args`` of a model-zoo checkpoint onto a ModelConfig."""
        values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
        config = cls()
        for f in fields(cls):
            if f.name in values and values[f.name] is not None:
                setattr(config, f.name, values[f.name])
        if "lr_backbone" in values:
            if isinstance(values["lr_backbone"], bool) or not isinstance(values["lr_backbone"], (int, float)):
                raise ValueError(f"args.lr_backbone={values['lr_backbone']!r:.40} is not a number")
            config.train_backbone = values["lr_backbone"] > 0
        if values.get("masks"):
            raise ValueError("official checkpoints with segmentation heads (masks=True) are not supported")
        if values.get("modelname") == "dino" or "dn_number" in values:
            _dino_from_official_args(config, values)
        if num_classes is None:
            dataset = values.get("dataset_file", "coco")
            num_classes = {"coco": 91, "coco_panoptic": 250}.get(dataset, 2)  # official build()
        config.num_classes = num_classes
        config.pretrained_backbone = None
        return config.validate() if validate else config


# The original DINO's switches that our DINO implements with one value only (the released configs').
DINO_FIXED_ARGS = {"two_stage_type": "standard", "embed_init_tgt": True, "dec_pred_bbox_embed_share": True,
                   "dec_pred_class_embed_share": True, "two_stage_bbox_embed_share": False,
                   "two_stage_class_embed_share": False, "two_stage_learn_wh": False, "decoder_sa_type": "sa",
                   "query_dim": 4, "pre_norm": False, "num_patterns": 0, "random_refpoints_xy": False}


def _dino_from_official_args(config: ModelConfig, values: dict[str, Any]) -> None:
    """The original DINO's ``args`` (IDEA-Research/DINO checkpoints) on top of the name-for-name copy."""
    for key, expected in DINO_FIXED_ARGS.items():
        if key in values and values[key] != expected:
            raise ValueError(f"args.{key}={values[key]!r}: only {expected!r} (the released DINO models) is "
                             f"supported")
    config.arch = "dino"
    config.with_box_refine = config.two_stage = False
    if values.get("return_interm_indices") is not None:
        config.backbone_out_indices = list(values["return_interm_indices"])
    if values.get("use_dn") is False:
        config.use_dn = False
