"""Checks of the compiled operator on a device (a GPU, or the CPU for a dry run).

Run by ``python tools/gpu_check.py`` (part "op_tests"). They reuse the emulated
checks of :mod:`detr_deform.ops.kernel_checks` with the real op as the runner,
and add what only a device can show: agreement with the CPU op and with the
emulation, gradcheck, non-contiguous inputs, run-to-run bitwise determinism
under real scheduling, a second GPU, and index ranges beyond 2^31 elements in
real memory. Each check returns a one-line note or raises CheckFailed (an AssertionError raised
explicitly through ``require``, so that ``python -O`` cannot remove it).
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from detr_deform.ops import emulation, kernel_checks
from detr_deform.ops.functional import ms_deform_attn
from detr_deform.ops.kernel_checks import CASES, CROWDED, GRAD_NAMES, assert_close, make_inputs, reference
from detr_deform.utils.require import require


def op_runner(device: torch.device | str) -> kernel_checks.Runner:
    """A kernel_checks runner calling torch.ops.detr_deform.* on ``device``; results stay there."""
    device = torch.device(device)

    def run(inputs: tuple[torch.Tensor, ...], *, deterministic: bool = False, wide_keys: bool = False,
            shuffle_seed: int = 0, max_blocks: int | None = None) -> tuple[torch.Tensor, ...]:
        # The op has no switch for 64-bit sort keys (it takes them only when N*S*M >= 2^31 - 1, i.e.
        # ~17 GB of fp32 value at D = 32 -- more than a check can afford): a check that asks for them
        # must say it is emulation-only, not get a silent 32-bit run. Thread order and the block cap
        # are the real scheduler's on a device: those emulation knobs mean nothing here.
        require(not wide_keys, "the device op cannot be forced to 64-bit sort keys: make that case emulation-only")
        del shuffle_seed, max_blocks
        value, shapes, starts, locations, weights, grad_output = (t.to(device) for t in inputs)
        out = torch.ops.detr_deform.ms_deform_attn_forward(value, shapes, starts, locations, weights, deterministic)
        grads = torch.ops.detr_deform.ms_deform_attn_backward(grad_output, value, shapes, starts, locations, weights,
                                                              deterministic)
        return (out, *grads)

    return run


def check_matches_cpu_op_and_emulation(device: torch.device, case: str, dtype: torch.dtype) -> str:
    """The device op vs the CPU op and vs the emulated CUDA kernels, at the dtype's tolerance."""
    inputs = make_inputs(CASES[case], dtype)
    ours = op_runner(device)(inputs, deterministic=True)
    cpu = op_runner("cpu")(inputs)
    assert_close(ours, tuple(t.double() for t in cpu), dtype, "vs the CPU op")
    try:
        emulation.load_emulation()
    except emulation.OpsBuildError as error:
        return f"agrees with the CPU op; emulation not compared ({str(error).splitlines()[0][:80]})"
    emulated = kernel_checks.emulated(inputs, deterministic=True)
    assert_close(ours, tuple(t.double() for t in emulated), dtype, "vs the emulated CUDA kernels")
    return "agrees with the CPU op and the emulated CUDA kernels"


def check_gradcheck_fp64(device: torch.device) -> str:
    """torch.autograd.gradcheck in float64, both backward paths."""
    value, shapes, starts, locations, weights, _ = make_inputs(
        kernel_checks.Case(((3, 4), (2, 2)), batch=1, heads=2, channels=3, queries=3, points=2, spread=1.0))
    shapes, starts = shapes.to(device), starts.to(device)
    for deterministic in (False, True):
        leaves = tuple(t.to(device).requires_grad_() for t in (value, locations, weights))

        def fn(v, loc, w, deterministic=deterministic):  # bound now: gradcheck calls it within this iteration
            return ms_deform_attn(v, shapes, starts, loc, w, impl="cpp", deterministic=deterministic)

        # gradcheck also runs the backward twice: the atomic path may differ in the last bits
        # (nondet_tol), the deterministic one must not (nondet_tol=0).
        require(torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5, rtol=1e-4,
                                        nondet_tol=0.0 if deterministic else 1e-12),
                f"deterministic={deterministic}")
    return "passes for the atomic and the deterministic backward (reentrant, bitwise, for the latter)"


def check_non_contiguous(device: torch.device) -> str:
    """Strided value / locations / weights give the reference's result (forward and gradients)."""
    inputs = make_inputs(CASES["odd_multi_level"])
    value, shapes, starts, locations, weights, grad_output = (t.to(device) for t in inputs)
    value_nc = value.transpose(1, 2).contiguous().transpose(1, 2)
    padded = torch.zeros(*locations.shape[:-1], 4, dtype=locations.dtype, device=device)
    padded[..., ::2] = locations
    weights_nc = weights.transpose(0, 1).contiguous().transpose(0, 1)
    leaves = [t.requires_grad_() for t in (value_nc, padded, weights_nc)]
    require(
        not any(t.is_contiguous() for t in (leaves[0], leaves[1][..., ::2], leaves[2])),
        "the non-contiguous inputs came out contiguous: the check would test nothing")
    out = ms_deform_attn(leaves[0], shapes, starts, leaves[1][..., ::2], leaves[2], impl="cpp")
    grads = torch.autograd.grad(out, leaves, grad_output)
    ours = (out, grads[0], grads[1][..., ::2], grads[2])
    assert_close(ours, reference(inputs), torch.float64, "non-contiguous")
    return "strided inputs handled"


def _encoder_scale_inputs(device: torch.device, tiny: bool) -> tuple[torch.Tensor, ...]:
    """Realistic encoder-scale inputs (tools/benchmark_ms_deform_attn.py's sizes) or CROWDED when tiny."""
    if tiny:
        return tuple(t.to(device) for t in make_inputs(CROWDED, torch.float32))
    levels = ((100, 167), (50, 84), (25, 42), (13, 21))
    case = kernel_checks.Case(levels, batch=1, heads=8, channels=32, queries=sum(h * w for h, w in levels),
                              points=4, spread=1.0)
    return tuple(t.to(device) for t in make_inputs(case, torch.float32))


def check_encoder_vs_pytorch(device: torch.device, tiny: bool = False) -> str:
    """At encoder scale in fp32, the forward and all three gradients of the atomic and the deterministic
    backward vs the pure-PyTorch (grid_sample) path on the same device. The atomic and deterministic
    paths share their per-sample code, so comparing them with each other cannot catch a bug in it.

    Tolerance: both sides sum in fp32; the longest sums are the value gradient's (at most a few
    hundred contributions per element here) and the location gradient's (D = 32 channels), so each
    side is within ~sqrt(K) * 6e-8 ~ 1e-6 of the largest magnitude; 2e-5 of it leaves a wide margin
    while a wrong tap, weight or index is off by O(1) of it."""
    value, shapes, starts, locations, weights = _encoder_scale_inputs(device, tiny)[:5]
    grad_output = torch.randn(value.shape[0], locations.shape[1], value.shape[2] * value.shape[3],
                              generator=torch.Generator().manual_seed(1)).to(device)
    results = {}
    for name, kwargs in (("pytorch", dict(impl="pytorch")), ("atomic", dict(impl="cpp")),
                         ("deterministic", dict(impl="cpp", deterministic=True))):
        leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
        out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], **kwargs)
        results[name] = (out.detach(), *torch.autograd.grad(out, leaves, grad_output))
    worst = 0.0
    for name in ("atomic", "deterministic"):
        for what, ours, ref in zip(GRAD_NAMES, results[name], results["pytorch"]):
            scale = max(float(ref.abs().max()), 1e-30)
            error = float((ours.double() - ref.double()).abs().max()) / scale
            require(error <= 2e-5, f"{name}: {what} is {error:.1e} of its largest magnitude from the pytorch path")
            worst = max(worst, error)
    return f"{value.shape[1]} queries: atomic and deterministic within {worst:.1e} of the pytorch path (all four)"


def check_opcheck(device: torch.device) -> str:
    """torch.library.opcheck of the forward and the backward op: schema, fake (meta) kernels, autograd
    registration and the AOT-dispatch traces agree with the real kernels (strides included)."""
    value, shapes, starts, locations, weights, grad_output = (
        t.to(device) for t in make_inputs(CASES["odd_multi_level"], torch.float32))
    leaves = [t.requires_grad_() for t in (value.clone(), locations.clone(), weights.clone())]
    forward = torch.ops.detr_deform.ms_deform_attn_forward.default
    backward = torch.ops.detr_deform.ms_deform_attn_backward.default
    noncontiguous = value.transpose(1, 2).contiguous().transpose(1, 2)
    for deterministic in (False, True):
        torch.library.opcheck(forward, (leaves[0], shapes, starts, leaves[1], leaves[2], deterministic))
        torch.library.opcheck(backward, (grad_output, value, shapes, starts, locations, weights, deterministic))
        torch.library.opcheck(backward, (grad_output, noncontiguous, shapes, starts, locations, weights,
                                         deterministic))
    return "forward and backward pass (atomic, deterministic; a non-contiguous value too)"


def check_deterministic_bitwise(device: torch.device, tiny: bool = False) -> str:
    """The deterministic backward twice (explicit flag, then torch's global deterministic mode):
    bitwise equal gradients; the atomic path is run twice too and whether it differed is reported.
    Both agree to fp32 rounding."""
    inputs = _encoder_scale_inputs(device, tiny)
    run = op_runner(device)
    first = run(inputs, deterministic=True)
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        second = run(inputs, deterministic=False)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    for name, a, b in zip(GRAD_NAMES, first, second):
        require(torch.equal(a, b), f"deterministic backward: {name} differs between two runs")
    atomic = [run(inputs, deterministic=False) for _ in range(2)]
    differs = not torch.equal(atomic[0][1], atomic[1][1])
    assert_close(first, tuple(t.double() for t in atomic[0]), torch.float32, "deterministic vs atomic")
    changed = int((atomic[0][1] != atomic[1][1]).sum())
    return (f"deterministic: bitwise equal twice; atomic grad_value {'differed' if differs else 'did not differ'} "
            f"between two runs ({changed} of {atomic[0][1].numel()} elements)")


def check_second_device(device: torch.device) -> str:
    """The same call on cuda:1 gives bitwise the deterministic results of cuda:0."""
    other = torch.device("cuda", 1 if (device.index or 0) == 0 else 0)
    inputs = make_inputs(CASES["encoder_like"], torch.float32)
    a = op_runner(device)(inputs, deterministic=True)
    b = op_runner(other)(inputs, deterministic=True)
    for name, x, y in zip(GRAD_NAMES, a, b):
        require(y.device == other, f"{name} came back on {y.device}")
        require(torch.equal(x.cpu(), y.cpu()), f"{name} differs between {device} and {other}")
    return f"{device} and {other} agree bitwise"


def device_checks(device: torch.device, tiny: bool = False) -> dict[str, Callable[[], str]]:
    """Name -> check for ``device``; ``tiny`` (CPU dry runs) leaves out what needs GPU memory."""
    checks: dict[str, Callable[[], str]] = {}
    run = op_runner(device)
    for case in CASES:
        for dtype in (torch.float64, torch.float32):
            name = f"{case}/{str(dtype)[6:]}"
            checks[f"reference/{name}"] = functools.partial(kernel_checks.check_against_reference, case, dtype, run)
            checks[f"cpu_op_and_emulation/{name}"] = functools.partial(check_matches_cpu_op_and_emulation, device,
                                                                      case, dtype)
    checks["gradcheck_fp64"] = functools.partial(check_gradcheck_fp64, device)
    checks["opcheck"] = functools.partial(check_opcheck, device)
    for dtype in (torch.float16, torch.bfloat16):
        checks[f"half_accumulation/{str(dtype)[6:]}"] = functools.partial(kernel_checks.check_half_accumulation,
                                                                          dtype, run)
        checks[f"mixed_precision/{str(dtype)[6:]}"] = functools.partial(kernel_checks.check_mixed_precision,
                                                                        dtype, run)
    checks["non_contiguous"] = functools.partial(check_non_contiguous, device)
    checks["layout_errors"] = functools.partial(
        kernel_checks.check_layout_memory,
        lambda *inputs: torch.ops.detr_deform.ms_deform_attn_forward(*inputs, False), device)
    checks["empty_inputs"] = functools.partial(kernel_checks.check_empty_inputs, run)
    checks["encoder_vs_pytorch"] = functools.partial(check_encoder_vs_pytorch, device, tiny)
    checks["deterministic_bitwise"] = functools.partial(check_deterministic_bitwise, device, tiny)
    if device.type == "cuda" and not tiny:
        checks["large_offsets"] = functools.partial(
            kernel_checks.check_large_offsets, run, lambda shape, dtype: torch.zeros(shape, dtype=dtype, device=device),
            wide_keys=False)
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        checks["second_device"] = functools.partial(check_second_device, device)
    return checks
