"""The score threshold a model's detections are shown with: the one that maximises
detection F1 on the validation set, measured at each evaluation and stored in the
checkpoint (``"score_threshold"``), the default of ``Detector``, ``tools/infer.py``
and the drawings.

Matching (the usual detection F1): per image and per category, detections in
decreasing score order are each matched to the not yet matched ground-truth box
of the same category with the highest IoU, if that IoU is at least 0.5; a matched
detection is a true positive, an unmatched one a false positive, an unmatched
ground-truth box a false negative. Crowd annotations (``iscrowd``) are not
objects to find: a detection that matches none of the other boxes but overlaps a
crowd region by IoU >= 0.5 counts neither way (as in COCO). With TP, FP counted
over the detections scoring at least ``t`` and G ground-truth boxes,
F1(t) = 2 TP / (2 TP + FP + FN) = 2 TP / (TP + FP + G).

Because the matching is greedy in score order, the detections kept at ``t`` are
matched exactly as in the full list, so one pass over the sorted scores gives
F1 at every threshold. The threshold stored is half-way between the lowest kept
score and the next lower one, so that scores moving by less than that gap
(another batch size, another device) keep the same detections.

Files without a calibration (official model-zoo files, Hugging Face folders,
checkpoints from before this, a model that found nothing right) use
``DEFAULT_SCORE_THRESHOLD``.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from detr_deform.io.checkpoint import CheckpointError

DEFAULT_SCORE_THRESHOLD = 0.3
MATCH_IOU = 0.5


@dataclass(frozen=True)
class ScoreThreshold:
    """The F1-maximising score threshold of one evaluation, and what it gives."""
    threshold: float
    f1: float
    precision: float
    recall: float
    true_positives: int
    kept: int               # detections scoring at least ``threshold``
    ground_truth: int       # non-crowd ground-truth boxes
    iou: float = MATCH_IOU
    step: int | None = None  # the training step of the weights it was measured on

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return (f"{self.threshold:.3f} (F1 {self.f1:.3f}: precision {self.precision:.3f}, recall {self.recall:.3f}; "
                f"{self.true_positives} of {self.ground_truth} objects found with {self.kept} detections, "
                f"IoU >= {self.iou:g}, same class)")


def _iou(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """(D, 4) x (G, 4) xywh boxes -> (D, G) IoU."""
    x0 = np.maximum(boxes[:, None, 0], others[None, :, 0])
    y0 = np.maximum(boxes[:, None, 1], others[None, :, 1])
    x1 = np.minimum(boxes[:, None, 0] + boxes[:, None, 2], others[None, :, 0] + others[None, :, 2])
    y1 = np.minimum(boxes[:, None, 1] + boxes[:, None, 3], others[None, :, 1] + others[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    union = boxes[:, None, 2] * boxes[:, None, 3] + others[None, :, 2] * others[None, :, 3] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _match_group(detections: list[dict], truth: list[dict], iou: float) -> list[tuple[float, bool]]:
    """(score, true positive) of one image's detections of one category; crowd-ignored ones left out."""
    detections = sorted(detections, key=lambda d: -d["score"])  # stable: ties keep their order
    plain = [t for t in truth if not t.get("iscrowd")]
    crowd = [t for t in truth if t.get("iscrowd")]
    boxes = np.asarray([d["bbox"] for d in detections], dtype=np.float64).reshape(-1, 4)
    overlaps = _iou(boxes, np.asarray([t["bbox"] for t in plain], dtype=np.float64).reshape(-1, 4))
    crowd_overlaps = _iou(boxes, np.asarray([t["bbox"] for t in crowd], dtype=np.float64).reshape(-1, 4))
    free = np.ones(len(plain), dtype=bool)
    outcome = []
    for index, detection in enumerate(detections):
        candidates = np.where(free, overlaps[index], -1.0)
        best = int(candidates.argmax()) if len(plain) else -1
        if best >= 0 and candidates[best] >= iou:
            free[best] = False
            outcome.append((float(detection["score"]), True))
        elif not (crowd and crowd_overlaps[index].max() >= iou):
            outcome.append((float(detection["score"]), False))
    return outcome


def best_f1_threshold(ground_truth: Iterable[dict], detections: Iterable[dict], image_ids: Iterable[int] | None = None,
                      iou: float = MATCH_IOU, step: int | None = None) -> ScoreThreshold | None:
    """The score threshold that maximises F1 (module docstring) of ``detections``
    (COCO results entries: image_id, category_id, bbox xywh, score) against
    ``ground_truth`` (COCO annotations: image_id, category_id, bbox xywh, iscrowd),
    restricted to ``image_ids`` when given. Ties go to the higher threshold. None
    when there is nothing to find or no detection is right (F1 = 0 at every threshold)."""
    wanted = set(image_ids) if image_ids is not None else None
    truth: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for annotation in ground_truth:
        if wanted is None or annotation["image_id"] in wanted:
            truth[(annotation["image_id"], annotation["category_id"])].append(annotation)
    found: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for detection in detections:
        if (wanted is None or detection["image_id"] in wanted) and math.isfinite(detection["score"]):
            found[(detection["image_id"], detection["category_id"])].append(detection)
    total = sum(1 for group in truth.values() for t in group if not t.get("iscrowd"))
    outcome = [o for key, group in found.items() for o in _match_group(group, truth.get(key, []), iou)]
    if total == 0 or not any(tp for _, tp in outcome):
        return None
    outcome.sort(key=lambda o: -o[0])
    scores = np.asarray([s for s, _ in outcome])
    true_positives = np.cumsum([tp for _, tp in outcome])
    last_of_ties = np.r_[scores[1:] != scores[:-1], True]  # a threshold keeps all detections of one score
    kept = np.flatnonzero(last_of_ties) + 1
    f1 = 2 * true_positives[kept - 1] / (kept + total)
    best = int(np.argmax(f1))  # the first maximum: the highest threshold
    count, tp = int(kept[best]), int(true_positives[kept[best] - 1])
    lowest = scores[count - 1]
    threshold = (lowest + scores[count]) / 2 if count < len(scores) else lowest
    return ScoreThreshold(threshold=float(threshold), f1=float(f1[best]), precision=tp / count, recall=tp / total,
                          true_positives=tp, kept=count, ground_truth=total, iou=iou, step=step)


def stored_score_threshold(content: Any, path: str | os.PathLike = "the checkpoint") -> float | None:
    """The calibrated threshold stored in a checkpoint's content, or None (no
    calibration, or one measured on other weights than the file's: a checkpoint
    written at another step than the last evaluation). A malformed entry is a
    CheckpointError naming ``path``."""
    if not isinstance(content, dict) or content.get("score_threshold") is None:
        return None
    stored = content["score_threshold"]
    value = stored.get("threshold") if isinstance(stored, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise CheckpointError(f"{path}: 'score_threshold' must be a mapping with a 'threshold' in [0, 1], got "
                              f"{stored!r:.80}; the file was not written by detr_deform (or was edited)")
    step = stored.get("step")
    if step is not None and content.get("step") is not None and step != content["step"]:
        return None
    return float(value)


__all__ = ["DEFAULT_SCORE_THRESHOLD", "MATCH_IOU", "ScoreThreshold", "best_f1_threshold", "stored_score_threshold"]
