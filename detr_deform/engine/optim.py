"""Optimiser and learning-rate schedule: the official AdamW with three parameter
groups and StepLR, plus multi-step / cosine schedules with linear warm-up."""
from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def _matches(name: str, keywords: Sequence[str]) -> bool:
    return any(keyword in name for keyword in keywords)


def build_param_groups(model: nn.Module, lr: float, lr_backbone: float, lr_backbone_names: Sequence[str],
                       lr_linear_proj_names: Sequence[str], lr_linear_proj_mult: float,
                       param_dict_type: str = "ddetr_in_mmdet") -> list[dict]:
    """``ddetr_in_mmdet`` (Deformable DETR's groups): backbone parameters (name contains
    one of ``lr_backbone_names``) get ``lr_backbone``; sampling offsets / reference points
    (substring match on ``lr_linear_proj_names``) get ``lr * lr_linear_proj_mult``; the
    rest ``lr``. ``default`` (DINO's): backbone and rest only. ``large_wd``: ``default``
    with the norm and bias parameters in their own groups at weight decay 0."""
    if param_dict_type not in ("ddetr_in_mmdet", "default", "large_wd"):
        raise ValueError(f"optim.param_dict_type must be ddetr_in_mmdet, default or large_wd, not {param_dict_type!r}")
    groups = {"default": [], "backbone": [], "linear_proj": [], "default_no_wd": [], "backbone_no_wd": []}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        backbone = _matches(name, lr_backbone_names)
        if param_dict_type == "ddetr_in_mmdet" and not backbone and _matches(name, lr_linear_proj_names):
            kind = "linear_proj"
        else:
            kind = "backbone" if backbone else "default"
            if param_dict_type == "large_wd" and ("norm" in name or "bias" in name):
                kind += "_no_wd"
        groups[kind].append(parameter)
    result = [{"params": groups["default"], "lr": lr, "name": "default"},
              {"params": groups["backbone"], "lr": lr_backbone, "name": "backbone"}]
    if param_dict_type == "ddetr_in_mmdet":
        result.append({"params": groups["linear_proj"], "lr": lr * lr_linear_proj_mult, "name": "linear_proj"})
    if param_dict_type == "large_wd":
        result += [{"params": groups["default_no_wd"], "lr": lr, "weight_decay": 0.0, "name": "default_no_wd"},
                   {"params": groups["backbone_no_wd"], "lr": lr_backbone, "weight_decay": 0.0,
                    "name": "backbone_no_wd"}]
    return result


def build_optimizer(model: nn.Module, optim_cfg, lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """AdamW over the official parameter groups; ``lr_scale`` multiplies every
    learning rate (``optim.auto_scale_lr``, see ``lr_scale_for``)."""
    groups = build_param_groups(model, optim_cfg.lr * lr_scale, optim_cfg.lr_backbone * lr_scale,
                                optim_cfg.lr_backbone_names, optim_cfg.lr_linear_proj_names,
                                optim_cfg.lr_linear_proj_mult, optim_cfg.param_dict_type)
    # The fused kernel (CPU and CUDA) is the same update as the loop, several times faster on CPU.
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = devices <= {"cpu", "cuda"} and all(p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=optim_cfg.lr * lr_scale, weight_decay=optim_cfg.weight_decay,
                             fused=fused or None)


REFERENCE_TOTAL_BATCH = 32  # the official recipe: 8 GPUs x 4 images


def lr_scale_for(optim_cfg, world_size: int) -> float:
    """optim.auto_scale_lr (ours, not official): the linear scaling rule relative to
    the official total batch of 32; 1 when off."""
    if not optim_cfg.auto_scale_lr:
        return 1.0
    return optim_cfg.batch_size * optim_cfg.accumulate_steps * world_size / REFERENCE_TOTAL_BATCH


class LRSchedule:
    """The learning-rate schedule of a run, stepped by the training loop after
    every optimizer step (``after_step``) and every epoch (``after_epoch``); only
    one of the two moves it.

    ``optim.scheduler=step`` without warm-up is the official StepLR stepped per
    epoch (and its checkpoints' scheduler state); every other choice is a
    per-step LambdaLR whose factor is warm-up x schedule. Resuming loads the
    state into the same schedule, so the curve continues exactly.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, optim_cfg, steps_per_epoch: int) -> None:
        self.per_step = not (optim_cfg.scheduler == "step" and optim_cfg.warmup_steps == 0)
        if self.per_step:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: lr_factor(step, optim_cfg, max(1, steps_per_epoch)))
        else:
            self.scheduler = torch.optim.lr_scheduler.StepLR(optimizer, optim_cfg.lr_drop, gamma=optim_cfg.gamma)

    def after_step(self) -> None:
        if self.per_step:
            self.scheduler.step()

    def after_epoch(self) -> None:
        if not self.per_step:
            self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state)


def lr_factor(step: int, optim_cfg, steps_per_epoch: int) -> float:
    """The learning rate at optimizer step ``step`` (from 0) over the initial one."""
    if optim_cfg.scheduler == "step":
        factor = optim_cfg.gamma ** (step // (optim_cfg.lr_drop * steps_per_epoch))
    elif optim_cfg.scheduler == "multistep":
        drops = bisect.bisect_right([m * steps_per_epoch for m in optim_cfg.milestones], step)
        factor = optim_cfg.gamma ** drops
    else:  # cosine from 1 down to min_lr_ratio over the whole run
        total = optim_cfg.epochs * steps_per_epoch
        progress = min(step, total) / total
        factor = optim_cfg.min_lr_ratio + (1 - optim_cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if step < optim_cfg.warmup_steps:
        factor *= optim_cfg.warmup_factor + (1 - optim_cfg.warmup_factor) * step / optim_cfg.warmup_steps
    return factor
