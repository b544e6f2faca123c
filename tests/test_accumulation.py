"""Gradient accumulation is exactly a larger batch (equal-size images, so that
padding is the same); distributed accumulation: test_distributed_step.py."""
import copy

import pytest
import torch

from detr_deform import build_criterion, build_model
from detr_deform.engine.steps import accumulated_step, train_step

from model_helpers import random_targets, tiny_config


@pytest.mark.parametrize("clip", [0.1, 0.0])
def test_two_micro_batches_of_two_equal_one_batch_of_four(clip):
    torch.manual_seed(0)
    cfg = tiny_config(with_box_refine=True, two_stage=True)
    big = build_model(cfg)
    small = copy.deepcopy(big)
    criterion = build_criterion(cfg)
    g = torch.Generator().manual_seed(3)
    images = [torch.randn(3, 64, 64, generator=g) for _ in range(4)]
    targets = random_targets([2, 0, 3, 1])          # box counts differ between the micro-batches
    # SGD: the update is proportional to the gradient (Adam's first step, g / (|g| + eps), would turn
    # rounding-level differences of near-zero gradients into full-size steps).
    big_losses, big_total, big_norm = train_step(big, criterion, images, targets,
                                                 torch.optim.SGD(big.parameters(), lr=0.1), clip)
    losses, total, norm = accumulated_step(small, criterion, [(images[:2], targets[:2]), (images[2:], targets[2:])],
                                           torch.optim.SGD(small.parameters(), lr=0.1), clip)
    assert total == pytest.approx(big_total, rel=1e-6)
    assert float(norm) == pytest.approx(float(big_norm), rel=1e-5)
    for key in ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_enc", "loss_bbox_0"):
        assert losses[key] == pytest.approx(big_losses[key], rel=1e-5), key
    moved = max((a - b).abs().max().item() for a, b in zip(big.parameters(), build_model(cfg).parameters()))
    assert moved > 1e-4
    for (name, a), b in zip(big.named_parameters(), small.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=name)


def test_more_micro_batches_per_step_than_an_epoch_has_is_refused():
    from detr_deform.config import Config, ConfigError
    from detr_deform.engine.loop import optimizer_steps_per_epoch

    cfg = Config()
    cfg.optim.accumulate_steps = 4
    assert optimizer_steps_per_epoch(9, cfg) == 2  # the last micro-batch is left out, as drop_last would
    with pytest.raises(ConfigError, match=r"optim.accumulate_steps=4 but an epoch has only 3 batch\(es\)"):
        optimizer_steps_per_epoch(3, cfg)
