"""Builders: one config -> model, criterion, post-processor."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from detr_deform.models.backbone import Joiner, ResNetBackbone
from detr_deform.models.config import ModelConfig
from detr_deform.models.criterion import SetCriterion, build_weight_dict
from detr_deform.models.dat import DAT_PRESETS, DATBackbone
from detr_deform.models.deformable_detr import DeformableDETR
from detr_deform.models.deformable_transformer import DeformableTransformer
from detr_deform.models.dino import DINO
from detr_deform.models.dino_criterion import DINOCriterion, build_dino_weight_dict
from detr_deform.models.dino_transformer import DINOTransformer
from detr_deform.models.matcher import HungarianMatcher
from detr_deform.models.position_encoding import build_position_encoding
from detr_deform.models.postprocess import PostProcess
from detr_deform.models.timm_backbone import TimmBackbone


def _model_config(cfg) -> ModelConfig:
    """Accepts a ModelConfig, a dict, or a (Hydra) config with a ``model`` section;
    returns it validated."""
    if isinstance(cfg, ModelConfig):
        return cfg.validate()
    if hasattr(cfg, "model") and not isinstance(cfg, dict):
        cfg = cfg.model
        if isinstance(cfg, ModelConfig):
            return cfg.validate()
    if isinstance(cfg, dict) and "model" in cfg and isinstance(cfg["model"], dict):
        cfg = cfg["model"]
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    return ModelConfig.from_dict(dict(cfg))


def build_backbone(cfg: ModelConfig) -> Joiner:
    # DINO's sine embedding: temperature 20 and no half-pixel offset (Deformable DETR: 10000, 0.5).
    position = build_position_encoding(cfg.position_embedding, cfg.hidden_dim, cfg.position_embedding_scale,
                                       cfg.pe_temperature, offset=0.0 if cfg.arch == "dino" else 0.5)
    if cfg.backbone == "timm":
        body = TimmBackbone(cfg.timm_name, cfg.backbone_out_indices, cfg.num_feature_levels > 1,
                            cfg.pretrained_backbone, cfg.train_backbone, cfg.freeze_stem_and_layer1,
                            frozen_bn=cfg.backbone_norm == "frozen_bn",
                            grad_checkpointing=cfg.backbone_grad_checkpointing, kwargs=cfg.timm_kwargs)
        return Joiner(body, position)
    if cfg.backbone in DAT_PRESETS:
        out_indices = cfg.backbone_out_indices or ([1, 2, 3] if cfg.num_feature_levels > 1 else [3])
        body = DATBackbone(cfg.backbone, out_indices, cfg.backbone_drop_path_rate, cfg.backbone_grad_checkpointing,
                           cfg.pretrained_backbone, cfg.train_backbone, cfg.dat_kwargs)
        return Joiner(body, position)
    body = ResNetBackbone(
        name=cfg.backbone,
        train_backbone=cfg.train_backbone,
        return_interm_layers=cfg.num_feature_levels > 1,
        dilation=cfg.dilation,
        norm=cfg.backbone_norm,
        freeze_stem_and_layer1=cfg.freeze_stem_and_layer1,
        pretrained=cfg.pretrained_backbone,
        out_indices=cfg.backbone_out_indices,
    )
    return Joiner(body, position)


def _require_num_classes(cfg: ModelConfig) -> int:
    if cfg.num_classes is None:
        raise ValueError("model.num_classes is not set: give it explicitly (COCO: 91 = max category id + 1) or let "
                         "the training tools read it from the dataset's categories")
    return cfg.num_classes


def build_model(cfg) -> DeformableDETR | DINO:
    """Deformable DETR (model.arch=deformable_detr) or DINO (model.arch=dino)."""
    cfg = _model_config(cfg)
    num_classes = _require_num_classes(cfg)
    # Same construction order as the official build (backbone, then transformer),
    # so a given seed gives the same initial weights.
    backbone = build_backbone(cfg)
    if cfg.arch == "dino":
        return _build_dino(cfg, backbone, num_classes)
    transformer = DeformableTransformer(
        d_model=cfg.hidden_dim, nhead=cfg.nheads, num_encoder_layers=cfg.enc_layers,
        num_decoder_layers=cfg.dec_layers, dim_feedforward=cfg.dim_feedforward, dropout=cfg.dropout,
        activation=cfg.activation, return_intermediate_dec=True, num_feature_levels=cfg.num_feature_levels,
        dec_n_points=cfg.dec_n_points, enc_n_points=cfg.enc_n_points, two_stage=cfg.two_stage,
        two_stage_num_proposals=cfg.num_queries, attn_impl=cfg.attn_impl,
    )
    return DeformableDETR(backbone, transformer, num_classes=num_classes, num_queries=cfg.num_queries,
                          num_feature_levels=cfg.num_feature_levels, aux_loss=cfg.aux_loss,
                          with_box_refine=cfg.with_box_refine, two_stage=cfg.two_stage)


def _build_dino(cfg: ModelConfig, backbone: Joiner, num_classes: int) -> DINO:
    transformer = DINOTransformer(
        d_model=cfg.hidden_dim, nhead=cfg.nheads, num_encoder_layers=cfg.enc_layers,
        num_decoder_layers=cfg.dec_layers, dim_feedforward=cfg.dim_feedforward, dropout=cfg.dropout,
        activation=cfg.activation, num_feature_levels=cfg.num_feature_levels, dec_n_points=cfg.dec_n_points,
        enc_n_points=cfg.enc_n_points, num_queries=cfg.num_queries,
        look_forward_twice=not cfg.use_detached_boxes_dec_out, attn_impl=cfg.attn_impl,
    )
    return DINO(backbone, transformer, num_classes=num_classes, num_queries=cfg.num_queries,
                num_feature_levels=cfg.num_feature_levels, aux_loss=cfg.aux_loss,
                dn_number=cfg.dn_number if cfg.use_dn else 0, dn_label_noise_ratio=cfg.dn_label_noise_ratio,
                dn_box_noise_scale=cfg.dn_box_noise_scale, dn_labelbook_size=cfg.dn_labelbook_size)


def build_criterion(cfg) -> SetCriterion:
    """callable(outputs, targets) -> dict of UNWEIGHTED losses; ``.weight_dict`` has the coefficients."""
    cfg = _model_config(cfg)
    matcher = HungarianMatcher(cost_class=cfg.set_cost_class, cost_bbox=cfg.set_cost_bbox,
                               cost_giou=cfg.set_cost_giou, focal_alpha=cfg.focal_alpha)
    if cfg.arch == "dino":
        weight_dict = build_dino_weight_dict(cfg.cls_loss_coef, cfg.bbox_loss_coef, cfg.giou_loss_coef,
                                             cfg.dec_layers, cfg.aux_loss, cfg.use_dn and cfg.dn_number > 0,
                                             cfg.interm_loss_coef, cfg.no_interm_box_loss)
        return DINOCriterion(_require_num_classes(cfg), matcher, weight_dict, focal_alpha=cfg.focal_alpha,
                             use_dn=cfg.use_dn and cfg.dn_number > 0)
    weight_dict = build_weight_dict(cfg.cls_loss_coef, cfg.bbox_loss_coef, cfg.giou_loss_coef, cfg.dec_layers,
                                    cfg.aux_loss, cfg.two_stage)
    return SetCriterion(_require_num_classes(cfg), matcher, weight_dict, focal_alpha=cfg.focal_alpha)


def build_postprocessor(cfg) -> PostProcess:
    """callable(outputs, target_sizes (B, 2) as (h, w)) -> [{'scores', 'labels', 'boxes'}]."""
    cfg = _model_config(cfg)
    return PostProcess(num_select=cfg.num_select, nms_iou=cfg.nms_iou)
