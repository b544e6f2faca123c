"""One optimisation step and one evaluation pass (used by the trainer and tools)."""
from __future__ import annotations

import contextlib
import math
from typing import Iterable

import torch
from torch import nn

from detr_deform.data.coco import raise_worker_errors_cleanly
from detr_deform.engine.coco_eval import detections_to_coco, evaluate_coco, gather_detections


def move_targets(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
            for t in targets]


def autocast_context(device: torch.device, amp: str):
    if amp in ("off", None, False):
        return contextlib.nullcontext()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_step(model: nn.Module, criterion: nn.Module, images: list[torch.Tensor], targets: list[dict],
               optimizer: torch.optim.Optimizer, clip_max_norm: float, amp: str = "off",
               scaler: torch.amp.GradScaler | None = None) -> tuple[dict[str, float], float, torch.Tensor]:
    """Forward, weighted loss, backward, clip, step. Returns (loss terms as floats,
    total weighted loss, gradient norm). Matcher and losses run in float32."""
    device = images[0].device
    with autocast_context(device, amp):
        outputs = model(images)
    loss_dict = criterion(outputs, targets)
    weights = criterion.weight_dict
    total = sum(loss_dict[k] * weights[k] for k in loss_dict if k in weights)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
    else:
        total.backward()
    parameters = [p for g in optimizer.param_groups for p in g["params"]]
    if clip_max_norm > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, clip_max_norm)
    else:
        grad_norm = torch.linalg.vector_norm(
            torch.stack([p.grad.detach().norm() for p in parameters if p.grad is not None]))
    values = {k: float(v.detach()) for k, v in loss_dict.items()}
    total_value = float(total.detach())
    if not math.isfinite(total_value) or not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()
        return values, total_value, grad_norm
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return values, total_value, grad_norm


@torch.no_grad()
def evaluate(model: nn.Module, postprocessor: nn.Module, loader: Iterable, coco_gt, device: torch.device,
             amp: str = "off", progress=None) -> tuple[dict[str, float], list[dict], str]:
    """Detections for every image of ``loader`` (distributed: gathered and
    de-duplicated), then COCO bbox metrics. Returns (metrics, detections, table)."""
    model.eval()
    entries: list[dict] = []
    image_ids: list[int] = []
    for images, targets in raise_worker_errors_cleanly(loader):
        images = [image.to(device, non_blocking=True) for image in images]
        with autocast_context(device, amp):
            outputs = model(images)
        outputs = {k: v.float() for k, v in outputs.items() if k in ("pred_logits", "pred_boxes")}
        orig_sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        results = postprocessor(outputs, orig_sizes)
        ids = [int(t["image_id"]) for t in targets]
        entries.extend(detections_to_coco(ids, results))
        image_ids.extend(ids)
        if progress is not None:
            progress(len(ids))
    entries, unique_ids = gather_detections(entries, image_ids)
    metrics, table = evaluate_coco(coco_gt, entries, unique_ids)
    return metrics, entries, table
