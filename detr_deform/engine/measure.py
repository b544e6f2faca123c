"""What the benchmarks measure, written once: a synthetic batch, the timed training step and
forward pass, and peak memory. Used by tools/benchmark.py, tools/gpu_check.py and the DDP step
check (engine/ddp_check.py). Timings are medians (utils/timing.py); no test asserts them."""
from __future__ import annotations

import gc
import resource
from collections.abc import Sequence

import torch
from torch import nn

from detr_deform.engine.steps import autocast_context, train_step
from detr_deform.utils.timing import median_seconds

MIB = 2 ** 20


def synthetic_batch(counts: Sequence[int], height: int, width: int, num_classes: int,
                    device: torch.device | str = "cpu", seed: int = 0) -> tuple[list[torch.Tensor], list[dict]]:
    """``len(counts)`` random 3 x height x width images and targets with ``counts[i]`` objects each
    (labels in [0, num_classes), boxes cxcywh: centres in [0.2, 0.8], sides in [0.05, 0.35]),
    drawn from one generator seeded with ``seed``: the same batch on every device and rank."""
    generator = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, height, width, generator=generator) for _ in counts]
    targets = []
    for count in counts:
        centres = torch.rand(count, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(count, 2, generator=generator) * 0.3 + 0.05
        targets.append({"labels": torch.randint(0, num_classes, (count,), generator=generator).to(device),
                        "boxes": torch.cat([centres, sizes], -1).to(device)})
    return [image.to(device) for image in images], targets


def reset_peak_memory(device: torch.device) -> None:
    """Frees what the last measurement left (its closures must be dropped first) and, on a GPU,
    restarts the peak counter."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float:
    """GPU: the peak of allocated memory since the last reset; CPU: the process' maximum resident
    set (which includes ~0.7 GB of Python/torch baseline and never goes down: one process per
    measurement)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def time_training_step(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                       images: list[torch.Tensor], targets: list[dict], device: torch.device, *,
                       clip_max_norm: float = 0.1, amp: str = "off", repeat: int = 5,
                       warmup: int = 2) -> tuple[float, list[float]]:
    """Median seconds of ``engine.steps.train_step`` (forward, losses, backward, clipping, AdamW),
    and the total loss of every step run (warm-up included)."""
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    losses: list[float] = []

    def step() -> None:
        losses.append(train_step(model, criterion, images, targets, optimizer, clip_max_norm, amp, scaler)[1])

    return median_seconds(step, device, repeat, warmup), losses


def time_inference(model: nn.Module, images: list[torch.Tensor], device: torch.device, *, amp: str = "off",
                   repeat: int = 5, warmup: int = 2) -> float:
    """Median seconds of one forward pass of ``model`` over ``images`` (no_grad, under ``amp``)."""
    def step() -> None:
        with torch.no_grad(), autocast_context(device, amp):
            model(images)

    return median_seconds(step, device, repeat, warmup)
