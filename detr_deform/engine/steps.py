"""One optimisation step and one evaluation pass (used by the trainer and tools)."""
from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from detr_deform.data.coco import raise_worker_errors_cleanly
from detr_deform.engine.loader_faults import WorkerWatch
from detr_deform.evaluation.coco_eval import detections_to_coco, evaluate_coco, gather_detections
from detr_deform.models.criterion import box_normalizer


def move_targets(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
            for t in targets]


def autocast_context(device: torch.device, amp: str):
    if amp in ("off", None, False):
        return contextlib.nullcontext()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


Batch = tuple[list[torch.Tensor], list[dict]]


def train_step(model: nn.Module, criterion: nn.Module, images: list[torch.Tensor], targets: list[dict],
               optimizer: torch.optim.Optimizer, clip_max_norm: float, amp: str = "off",
               scaler: torch.amp.GradScaler | None = None) -> tuple[dict[str, float], float, torch.Tensor]:
    """One optimizer step on one batch; see ``accumulated_step``."""
    return accumulated_step(model, criterion, [(images, targets)], optimizer, clip_max_norm, amp, scaler)


def accumulated_step(model: nn.Module, criterion: nn.Module, micro_batches: Sequence[Batch],
                     optimizer: torch.optim.Optimizer, clip_max_norm: float, amp: str = "off",
                     scaler: torch.amp.GradScaler | None = None) -> tuple[dict[str, float], float, torch.Tensor]:
    """One optimizer step on K micro-batches, exactly the step of one batch holding
    them all: every micro-batch's losses are normalised by the target boxes of the
    whole effective batch (all micro-batches, all ranks), gradients are summed,
    DDP synchronises only on the last backward (``no_sync`` before), and clipping
    acts once on the accumulated gradient. Returns (loss terms as floats — the
    ``loss_*`` terms summed over micro-batches, the logged errors averaged —,
    total weighted loss, gradient norm). Matcher and losses run in float32.
    A non-finite loss or gradient skips the update (the caller decides what next)."""
    device = micro_batches[0][0][0].device
    num_boxes = box_normalizer(sum(len(t["labels"]) for _, targets in micro_batches for t in targets), device)
    weights = criterion.weight_dict
    optimizer.zero_grad(set_to_none=True)
    terms: list[dict[str, float]] = []
    total_value = 0.0
    unmatchable = False
    for index, (images, targets) in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast_context(device, amp):
                outputs = forward(model, images, targets)
            try:
                loss_dict = criterion(outputs, targets, num_boxes=num_boxes)
                total = sum(loss_dict[k] * weights[k] for k in loss_dict if k in weights)
            except FloatingPointError:
                # NaN/inf predictions cannot be matched: a non-finite step, for the caller's policy.
                # The backward still runs (a NaN through every prediction), so that under DDP this
                # rank's gradient all-reduce meets the other ranks' instead of hanging them; every
                # rank then sees the NaN gradient norm and skips the update together.
                unmatchable = True
                loss_dict, total = {}, _nan_through(outputs)
            (scaler.scale(total) if scaler is not None else total).backward()
        terms.append({k: float(v.detach()) for k, v in loss_dict.items()})
        total_value += float(total.detach())
    if scaler is not None:
        scaler.unscale_(optimizer)
    parameters = [p for g in optimizer.param_groups for p in g["params"]]
    if clip_max_norm > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, clip_max_norm)
    else:
        grad_norm = torch.linalg.vector_norm(
            torch.stack([p.grad.detach().norm() for p in parameters if p.grad is not None]))
    values = {k: float("nan") for k in weights} if unmatchable else _combine(terms)
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


def forward(model: nn.Module, images: list[torch.Tensor], targets: list[dict]):
    """The training forward: DINO (``takes_targets``) also receives the targets, for
    its denoising queries; Deformable DETR only the images."""
    module = getattr(model, "module", model)  # under DDP
    return model(images, targets) if getattr(module, "takes_targets", False) else model(images)


def _nan_through(outputs) -> torch.Tensor:
    """A NaN scalar whose backward reaches every prediction tensor in ``outputs``
    (nested dicts/lists: aux_outputs, enc_outputs), hence every parameter a real loss reaches."""
    tensors = []
    pending = [outputs]
    while pending:
        item = pending.pop()
        if isinstance(item, torch.Tensor):
            if item.requires_grad:
                tensors.append(item.float().sum())
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return torch.stack(tensors).sum() * float("nan")


def _combine(terms: list[dict[str, float]]) -> dict[str, float]:
    """Loss terms of the micro-batches as those of one batch: the normalised
    ``loss_*`` terms add up, the logged errors (class_error, cardinality_error) average."""
    if len(terms) == 1:
        return terms[0]
    return {k: sum(t[k] for t in terms) / (1 if k.startswith("loss") else len(terms)) for k in terms[0]}


@torch.no_grad()
def evaluate(model: nn.Module, postprocessor: nn.Module, loader: Iterable, coco_gt, device: torch.device,
             amp: str = "off", progress=None,
             coco_eval: str = "pycocotools") -> tuple[dict[str, float], list[dict], str]:
    """Detections for every image of ``loader`` (distributed: gathered and
    de-duplicated), then COCO bbox metrics. Returns (metrics, detections, table).

    Images the dataset could not read (data.on_bad_sample=skip) are left out of
    the evaluation, and detections with a NaN/inf box or score are dropped; both
    with a warning that counts them."""
    model.eval()
    entries: list[dict] = []
    image_ids: list[int] = []
    skipped: list[tuple[int, str]] = []
    nonfinite = 0
    for images, targets in raise_worker_errors_cleanly(WorkerWatch(loader, "validation")):
        skipped += [record for image, t in zip(images, targets) if image is None for record in t["skipped"]]
        images, targets = zip(*[(i, t) for i, t in zip(images, targets) if i is not None]) or ((), ())
        if images:
            images = [image.to(device, non_blocking=True) for image in images]
            with autocast_context(device, amp):
                outputs = model(images)
            outputs = {k: v.float() for k, v in outputs.items() if k in ("pred_logits", "pred_boxes")}
            orig_sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
            ids = [int(t["image_id"]) for t in targets]
            found, dropped = detections_to_coco(ids, postprocessor(outputs, orig_sizes))
            entries.extend(found)
            nonfinite += dropped
            image_ids.extend(ids)
        if progress is not None:
            progress(len(images))
    if skipped:
        warnings.warn(f"evaluation: left out {len(skipped)} unreadable image(s) (data.on_bad_sample=skip), e.g. "
                      f"{skipped[0][1]}", RuntimeWarning, stacklevel=2)
    if nonfinite:
        warnings.warn(f"evaluation: dropped {nonfinite} detection(s) with NaN/inf boxes or scores (non-finite "
                      f"weights?)", RuntimeWarning, stacklevel=2)
    entries, unique_ids = gather_detections(entries, image_ids)
    metrics, table = evaluate_coco(coco_gt, entries, unique_ids, coco_eval)
    return metrics, entries, table
