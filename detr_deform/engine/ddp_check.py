"""One DDP training step against one single-process step over the same images from the same
weights: the models, the agreement measure and its bounds, derived from the computation (not from
the machine it first ran on). Used by tests/scripts/ddp_step.py (2 CPU processes, gloo) and
tools/gpu_check.py (NCCL); the batch is engine/measure.py's synthetic one.

Why these bounds (float results differ in their last bits between CPU kinds — AVX2 vs AVX-512
kernels, per-batch-size convolution algorithms — and between GPUs):

- Gradients: DDP sums the same per-image terms in another grouping (e.g. 2 ranks x 2 images, then
  an average, vs 4 images), so an element may differ by the rounding of its sum, at most
  n * u * sum|terms| for n terms (recursive summation, u = 2^-24). A trained weight of the tiny
  models sums at most images x (H/4) x (W/4) positions per element (layer2's input at stride 4; the
  stem and layer1 are frozen as in the official code): allowed n * u relative to the tensor's
  largest gradient (``summed_terms``).
- Weights: the first AdamW step moves a weight by lr * g / (|g| + eps), so the gradients'
  difference moves it by lr * |d(g / (|g| + eps))| — up to lr * |dg| / eps near g = 0, far more
  than a float32 ulp of the weight (why a plain bound such as 1e-6 held on one CPU kind and failed
  on another). That part is computed exactly (float64) from both runs' gradients; what remains is
  the rounding of the update itself: about 10 float32 roundings along torch's AdamW update per run,
  each at most u * (|w| + lr), so ``WEIGHT_EXCESS_ULPS`` = 20 for the pair.
"""
from __future__ import annotations

import torch
from torch import nn

from detr_deform.config import OptimConfig
from detr_deform.engine.optim import build_optimizer
from detr_deform.models.build import build_criterion, build_model
from detr_deform.models.config import ModelConfig

UNIT = 2.0 ** -24  # float32 unit roundoff
LR = 1e-3
WEIGHT_EXCESS_ULPS = 20


def fresh(cfg: ModelConfig, device: torch.device | str = "cpu") -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    """The model (seed 0: the same initial weights on every rank), criterion and AdamW optimizer."""
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    optimizer = build_optimizer(model, OptimConfig(lr=LR, lr_backbone=LR, clip_max_norm=0.1))
    return model, build_criterion(cfg).to(device), optimizer


def max_diff(a: nn.Module, b: nn.Module) -> float:
    """The largest difference between the two models' floating-point weights and buffers."""
    other = b.state_dict()
    return max((p - other[name]).abs().max().item() for name, p in a.state_dict().items() if p.is_floating_point())


def summed_terms(images: int, height: int, width: int) -> int:
    """n of the gradient bound: the positions a trained weight's gradient sums over per element."""
    return images * (height // 4) * (width // 4)


def step_agreement(a: nn.Module, b: nn.Module, optimizer: torch.optim.Optimizer,
                   eps: float = 1e-8) -> dict[str, float]:
    """How far two models after one AdamW step from the same weights are apart, in the units of the
    bounds above: ``grad_ulps`` = max over tensors of max|g_a - g_b| / (u * max|g_b|), and
    ``weight_excess_ulps`` = what of the weights' difference the gradients' difference does not
    explain, in units of u * (|w| + lr) per element. ``optimizer`` is ``a``'s (for the lr of each
    parameter: the sampling offsets and reference points train at 0.1 x lr)."""
    grad_ulps = excess = 0.0
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    b_params = dict(b.named_parameters())
    for name, p in a.named_parameters():
        q = b_params[name]
        if p.grad is None:
            continue
        lr = lr_of[id(p)]
        scale = q.grad.abs().max().item()
        if scale > 0:
            grad_ulps = max(grad_ulps, (p.grad - q.grad).abs().max().item() / (UNIT * scale))
        g_a, g_b = p.grad.double(), q.grad.double()
        explained = lr * (g_a / (g_a.abs() + eps) - g_b / (g_b.abs() + eps)).abs()
        rest = ((p.detach().double() - q.detach().double()).abs() - explained).clamp_min(0)
        excess = max(excess, (rest / (UNIT * (q.detach().double().abs() + lr))).max().item())
    return {"grad_ulps": grad_ulps, "weight_excess_ulps": excess}


def agreement_problems(agreement: dict[str, float], terms: int) -> list[str]:
    """What of ``step_agreement``'s result exceeds the bounds (empty: the two steps agree)."""
    problems = []
    if agreement["grad_ulps"] > terms:
        problems.append(f"gradients differ by {agreement['grad_ulps']:.0f} u of their largest value "
                        f"(bound: n = {terms} summed terms)")
    if agreement["weight_excess_ulps"] > WEIGHT_EXCESS_ULPS:
        problems.append(f"weights differ by {agreement['weight_excess_ulps']:.1f} u beyond what the gradients "
                        f"explain (bound: {WEIGHT_EXCESS_ULPS})")
    return problems
