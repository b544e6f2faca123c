"""Converting a checkpoint between our format, the official one and Hugging Face's.

The work of ``tools/convert.py``, which imports this module after parsing its arguments
(``--help`` and argument errors answer before torch loads)."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

from detr_deform.config import DataConfig
from detr_deform.errors import EXIT_FAILED
from detr_deform.evaluation.score_threshold import stored_score_threshold
from detr_deform.io.checkpoint import CheckpointError, write_checkpoint
from detr_deform.loading.hf import save_hf
from detr_deform.loading.model import model_from_content, read_content, save_checkpoint
from detr_deform.models.config import DINO_FIXED_ARGS, ModelConfig
from detr_deform.utils.files import refuse_outputs_onto_inputs

HF_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")  # what save_hf writes into DST


# The official main.py's argument defaults, as stored in its checkpoints' "args".
OFFICIAL_DEFAULTS: dict[str, Any] = dict(
    lr=2e-4, lr_backbone_names=["backbone.0"], lr_backbone=2e-5,
    lr_linear_proj_names=["reference_points", "sampling_offsets"], lr_linear_proj_mult=0.1, batch_size=2,
    weight_decay=1e-4, epochs=50, lr_drop=40, lr_drop_epochs=None, clip_max_norm=0.1, sgd=False,
    with_box_refine=False, two_stage=False, frozen_weights=None, backbone="resnet50", dilation=False,
    position_embedding="sine", position_embedding_scale=2 * math.pi, num_feature_levels=4, enc_layers=6,
    dec_layers=6, dim_feedforward=1024, hidden_dim=256, dropout=0.1, nheads=8, num_queries=300, dec_n_points=4,
    enc_n_points=4, masks=False, aux_loss=True, set_cost_class=2, set_cost_bbox=5, set_cost_giou=2,
    mask_loss_coef=1, dice_loss_coef=1, cls_loss_coef=2, bbox_loss_coef=5, giou_loss_coef=2, focal_alpha=0.25,
    dataset_file="coco", coco_path="./data/coco", coco_panoptic_path=None, remove_difficult=False,
    output_dir="", device="cuda", seed=42, resume="", start_epoch=0, eval=False, num_workers=2, cache_mode=False,
)


# ModelConfig fields that are official arguments of the same name.
OFFICIAL_FIELDS = (
    "backbone", "dilation", "position_embedding", "position_embedding_scale", "num_feature_levels", "enc_layers",
    "dec_layers", "dim_feedforward", "hidden_dim", "dropout", "nheads", "num_queries", "dec_n_points",
    "enc_n_points", "with_box_refine", "two_stage", "aux_loss", "set_cost_class", "set_cost_bbox", "set_cost_giou",
    "cls_loss_coef", "bbox_loss_coef", "giou_loss_coef", "focal_alpha",
)


OFFICIAL_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")


def official_args_from(cfg: ModelConfig) -> argparse.Namespace:
    """The official ``args`` Namespace for ``cfg``: official defaults, overridden by the
    fields the official build reads. lr_backbone 0 freezes the backbone (train_backbone)."""
    if cfg.backbone not in OFFICIAL_BACKBONES:
        raise CheckpointError(f"model.backbone={cfg.backbone!r}: the official code has ResNet backbones only",
                              exit_code=EXIT_FAILED)  # SRC is fine; it cannot be written in this format
    if cfg.activation != "relu":
        raise CheckpointError(f"model.activation={cfg.activation!r}: the official build uses relu only",
                              exit_code=EXIT_FAILED)
    if cfg.backbone_norm == "gn":
        raise CheckpointError("model.backbone_norm='gn': the official backbone uses FrozenBatchNorm2d",
                              exit_code=EXIT_FAILED)
    values = {**OFFICIAL_DEFAULTS, **{name: getattr(cfg, name) for name in OFFICIAL_FIELDS}}
    values["lr_backbone"] = OFFICIAL_DEFAULTS["lr_backbone"] if cfg.train_backbone else 0.0
    if cfg.arch == "dino":  # the original DINO's args (IDEA-Research/DINO), read back by ModelConfig
        values.update(DINO_FIXED_ARGS, modelname="dino", num_classes=cfg.num_classes, num_select=cfg.num_select,
                      return_interm_indices=cfg.backbone_out_indices or [1, 2, 3],
                      **{name: getattr(cfg, name) for name in DINO_FIELDS},
                      dn_labelbook_size=cfg.dn_labelbook_size or cfg.num_classes,
                      pe_temperatureH=cfg.pe_temperature[0], pe_temperatureW=cfg.pe_temperature[1])
        for name in ("with_box_refine", "two_stage"):
            values.pop(name)
    return argparse.Namespace(**values)


# ModelConfig fields that are DINO arguments of the same name.
DINO_FIELDS = ("use_dn", "dn_number", "dn_label_noise_ratio", "dn_box_noise_scale", "interm_loss_coef",
               "no_interm_box_loss", "use_detached_boxes_dec_out")


def write_official(path: Path, model: torch.nn.Module, cfg: ModelConfig, category_names: dict | None) -> Path:
    """``{"model", "args"}`` (+ ``category_names`` when known), written atomically."""
    args = official_args_from(cfg)
    # BatchNorm2d counters (backbone_norm=bn) have no place in the official FrozenBatchNorm2d.
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    content = {"model": state, "args": args}
    if category_names:
        content["category_names"] = dict(category_names)
    return write_checkpoint(path, content)


def convert(args: argparse.Namespace) -> int:
    """Reads SRC, builds and strictly loads its model, writes DST; the exit status."""
    written = {"DST": args.dst, **({f"DST's {name}": args.dst / name for name in HF_FILES} if args.to == "hf" else {})}
    refuse_outputs_onto_inputs(written, {"SRC": args.src})
    exists = args.dst.is_file() or (args.dst.is_dir() and any(args.dst.iterdir()))
    if exists and not args.overwrite:
        print(f"error: {args.dst} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    content = read_content(args.src)
    model, cfg = model_from_content(content, args.src)
    threshold = stored_score_threshold(content, args.src)
    names = content.get("category_names") if isinstance(content, dict) else None
    # The validation sizes travel too (our config's data section <-> HF's preprocessor_config.json).
    saved = content.get("config", {}) if isinstance(content, dict) else {}
    data = DataConfig.from_saved(saved.get("data") if isinstance(saved, dict) else None, source=str(args.src))
    if args.to == "hf":
        save_hf(model, cfg, args.dst, class_names=names, val_size=data.val_size, max_size=data.max_size)
    elif args.to == "official":
        write_official(args.dst, model, cfg, names)
    else:
        config = {"model": cfg.to_dict(), "data": {"val_size": data.val_size, "max_size": data.max_size}}
        extra = {"category_names": dict(names)} if names else {}
        if threshold is not None:  # the calibrated threshold of these weights travels with them
            extra["score_threshold"] = {"threshold": threshold}
        save_checkpoint(args.dst, model, config, **extra)
    variant = ("DINO" if cfg.arch == "dino" else "two-stage" if cfg.two_stage else
               "box refinement" if cfg.with_box_refine else "plain")
    print(f"wrote {args.dst} ({args.to}: {cfg.backbone}, {variant}, {cfg.num_feature_levels} feature level(s), "
          f"{cfg.num_classes} classes) from {args.src}")
    return 0

