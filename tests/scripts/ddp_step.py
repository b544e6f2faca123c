"""Launched by torchrun (2 processes, gloo): one DDP training step over a global
batch of 4 images vs one single-process step over the same 4 images; and one
DDP step with gradient accumulation (2 ranks x 2 micro-batches x 2 images) vs
one single-process step over the same 8 images; and a DDP step in which only
rank 1's predictions are NaN (unmatchable): both ranks must skip the update
together instead of rank 0 waiting for an all-reduce that never comes."""
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from detr_deform import build_criterion, build_model  # noqa: E402
from detr_deform.config import OptimConfig  # noqa: E402
from detr_deform.engine.optim import build_optimizer  # noqa: E402
from detr_deform.engine.steps import accumulated_step, train_step  # noqa: E402
from detr_deform.utils import distributed  # noqa: E402

from model_helpers import tiny_config  # noqa: E402


def make_batch(counts=(2, 1, 3, 0)):
    g = torch.Generator().manual_seed(7)
    images = [torch.randn(3, 64, 64, generator=g) for _ in counts]
    targets = []
    for count in counts:
        centres = torch.rand(count, 2, generator=g) * 0.5 + 0.25
        sizes = torch.rand(count, 2, generator=g) * 0.2 + 0.1
        targets.append({"labels": torch.randint(0, 5, (count,), generator=g), "boxes": torch.cat([centres, sizes], -1)})
    return images, targets


LR = 1e-3


def fresh(cfg):
    torch.manual_seed(0)
    model = build_model(cfg)
    optim_cfg = OptimConfig(lr=LR, lr_backbone=LR, clip_max_norm=0.1)
    return model, build_criterion(cfg), build_optimizer(model, optim_cfg)


def max_diff(a, b) -> float:
    return max((p - b.state_dict()[name]).abs().max().item() for name, p in a.state_dict().items()
               if p.is_floating_point())


UNIT = 2.0 ** -24  # float32 unit roundoff


def step_agreement(a, b, optimizer, eps: float = 1e-8) -> dict[str, float]:
    """How far two models after one AdamW step from the same weights are apart, in units that the
    tolerances of tests/test_distributed_step.py are derived in.

    - ``grad_ulps``: max over tensors of max|g_a - g_b| / (u * max|g_b|): the gradients' disagreement
      relative to each tensor's largest gradient, u = 2^-24.
    - ``weight_excess_ulps``: what of the weights' difference the gradients' difference does not
      explain. The first AdamW step moves a weight by lr * g / (|g| + eps) (bias-corrected moments),
      so a gradient that differs by rounding moves its weight by lr * |d(g / (|g| + eps))| — up to
      lr * |dg| / eps for a gradient near 0, far more than a float32 ulp of the weight. That part is
      computed exactly (float64) from both runs' gradients; the rest may only be the rounding of the
      update itself, counted in units of u * (|w| + lr) per element.
    """
    grad_ulps = excess = 0.0
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    b_params = dict(b.named_parameters())
    for name, p in a.named_parameters():
        q = b_params[name]
        if p.grad is None:
            continue
        lr = lr_of[id(p)]  # the sampling offsets and reference points train at 0.1 x lr
        scale = q.grad.abs().max().item()
        if scale > 0:
            grad_ulps = max(grad_ulps, (p.grad - q.grad).abs().max().item() / (UNIT * scale))
        g_a, g_b = p.grad.double(), q.grad.double()
        explained = lr * (g_a / (g_a.abs() + eps) - g_b / (g_b.abs() + eps)).abs()
        rest = ((p.detach().double() - q.detach().double()).abs() - explained).clamp_min(0)
        excess = max(excess, (rest / (UNIT * (q.detach().double().abs() + lr))).max().item())
    return {"grad_ulps": grad_ulps, "weight_excess_ulps": excess}


def main(out_path: str) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))  # a hang fails, not stalls
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = tiny_config(with_box_refine=True, two_stage=True, dropout=0.0)
    images, targets = make_batch()
    model, criterion, optimizer = fresh(cfg)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    per_rank = len(images) // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    train_step(ddp, criterion, images[mine], targets[mine], optimizer, 0.1)

    images8, targets8 = make_batch((2, 1, 3, 0, 1, 4, 2, 1))
    accum_model, accum_criterion, accum_optimizer = fresh(cfg)
    accum_ddp = torch.nn.parallel.DistributedDataParallel(accum_model)
    start = rank * 4  # this rank's 4 images, as 2 micro-batches of 2
    micro = [(images8[start:start + 2], targets8[start:start + 2]), (images8[start + 2:start + 4],
                                                                       targets8[start + 2:start + 4])]
    accumulated_step(accum_ddp, accum_criterion, micro, accum_optimizer, 0.1)

    nan_model, nan_criterion, nan_optimizer = fresh(cfg)
    before = {k: v.clone() for k, v in nan_model.state_dict().items()}
    nan_ddp = torch.nn.parallel.DistributedDataParallel(nan_model)
    nan_images = [im * float("nan") if rank == 1 else im for im in images[mine]]
    nan_values, nan_total, nan_norm = train_step(nan_ddp, nan_criterion, nan_images, targets[mine], nan_optimizer, 0.1)
    nan_step = {"total_finite": bool(torch.isfinite(torch.tensor(nan_total))),
                "norm_finite": bool(torch.isfinite(nan_norm)),
                "unchanged": all(torch.equal(v, before[k]) for k, v in nan_model.state_dict().items())}
    # ... and the training loop's decision is taken together: rank 1's non-finite step counts on rank 0 too.
    nan_step["any_rank_nonfinite"] = distributed.any_rank(not nan_step["total_finite"], torch.device("cpu"))
    gathered = [None] * world
    dist.all_gather_object(gathered, nan_step)
    dist.barrier()
    dist.destroy_process_group()  # the single-process references must not all-reduce
    if rank == 0:
        reference, ref_criterion, ref_optimizer = fresh(cfg)
        train_step(reference, ref_criterion, images, targets, ref_optimizer, 0.1)
        reference8, ref8_criterion, ref8_optimizer = fresh(cfg)
        train_step(reference8, ref8_criterion, images8, targets8, ref8_optimizer, 0.1)
        Path(out_path).write_text(json.dumps({
            "max_diff": max_diff(model, reference), "max_change": max_diff(reference, fresh(cfg)[0]),
            "accumulated_max_diff": max_diff(accum_model, reference8),
            "accumulated_max_change": max_diff(reference8, fresh(cfg)[0]), "nan_step": gathered,
            "step": step_agreement(model, reference, optimizer),
            "accumulated_step": step_agreement(accum_model, reference8, accum_optimizer)}))


if __name__ == "__main__":
    main(sys.argv[1])
