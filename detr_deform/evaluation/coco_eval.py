"""COCO box evaluation with pycocotools, exact under distributed evaluation."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_deform.utils.distributed import all_gather_object, world_size

METRIC_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
def detections_to_coco(image_ids: list[int], results: list[dict]) -> tuple[list[dict], int]:
    """Post-processed detections (xyxy, absolute) -> COCO results entries (xywh),
    and the number left out because a box or score is NaN/inf (pycocotools would
    count NaN boxes as matches)."""
    entries, nonfinite = [], 0
    for image_id, result in zip(image_ids, results):
        boxes = result["boxes"].float().cpu()
        scores = result["scores"].float().cpu()
        finite = torch.isfinite(boxes).all(-1) & torch.isfinite(scores)
        nonfinite += int((~finite).sum())
        boxes, scores, labels = boxes[finite], scores[finite], result["labels"].cpu()[finite]
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], -1).tolist()
        for box, score, label in zip(xywh, scores.tolist(), labels.tolist()):
            entries.append({"image_id": int(image_id), "category_id": int(label), "bbox": box, "score": float(score)})
    return entries, nonfinite


def gather_detections(entries: list[dict], image_ids: list[int]) -> tuple[list[dict], list[int]]:
    """All ranks' detections on every rank, each image counted once (a
    DistributedSampler pads by repeating images; duplicates are dropped)."""
    if world_size() == 1:
        return entries, sorted(set(image_ids))
    gathered = all_gather_object((entries, image_ids))
    seen: set[int] = set()
    merged: list[dict] = []
    for rank_entries, rank_ids in gathered:
        fresh = set(rank_ids) - seen
        merged.extend(e for e in rank_entries if e["image_id"] in fresh)
        seen |= fresh
    return merged, sorted(seen)


def evaluate_coco(coco_gt, entries: list[dict], image_ids: list[int],
                  backend: str = "pycocotools") -> tuple[dict[str, float], str]:
    """COCO bbox evaluation restricted to ``image_ids``: the 12 metrics and the evaluator's own
    summary table (its 12 lines as it printed them, without its progress and timing lines).
    ``backend``: pycocotools (the reference) or faster (faster-coco-eval, the same metrics
    computed in C++; an optional extra)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        if backend == "faster":
            evaluator = _faster_evaluator(coco_gt, entries)
        else:
            # loadRes adds keys (area, id, ...) to the dicts it is given: hand it copies.
            coco_dt = coco_gt.loadRes([dict(e) for e in entries]) if entries else _empty_results(coco_gt)
            evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats if evaluator.stats is not None else np.full(12, -1.0)
    table = "\n".join(line for line in buffer.getvalue().splitlines() if line.startswith(" Average "))
    return {name: float(value) for name, value in zip(METRIC_NAMES, stats[:12])}, table


def _faster_evaluator(coco_gt, entries: list[dict]):
    import faster_coco_eval  # optional extra (faster-coco-eval): imported only for coco_eval=faster

    gt = faster_coco_eval.COCO(coco_gt.dataset)
    empty = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"], "annotations": []}
    dt = gt.loadRes([dict(e) for e in entries]) if entries else faster_coco_eval.COCO(empty)
    return faster_coco_eval.COCOeval_faster(gt, dt, "bbox", print_function=print)


def _empty_results(coco_gt):
    empty = COCO()
    empty.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                     "annotations": []}
    empty.createIndex()
    return empty


