"""Official optimiser set-up: AdamW with three parameter groups and StepLR."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def _matches(name: str, keywords: Sequence[str]) -> bool:
    return any(keyword in name for keyword in keywords)


def build_param_groups(model: nn.Module, lr: float, lr_backbone: float, lr_backbone_names: Sequence[str],
                       lr_linear_proj_names: Sequence[str], lr_linear_proj_mult: float) -> list[dict]:
    """Backbone parameters (name contains one of ``lr_backbone_names``) get
    ``lr_backbone``; sampling offsets / reference points (substring match on
    ``lr_linear_proj_names``) get ``lr * lr_linear_proj_mult``; the rest ``lr``."""
    groups = {"default": [], "backbone": [], "linear_proj": []}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if _matches(name, lr_backbone_names):
            groups["backbone"].append(parameter)
        elif _matches(name, lr_linear_proj_names):
            groups["linear_proj"].append(parameter)
        else:
            groups["default"].append(parameter)
    return [
        {"params": groups["default"], "lr": lr, "name": "default"},
        {"params": groups["backbone"], "lr": lr_backbone, "name": "backbone"},
        {"params": groups["linear_proj"], "lr": lr * lr_linear_proj_mult, "name": "linear_proj"},
    ]


def build_optimizer(model: nn.Module, optim_cfg) -> torch.optim.Optimizer:
    groups = build_param_groups(model, optim_cfg.lr, optim_cfg.lr_backbone, optim_cfg.lr_backbone_names,
                                optim_cfg.lr_linear_proj_names, optim_cfg.lr_linear_proj_mult)
    # The fused kernel (CPU and CUDA) is the same update as the loop, several times faster on CPU.
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = devices <= {"cpu", "cuda"} and all(p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay, fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, optim_cfg) -> torch.optim.lr_scheduler.LRScheduler:
    """StepLR(lr_drop): x0.1 after ``lr_drop`` epochs, stepped once per epoch."""
    return torch.optim.lr_scheduler.StepLR(optimizer, optim_cfg.lr_drop, gamma=0.1)
