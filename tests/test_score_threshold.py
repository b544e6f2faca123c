"""The F1-maximising score threshold (detr_deform.evaluation.score_threshold) on hand-made
detections, and how a checkpoint's stored threshold is read."""
import pytest

from detr_deform.evaluation.score_threshold import (
    DEFAULT_SCORE_THRESHOLD,
    best_f1_threshold,
    stored_score_threshold,
)
from detr_deform.io.checkpoint import CheckpointError


def gt(image, category, box, crowd=0):
    return {"image_id": image, "category_id": category, "bbox": list(box), "iscrowd": crowd}


def det(image, category, box, score):
    return {"image_id": image, "category_id": category, "bbox": list(box), "score": score}


SQUARE = (0, 0, 10, 10)
SHIFTED = (5, 0, 10, 10)   # IoU with SQUARE: 50 / 150 = 1/3 < 0.5
NEAR = (1, 0, 10, 10)      # IoU with SQUARE: 90 / 110 = 0.82


def test_the_threshold_keeps_the_detections_that_maximise_f1():
    truth = [gt(1, 1, SQUARE), gt(2, 1, SQUARE), gt(3, 2, SQUARE)]
    found = [det(1, 1, NEAR, 0.9),      # TP
             det(2, 1, NEAR, 0.8),      # TP
             det(1, 1, SHIFTED, 0.7),   # FP (IoU 1/3)
             det(3, 1, SQUARE, 0.6),    # FP: right box, wrong class
             det(3, 2, SQUARE, 0.4),    # TP
             det(2, 2, SQUARE, 0.2)]    # FP: no circle in image 2
    result = best_f1_threshold(truth, found)
    # keeping 2 (TP TP): F1 = 4/5 = 0.8; 3: 4/6; 4: 4/7; 5 (3 TP, 2 FP): 6/8 = 0.75; 6: 6/9
    assert result.kept == 2 and result.true_positives == 2 and result.ground_truth == 3
    assert result.f1 == pytest.approx(0.8) and result.precision == 1.0 and result.recall == pytest.approx(2 / 3)
    assert result.threshold == pytest.approx((0.8 + 0.7) / 2)  # half-way to the next score
    # the threshold keeps exactly those detections
    assert sum(d["score"] >= result.threshold for d in found) == 2


def test_a_duplicate_is_a_false_positive_and_a_lower_threshold_can_win():
    truth = [gt(1, 1, SQUARE), gt(1, 1, (20, 20, 10, 10))]
    found = [det(1, 1, SQUARE, 0.9), det(1, 1, NEAR, 0.8),   # the second matches the same box: FP
             det(1, 1, (20, 20, 10, 10), 0.5), det(1, 1, (21, 20, 10, 10), 0.3)]
    result = best_f1_threshold(truth, found)
    # kept 1: 2/3; 2: 2/4; 3 (2 TP): 4/5 = 0.8; 4: 4/6
    assert (result.kept, result.true_positives) == (3, 2) and result.f1 == pytest.approx(0.8)
    assert result.threshold == pytest.approx(0.4)


def test_ties_are_kept_together_and_the_lowest_score_is_the_threshold_when_all_are_kept():
    truth = [gt(1, 1, SQUARE), gt(2, 1, SQUARE)]
    found = [det(1, 1, SQUARE, 0.5), det(2, 1, SQUARE, 0.5)]
    result = best_f1_threshold(truth, found)
    assert (result.kept, result.f1, result.threshold) == (2, 1.0, 0.5)


def test_crowd_regions_and_image_restriction():
    truth = [gt(1, 1, SQUARE), gt(1, 1, (30, 30, 20, 20), crowd=1), gt(2, 1, SQUARE)]
    found = [det(1, 1, SQUARE, 0.9), det(1, 1, (30, 30, 20, 20), 0.8), det(2, 1, SQUARE, 0.7)]
    everything = best_f1_threshold(truth, found)
    # the crowd detection counts neither way: 2 TP of 2 objects
    assert (everything.kept, everything.true_positives, everything.ground_truth, everything.f1) == (2, 2, 2, 1.0)
    only_first = best_f1_threshold(truth, found, image_ids=[1])
    assert (only_first.ground_truth, only_first.kept, only_first.threshold) == (1, 1, 0.9)


def test_nothing_to_find_or_nothing_right_gives_none():
    assert best_f1_threshold([], [det(1, 1, SQUARE, 0.9)]) is None
    assert best_f1_threshold([gt(1, 1, SQUARE)], [det(1, 2, SQUARE, 0.9), det(1, 1, SHIFTED, 0.8)]) is None
    assert best_f1_threshold([gt(1, 1, SQUARE)], []) is None


def test_stored_threshold_is_per_weights_and_checked():
    record = best_f1_threshold([gt(1, 1, SQUARE)], [det(1, 1, SQUARE, 0.6)], step=30).to_dict()
    assert stored_score_threshold({"score_threshold": record, "step": 30}) == 0.6
    # written at another step than the evaluation it came from (e.g. eval_every > 1): other weights
    assert stored_score_threshold({"score_threshold": record, "step": 45}) is None
    assert stored_score_threshold({"model": {}}) is None                  # older checkpoints
    assert stored_score_threshold({"model": {}, "args": object()}) is None  # official files
    with pytest.raises(CheckpointError, match="x.pth: 'score_threshold' must be a mapping"):
        stored_score_threshold({"score_threshold": {"threshold": 7}}, "x.pth")
    assert 0 < DEFAULT_SCORE_THRESHOLD < 1
