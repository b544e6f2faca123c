"""Learning-rate schedules: each curve against its formula, warm-up, the
official StepLR kept per epoch, exact resume, and the linear scaling rule."""
import math

import pytest
import torch

from detr_deform.config import OptimConfig
from detr_deform.engine.optim import LRSchedule, lr_scale_for

STEPS_PER_EPOCH = 5


def curve(optim_cfg: OptimConfig, epochs: int, state=None, start: int = 0):
    """The lr of the first parameter group at every optimizer step, stepping as the training loop does."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=optim_cfg.lr)
    schedule = LRSchedule(optimizer, optim_cfg, STEPS_PER_EPOCH)
    if state is not None:  # as resume_training does: the optimizer (its lr) and the schedule
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
    lrs, saved = [], None
    for step in range(start, epochs * STEPS_PER_EPOCH):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.after_step()
        if (step + 1) % STEPS_PER_EPOCH == 0:
            schedule.after_epoch()
        if step == 11:
            saved = {"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}
    return lrs, saved


def test_official_step_schedule_is_steplr_per_epoch():
    cfg = OptimConfig(lr=1.0, lr_drop=2, epochs=4)
    lrs, _ = curve(cfg, 4)
    assert not LRSchedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), cfg, 5).per_step
    assert lrs == [1.0] * 10 + [pytest.approx(0.1)] * 10


@pytest.mark.parametrize("name, overrides, expected", [
    ("step+warmup", dict(scheduler="step", lr_drop=2, warmup_steps=4, warmup_factor=0.2),
     lambda s: (0.1 if s >= 10 else 1.0) * (0.2 + 0.8 * s / 4 if s < 4 else 1.0)),
    ("multistep", dict(scheduler="multistep", milestones=[1, 3], gamma=0.5),
     lambda s: 0.5 ** ((s >= 5) + (s >= 15))),
    ("cosine", dict(scheduler="cosine", min_lr_ratio=0.1),
     lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / 20))),
    ("cosine+warmup", dict(scheduler="cosine", warmup_steps=3, warmup_factor=0.001),
     lambda s: 0.5 * (1 + math.cos(math.pi * s / 20)) * (0.001 + 0.999 * s / 3 if s < 3 else 1.0)),
])
def test_schedule_curves_and_exact_resume(name, overrides, expected):
    cfg = OptimConfig(lr=2.0, epochs=4, **overrides)
    lrs, saved = curve(cfg, 4)
    assert lrs == pytest.approx([2.0 * expected(s) for s in range(20)], rel=1e-12), name
    resumed, _ = curve(cfg, 4, state=saved, start=12)
    assert resumed == lrs[12:]  # bitwise: the same schedule object state continues


def test_auto_scale_lr_is_opt_in_and_linear_in_the_effective_batch():
    assert lr_scale_for(OptimConfig(batch_size=4, accumulate_steps=2), world_size=2) == 1.0
    assert lr_scale_for(OptimConfig(batch_size=4, accumulate_steps=2, auto_scale_lr=True), world_size=2) == 0.5
    assert lr_scale_for(OptimConfig(batch_size=4, auto_scale_lr=True), world_size=8) == 1.0
