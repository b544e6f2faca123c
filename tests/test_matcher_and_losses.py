"""Hungarian matcher, focal loss, GIoU and criterion normalisation."""
import itertools

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from detr_deform.models.criterion import SetCriterion, build_weight_dict
from detr_deform.models.matcher import HungarianMatcher
from detr_deform.utils.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

from model_helpers import random_targets


def independent_cost(logits, boxes, labels, tgt_boxes, alpha=0.25, gamma=2.0):
    """The official matching cost written out element by element."""
    q, t = logits.shape[0], labels.shape[0]
    cost = torch.zeros(q, t, dtype=torch.float64)
    for i in range(q):
        for j in range(t):
            p = torch.sigmoid(logits[i, labels[j]].double())
            pos = alpha * (1 - p) ** gamma * -torch.log(p + 1e-8)
            neg = (1 - alpha) * p ** gamma * -torch.log(1 - p + 1e-8)
            l1 = (boxes[i].double() - tgt_boxes[j].double()).abs().sum()
            giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes[i:i + 1].double()),
                                       box_cxcywh_to_xyxy(tgt_boxes[j:j + 1].double()))[0, 0]
            cost[i, j] = 2 * (pos - neg) + 5 * l1 - 2 * giou
    return cost


@pytest.mark.parametrize("seed", range(5))
def test_matcher_is_optimal_against_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    num_queries, num_classes = 6, 4
    counts = [3, 1, 6]
    outputs = {"pred_logits": torch.randn(len(counts), num_queries, num_classes, generator=g),
               "pred_boxes": torch.cat([torch.rand(len(counts), num_queries, 2, generator=g) * 0.6 + 0.2,
                                        torch.rand(len(counts), num_queries, 2, generator=g) * 0.3 + 0.05], -1)}
    targets = random_targets(counts, num_classes, generator=g)
    indices = HungarianMatcher()(outputs, targets)
    for b, (t, (src, tgt)) in enumerate(zip(targets, indices)):
        cost = independent_cost(outputs["pred_logits"][b], outputs["pred_boxes"][b], t["labels"], t["boxes"])
        assert len(src) == len(tgt) == len(t["labels"])
        assert len(set(src.tolist())) == len(src)
        ours = cost[src, tgt].sum()
        best = min(sum(cost[q, j] for j, q in enumerate(perm))
                   for perm in itertools.permutations(range(num_queries), len(t["labels"])))
        assert ours == pytest.approx(float(best), rel=1e-6, abs=1e-6)


def test_matcher_handles_images_without_targets():
    outputs = {"pred_logits": torch.randn(2, 5, 3), "pred_boxes": torch.rand(2, 5, 4) * 0.5 + 0.2}
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    indices = HungarianMatcher()(outputs, [empty, empty])
    assert all(len(s) == 0 and len(t) == 0 and s.dtype == torch.int64 for s, t in indices)
    indices = HungarianMatcher()(outputs, [empty, random_targets([2], 3)[0]])
    assert len(indices[0][0]) == 0 and len(indices[1][0]) == 2


def test_matcher_costs_in_float32_under_autocast():
    outputs = {"pred_logits": torch.randn(2, 8, 3), "pred_boxes": torch.rand(2, 8, 4) * 0.5 + 0.2}
    targets = random_targets([3, 2], 3)
    reference = HungarianMatcher()(outputs, targets)
    low = {k: v.bfloat16() for k, v in outputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        indices = HungarianMatcher()({k: v.float() for k, v in low.items()}, targets)
        indices_low = HungarianMatcher()(low, targets)
    for (a, b), (c, d) in zip(indices, indices_low):
        assert torch.equal(a, c) and torch.equal(b, d)
    assert len(reference) == 2


def test_matcher_rejects_non_finite_predictions():
    outputs = {"pred_logits": torch.randn(1, 4, 3), "pred_boxes": torch.full((1, 4, 4), float("nan"))}
    with pytest.raises(FloatingPointError, match="non-finite"):
        HungarianMatcher()(outputs, random_targets([2], 3))


def make_criterion(num_classes=4, dec_layers=1, two_stage=False):
    weights = build_weight_dict(2, 5, 2, dec_layers, True, two_stage)
    return SetCriterion(num_classes, HungarianMatcher(), weights)


def test_focal_loss_matches_torchvision():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 7, 4, generator=g)
    outputs = {"pred_logits": logits, "pred_boxes": torch.rand(2, 7, 4, generator=g) * 0.5 + 0.2}
    targets = random_targets([3, 2], 4, generator=g)
    criterion = make_criterion()
    indices = criterion.matcher(outputs, targets)
    loss = criterion.loss_labels(outputs, targets, indices, num_boxes=5.0)["loss_ce"]
    onehot = torch.zeros_like(logits)
    for b, (src, tgt) in enumerate(indices):
        onehot[b, src, targets[b]["labels"][tgt]] = 1
    expected = sigmoid_focal_loss(logits, onehot, alpha=0.25, gamma=2, reduction="sum") / 5.0
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_box_losses_and_normalisation():
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]]])
    outputs = {"pred_logits": torch.zeros(1, 2, 2), "pred_boxes": boxes}
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.4]])}]
    criterion = make_criterion(num_classes=2)
    losses = criterion(outputs, targets)
    # Query 0 is matched: L1 = 0.2, GIoU = IoU = 0.5.
    assert losses["loss_bbox"].item() == pytest.approx(0.2, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0.5, abs=1e-6)
    assert losses["class_error"].item() == pytest.approx(0.0)


def test_criterion_with_no_targets_at_all():
    outputs = {"pred_logits": torch.randn(2, 5, 3, requires_grad=True),
               "pred_boxes": torch.rand(2, 5, 4).requires_grad_()}
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    losses = make_criterion(num_classes=3)(outputs, [empty, empty])
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    assert losses["class_error"].item() == 100  # official: accuracy of zero matches is 0
    assert torch.isfinite(losses["loss_ce"]) and losses["loss_ce"] > 0
    losses["loss_ce"].backward()  # every query is pushed towards "no object"
    assert torch.isfinite(outputs["pred_logits"].grad).all()


def test_two_stage_encoder_loss_uses_class_agnostic_targets():
    g = torch.Generator().manual_seed(1)
    outputs = {"pred_logits": torch.randn(1, 6, 4, generator=g),
               "pred_boxes": torch.rand(1, 6, 4, generator=g) * 0.4 + 0.3,
               "enc_outputs": {"pred_logits": torch.randn(1, 9, 4, generator=g),
                               "pred_boxes": torch.rand(1, 9, 4, generator=g) * 0.4 + 0.3}}
    targets = [{"labels": torch.tensor([3, 2]), "boxes": torch.tensor([[0.4, 0.4, 0.2, 0.2], [0.6, 0.6, 0.1, 0.3]])}]
    criterion = make_criterion(two_stage=True)
    losses = criterion(outputs, targets)
    bin_targets = [{"labels": torch.zeros(2, dtype=torch.int64), "boxes": targets[0]["boxes"]}]
    indices = criterion.matcher(outputs["enc_outputs"], bin_targets)
    expected = criterion.loss_labels(outputs["enc_outputs"], bin_targets, indices, 2.0, log=False)["loss_ce"]
    torch.testing.assert_close(losses["loss_ce_enc"], expected)
    assert targets[0]["labels"].tolist() == [3, 2]  # the caller's targets are untouched


def test_generalized_box_iou_properties():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(20, 2, generator=g)
    boxes = torch.cat([xy, xy + torch.rand(20, 2, generator=g) * 0.5 + 0.01], -1)
    giou = generalized_box_iou(boxes, boxes)
    torch.testing.assert_close(giou.diagonal(), torch.ones(20))
    torch.testing.assert_close(giou, giou.T)
    assert (giou <= 1 + 1e-6).all() and (giou >= -1 - 1e-6).all()
    far = generalized_box_iou(torch.tensor([[0.0, 0.0, 0.1, 0.1]]), torch.tensor([[10.0, 10.0, 10.1, 10.1]]))
    assert far.item() < -0.99
    inner = generalized_box_iou(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([[0.0, 0.0, 0.5, 0.5]]))
    assert inner.item() == pytest.approx(0.25)
