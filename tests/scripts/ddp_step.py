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
from detr_deform.engine.ddp_check import fresh, max_diff, step_agreement  # noqa: E402
from detr_deform.engine.measure import synthetic_batch  # noqa: E402
from detr_deform.engine.steps import accumulated_step, train_step  # noqa: E402
from detr_deform.utils import distributed  # noqa: E402

from model_helpers import tiny_config  # noqa: E402

SIZE = 64  # images of SIZE x SIZE: the gradient bound's n is images x (SIZE / 4)^2 (engine/ddp_check.py)


def make_batch(counts=(2, 1, 3, 0)):
    return synthetic_batch(counts, SIZE, SIZE, num_classes=5, seed=7)


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
