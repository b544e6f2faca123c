"""Checks of the CUDA kernels through their CPU emulation (no GPU needed).

Each check runs the CUDA kernels' own code (:mod:`detr_deform.ops.emulation`)
and compares it with the pure-PyTorch reference, or with itself under other
thread orders / launch configurations; it raises CheckFailed (an AssertionError, raised
explicitly through ``require`` so that ``python -O`` cannot remove it) with a message
on failure and returns a one-line note on success. ``CHECKS`` maps names to
checks; tests/test_ms_deform_attn_emulated.py runs every one of them, and so
does ``python tools/gpu_check.py`` (part "emulation").

Tolerances (the reference runs in float64 on the same, already rounded inputs):
    float64  rtol = atol = 1e-10
    float32  rtol = 1e-5, atol = 1e-5 x the largest reference magnitude
    fp16 / bf16 with positive inputs (no cancellation): within 1 unit in the
        last place of the half type of the exact result -- what fp32
        accumulation and a single final rounding give; accumulating ~250
        contributions in half precision misses that by many units
    fp16 / bf16 vs the float32 kernels on random-sign inputs: rtol = atol =
        3e-3 (fp16) / 2e-2 (bf16), relative to the largest magnitude
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from detr_deform.ops import emulation
from detr_deform.ops.reference import ms_deform_attn_pytorch
from detr_deform.utils.require import require

GRAD_NAMES = ("output", "grad_value", "grad_locations", "grad_weights")
HALF_TOLERANCE = {torch.float16: 3e-3, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class Case:
    shapes: tuple[tuple[int, int], ...]
    batch: int = 2
    heads: int = 3
    channels: int = 5
    queries: int = 37        # 2 * 37 * 3 * 5 = 1110 outputs: not a multiple of the 256-thread block
    points: int = 4
    spread: float = 1.4      # locations in [-0.2, 1.2]: some samples fall outside the map
    positive: bool = False   # all inputs > 0 (no cancellation), for the half-precision bounds


CASES = {
    "odd_multi_level": Case(((7, 5), (3, 9), (2, 1))),
    "single_level": Case(((6, 4),)),
    "one_by_one_levels": Case(((1, 1), (1, 1))),
    "encoder_like": Case(((12, 20), (6, 10), (3, 5), (2, 3)), heads=2, channels=32, queries=50),
    "far_outside": Case(((5, 4), (2, 3)), spread=4.0),
}
# Many samples on few pixels: ~350 atomic adds per value element, in an order the schedule decides.
CROWDED = Case(((3, 3),), batch=1, heads=2, channels=8, queries=100, points=8, spread=1.0)
# ~256 contributions per value element and 256 channels per location gradient: long accumulations.
LONG_SUMS = Case(((4, 4),), batch=1, heads=1, channels=256, queries=64, points=16, spread=1.0, positive=True)


def make_inputs(case: Case, dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output)."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(case.shapes, dtype=torch.int64)
    areas = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    levels = len(case.shapes)
    value = torch.randn(case.batch, int(areas.sum()), case.heads, case.channels, generator=g, dtype=torch.float64)
    locations = torch.rand(case.batch, case.queries, case.heads, levels, case.points, 2, generator=g,
                           dtype=torch.float64) * case.spread - (case.spread - 1) / 2
    weights = torch.rand(case.batch, case.queries, case.heads, levels, case.points, generator=g, dtype=torch.float64)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    grad_output = torch.randn(case.batch, case.queries, case.heads * case.channels, generator=g, dtype=torch.float64)
    if case.positive:
        value, grad_output = value.abs() + 0.1, grad_output.abs() + 0.1
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in
                 (value, shapes, starts, locations, weights, grad_output))


def reference(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """(output, grad_value, grad_locations, grad_weights) of the grid_sample reference in float64."""
    value, shapes, _, locations, weights, grad_output = (t.double() if t.is_floating_point() else t for t in inputs)
    leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
    out = ms_deform_attn_pytorch(leaves[0], shapes, leaves[1], leaves[2])
    return (out.detach(), *torch.autograd.grad(out, leaves, grad_output))


# A runner computes (output, grad_value, grad_locations, grad_weights) from make_inputs' tuple:
# ``emulated`` below, or the compiled op on a device (detr_deform.ops.device_checks).
Runner = Callable[..., tuple[torch.Tensor, ...]]


def emulated(inputs: tuple[torch.Tensor, ...], *, deterministic: bool = False, shuffle_seed: int = 0,
             max_blocks: int | None = None, wide_keys: bool = False, wide_index: bool = False,
             narrow_vectors: bool = False) -> tuple[torch.Tensor, ...]:
    """(output, grad_value, grad_locations, grad_weights) of the emulated CUDA kernels; also checks
    that every launch ran every (block, thread) of the configuration the driver computed."""
    value, shapes, starts, locations, weights, grad_output = inputs
    out = emulation.emulated_forward(value, shapes, starts, locations, weights, shuffle_seed=shuffle_seed,
                                     max_blocks=max_blocks, wide_index=wide_index, narrow_vectors=narrow_vectors)
    _check_launches(["forward"] if out.numel() else [], {"forward": out.numel()}, max_blocks)
    grads = emulation.emulated_backward(grad_output, value, shapes, starts, locations, weights,
                                        deterministic=deterministic, shuffle_seed=shuffle_seed,
                                        max_blocks=max_blocks, wide_keys=wide_keys)
    samples = weights.numel()
    if not deterministic:
        chunks = [samples] if samples else []
    else:  # one backward + gather pair per sort chunk
        per_chunk = emulation.sort_chunk_entries(wide_keys) // 4
        chunks = [min(per_chunk, samples - first) for first in range(0, samples, per_chunk)]
    _check_launches(["backward", "gather"] * len(chunks) if deterministic else ["backward"] * len(chunks),
                    {"backward": chunks}, max_blocks, channels=value.shape[-1])
    return (out, *grads)


def lanes_per_sample(channels: int) -> int:
    """Backward lanes per sample: D rounded up to a power of two, at most 32 (cuda_kernels.h)."""
    return min(32, 1 << max(0, channels - 1).bit_length())


def _check_launches(expected: list[str], work: dict[str, int], max_blocks: int | None, channels: int = 1) -> None:
    """Every launch ran all its threads, with the configuration launch_config gives for its work: the
    forward one thread per V channels (V from the launch's variant), the backward whole warps of
    32 / G samples each."""
    launches = emulation.last_launches()
    require([launch.kernel for launch in launches] == expected, f"launched {launches}, expected {expected}")
    chunks = iter(work.get("backward", []))
    samples = 0
    for launch in launches:
        require(launch.bodies == launch.blocks * launch.threads, f"not every thread ran: {launch}")
        if launch.kernel == "forward":
            vector = int(launch.variant.split("v")[1])
            threads = work["forward"] // vector
        elif launch.kernel == "backward":
            samples = next(chunks)
            group = lanes_per_sample(channels)
            require(launch.variant == f"g{group}", f"{launch}: expected {group} lanes per sample")
            threads = 32 * -(-samples // (32 // group))
            require(threads == emulation.backward_threads(samples, channels),
                    f"backward_threads disagrees: {threads}")
        else:  # gather: one thread per (entry of the chunk, channel)
            threads = 4 * samples * channels
        blocks, per_block = emulation.launch_config(threads, max_blocks)
        require((launch.blocks, launch.threads) == (blocks, per_block),
                f"{launch} != launch_config({threads}) = {blocks, per_block}")


def assert_close(ours: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...], dtype: torch.dtype,
                 what: str) -> float:
    """Compares each of the four results at the tolerance of ``dtype`` (module docstring); returns the
    largest error relative to the reference's largest magnitude."""
    worst = 0.0
    for name, a, b in zip(GRAD_NAMES, ours, ref):
        a, b = a.detach().cpu(), b.detach().cpu()  # either side may come from a GPU
        require(a.dtype == dtype and a.shape == b.shape, f"{what}: {name} is {a.dtype} {tuple(a.shape)}")
        scale = max(float(b.abs().max()), 1e-30) if b.numel() else 1.0
        rtol, atol = (1e-10, 1e-10) if dtype == torch.float64 else (1e-5, 1e-5 * scale)
        if dtype in HALF_TOLERANCE:
            rtol, atol = HALF_TOLERANCE[dtype], HALF_TOLERANCE[dtype] * scale
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"{what}: {name}: {m}")
        if b.numel():
            worst = max(worst, float((a.double() - b.double()).abs().max()) / scale)
    return worst


def check_against_reference(case_name: str, dtype: torch.dtype, run: Runner = emulated) -> str:
    """Forward and the three gradients of the atomic and the deterministic backward vs the reference."""
    inputs = make_inputs(CASES[case_name], dtype)
    ref = reference(inputs)
    worst = 0.0
    for deterministic in (False, True):
        ours = run(inputs, deterministic=deterministic)
        worst = max(worst, assert_close(ours, ref, dtype, f"{case_name} deterministic={deterministic}"))
    return f"max error {worst:.1e} of the largest magnitude"


def check_forward_variants() -> str:
    """The forward's four variants (32/64-bit indices x one channel / 16 bytes per thread) each match
    the reference on every case, and the driver picks 32-bit with vectors when D allows (else 1)."""
    picked = []
    for case_name, case in CASES.items():
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            inputs = make_inputs(case, dtype)
            ref = reference(inputs)[0]
            for wide_index in (False, True):
                for narrow in (False, True):
                    out = emulation.emulated_forward(*inputs[:5], wide_index=wide_index, narrow_vectors=narrow,
                                                     shuffle_seed=5)
                    variant = emulation.last_launches()[0].variant
                    vector = 16 // torch.empty((), dtype=dtype).element_size()
                    expected = ("i64" if wide_index else "i32") + (
                        "v1" if narrow or case.channels % vector else f"v{vector}")
                    require(variant == expected, f"{case_name} {dtype}: launched {variant}, expected {expected}")
                    assert_close((out,), (ref,), dtype, f"{case_name} {variant}")
            picked.append(f"{case_name}/{str(dtype)[6:]}: {expected.replace('i64', 'i32')}")
    return f"all four variants match the reference; {len(picked)} case/dtype pairs"


def check_channel_counts() -> str:
    """Backward lanes per sample follow D (8, 16, 32 lanes; 64 channels: 32 lanes, 2 channels each),
    against the reference with shuffled warp and lane orders, points outside the map included."""
    notes = []
    for channels in (8, 16, 32, 64):
        case = replace(CASES["odd_multi_level"], channels=channels, heads=2, queries=23)
        inputs = make_inputs(case, torch.float32)
        ref = reference(inputs)
        for deterministic in (False, True):
            ours = emulated(inputs, deterministic=deterministic, shuffle_seed=7)
            assert_close(ours, ref, torch.float32, f"D={channels} deterministic={deterministic}")
        notes.append(f"D={channels}: {lanes_per_sample(channels)} lanes")
    return "; ".join(notes)


def check_grid_stride() -> str:
    """With the block cap lowered to 3 blocks every kernel's grid-stride loop iterates: same results."""
    inputs = make_inputs(CASES["odd_multi_level"], torch.float32)
    ref = reference(inputs)
    for deterministic in (False, True):
        full = emulated(inputs, deterministic=deterministic)
        capped = emulated(inputs, deterministic=deterministic, max_blocks=3)
        assert_close(capped, ref, torch.float32, f"3 blocks, deterministic={deterministic}")
        # Each element is computed by the same arithmetic whichever thread runs it; only the
        # order of atomic adds may differ.
        same = GRAD_NAMES if deterministic else ("output", "grad_locations", "grad_weights")
        for name, a, b in zip(GRAD_NAMES, full, capped):
            require(
                name not in same or torch.equal(a, b),
                f"deterministic={deterministic}: {name} changed with 3 blocks")
    iterations = -(-inputs[4].numel() // (3 * 256))
    return f"backward threads ran {iterations} grid-stride iterations; results unchanged"


def check_shuffled_thread_order() -> str:
    """Seeded random thread orders change the atomic path's float32 value gradient in the last bits
    (but not beyond fp32 rounding); every other result, and all of the deterministic path's, are
    bitwise identical whatever the order."""
    inputs = make_inputs(CROWDED, torch.float32)
    ref = reference(inputs)
    runs = {(det, seed): emulated(inputs, deterministic=det, shuffle_seed=seed)
            for det in (False, True) for seed in (0, 1, 2)}
    for (det, seed), ours in runs.items():
        assert_close(ours, ref, torch.float32, f"deterministic={det} seed={seed}")
        for name, a, b in zip(GRAD_NAMES, ours, runs[(det, 0)]):
            if det or name != "grad_value":
                require(torch.equal(a, b), f"deterministic={det} seed={seed}: {name} not bitwise equal to seed 0")
    # The two backward paths directly: equal to fp32 rounding (not only each to the float64 reference).
    assert_close(runs[(True, 0)], tuple(t.double() for t in runs[(False, 0)]), torch.float32,
                 "deterministic vs atomic")
    atomic = [runs[(False, seed)][1] for seed in (0, 1, 2)]
    require(
        not torch.equal(atomic[1], atomic[2]),
        "the atomic value gradient is bitwise equal for seeds 1 and 2: the shuffle had no effect")
    changed = int((atomic[1] != atomic[2]).sum())
    return (f"atomic grad_value: {changed} of {atomic[1].numel()} elements differ between seeds 1 and 2; "
            "deterministic: bitwise equal for seeds 0, 1, 2 and equal to the atomic path to fp32 rounding")


def check_global_deterministic_flag() -> str:
    """torch.use_deterministic_algorithms(True) selects the deterministic backward without the flag."""
    inputs = make_inputs(CROWDED, torch.float32)
    explicit = emulated(inputs, deterministic=True)
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        for seed in (1, 2):
            value, shapes, starts, locations, weights, grad_output = inputs
            grads = emulation.emulated_backward(grad_output, value, shapes, starts, locations, weights,
                                                deterministic=False, shuffle_seed=seed)
            kernels = [launch.kernel for launch in emulation.last_launches()]
            require(kernels == ["backward", "gather"], f"global deterministic mode launched {kernels}")
            for name, a, b in zip(GRAD_NAMES[1:], grads, explicit[1:]):
                require(torch.equal(a, b), f"global deterministic mode, seed {seed}: {name} differs")
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    return "deterministic=False under the global mode ran the keyed + gather kernels, bitwise as deterministic=True"


def check_wide_keys() -> str:
    """More entries than one sort takes (2^22 on the GPU; simulated by the wide-key switch, which makes
    the emulation sort chunks of 62 entries: ~50 chunks here): the location and weight gradients are
    bitwise those of one chunk, grad_value (summed chunk by chunk) equal to fp32 rounding and bitwise
    equal between thread orders. The device op cannot be forced into small chunks, so the GPU meets
    several chunks only at real scale (> 2^20 samples, e.g. the encoder at batch 1): emulation-only."""
    inputs = make_inputs(CASES["encoder_like"], torch.float32)
    one = emulated(inputs, deterministic=True)
    chunked = [emulated(inputs, deterministic=True, wide_keys=True, shuffle_seed=seed) for seed in (3, 4)]
    for name, a, b, c in zip(GRAD_NAMES, one, *chunked):
        require(torch.equal(b, c), f"chunked: {name} differs between thread orders")
        if name != "grad_value":
            require(torch.equal(a, b), f"chunked: {name} differs from one chunk")
    assert_close(chunked[0], tuple(t.double() for t in one), torch.float32, "chunked vs one chunk")
    assert_close(chunked[0], reference(inputs), torch.float32, "chunked vs reference")
    chunks = -(-inputs[4].numel() // (emulation.sort_chunk_entries(True) // 4))
    return f"{chunks} sort chunks: bitwise run to run, equal to one chunk and to the reference"


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at |x| (x in float64)."""
    info = torch.finfo(dtype)
    mantissa_bits = {torch.float16: 10, torch.bfloat16: 7}[dtype]
    _, exponent = torch.frexp(x.abs().clamp_min(info.tiny))
    return torch.ldexp(torch.ones_like(x), (exponent - 1 - mantissa_bits).clamp_min(
        int(torch.tensor(info.tiny, dtype=torch.float64).log2()) - mantissa_bits))


def check_half_accumulation(dtype: torch.dtype, run: Runner = emulated) -> str:
    """fp16 / bf16 accumulate in fp32 and round once: with positive inputs the forward and the value
    and weight gradients are within 1 ulp of the exact result (long sums of ~256 terms); the
    location gradient (which cancels) within HALF_TOLERANCE of the float32 kernels."""
    inputs = make_inputs(LONG_SUMS, dtype)
    exact = reference(inputs)
    for deterministic in (False, True):
        ours = tuple(t.cpu() for t in run(inputs, deterministic=deterministic))
        for name, a, b in zip(GRAD_NAMES, ours, exact):
            require(a.dtype == dtype, f"{name} is {a.dtype}")
            if name == "grad_locations":
                continue
            excess = ((a.double() - b).abs() / _ulp(b, dtype)).max()
            require(excess <= 1.0, f"deterministic={deterministic}: {name} is {float(excess):.1f} ulp from exact")
        single = run(tuple(t.float() if t.is_floating_point() else t for t in inputs), deterministic=deterministic)
        tol = HALF_TOLERANCE[dtype]
        scale = float(single[2].abs().max())
        torch.testing.assert_close(ours[2].float(), single[2].cpu(), rtol=tol, atol=tol * scale)
    mixed = make_inputs(replace(CASES["encoder_like"], queries=20), dtype)
    single = run(tuple(t.float() if t.is_floating_point() else t for t in mixed))
    for deterministic in (False, True):
        ours = run(mixed, deterministic=deterministic)
        assert_close(ours, tuple(t.cpu().to(dtype).double() for t in single), dtype, f"{dtype} vs float32")
    return "output, grad_value, grad_weights within 1 ulp of exact; all four within tolerance of float32"


def check_mixed_precision(dtype: torch.dtype, run: Runner = emulated) -> str:
    """A float16 / bfloat16 value with float32 locations and weights (what autocast gives the layer):
    output and grad_value in value's dtype, grad_locations and grad_weights in float32; all four equal
    to the float32 kernels run on the same (already rounded) value and grad_output, to the half type's
    rounding for the first two (HALF_TOLERANCE) and to float32 rounding for the location and weight
    gradients (their only half-precision inputs, value and grad_output, are exact in float32)."""
    base = make_inputs(CASES["encoder_like"], torch.float32)
    value, grad_output = base[0].to(dtype), base[5].to(dtype)
    mixed = (value, *base[1:5], grad_output)
    as_float = (value.float(), *base[1:5], grad_output.float())
    for deterministic in (False, True):
        ours = tuple(t.cpu() for t in run(mixed, deterministic=deterministic))
        single = tuple(t.cpu() for t in run(as_float, deterministic=deterministic))
        for name, a, want in zip(GRAD_NAMES, ours, (dtype, dtype, torch.float32, torch.float32)):
            require(a.dtype == want, f"deterministic={deterministic}: {name} is {a.dtype}, expected {want}")
        assert_close(ours[:2], tuple(t.to(dtype).double() for t in single[:2]), dtype,
                     f"mixed {dtype} deterministic={deterministic}")
        for name, a, b in zip(GRAD_NAMES[2:], ours[2:], single[2:]):
            scale = max(float(b.abs().max()), 1e-30)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale, msg=lambda m, n=name: f"{n}: {m}")
    return f"{str(dtype)[6:]} value + float32 locations: dtypes as specified, equal to the float32 kernels"


def check_empty_inputs(run: Runner = emulated) -> str:
    """No queries, or batch 0: correctly shaped (zero) results (and, emulated, no kernel launch)."""
    for case in (replace(CASES["odd_multi_level"], queries=0), replace(CASES["odd_multi_level"], batch=0)):
        inputs = make_inputs(case, torch.float32)
        for deterministic in (False, True):
            out, grad_value, grad_locations, grad_weights = run(inputs, deterministic=deterministic)
            require(out.shape == (case.batch, case.queries, case.heads * case.channels), out.shape)
            require(
                grad_value.shape == inputs[0].shape and torch.count_nonzero(grad_value) == 0,
                'check failed: grad_value.shape == inputs[0].shape and torch.count_nonzero(grad_value) == 0')
            require(
                grad_locations.shape == inputs[3].shape and grad_weights.shape == inputs[4].shape,
                'check failed: grad_locations.shape == inputs[3].shape and grad_weights.shape == inputs[4].shape')
    return "Lq = 0 and N = 0 work"


def check_launch_config() -> str:
    """256 threads per block, enough blocks for one thread per item, capped at 65535 * 8 blocks."""
    cap = 65535 * 8
    for work, blocks in ((0, 1), (1, 1), (256, 1), (257, 2), (1110, 5), (cap * 256, cap), (cap * 256 + 1, cap),
                         (2**40, cap)):
        require(emulation.launch_config(work) == (blocks, 256), (work, emulation.launch_config(work)))
    require(
        emulation.launch_config(10_000, max_blocks=3) == (3, 256),
        'check failed: emulation.launch_config(10_000, max_blocks=3) == (3, 256)')
    return "as ms_deform_attn_cuda.cu launches"


def check_large_offsets(run: Runner = emulated, zeros: Callable[..., torch.Tensor] | None = None,
                        wide_keys: bool = True) -> str:
    """Flat offsets beyond 2^31 elements: value (2, S, 2, 2) with a 16500 x 16500 first level, so that
    batch 1's other levels start past element 2^31. The big tensors are mmap(MAP_NORESERVE) zeros:
    only the small levels hold data and are sampled (level 0's samples lie outside the map); the
    results must equal the reference on the cropped problem (those small levels alone)."""
    heads, channels, queries, points = 2, 2, 6, 3
    small = ((5, 7), (3, 4), (1, 1))
    big = 16500 * 16500
    num_value = big + sum(h * w for h, w in small)
    require((num_value + big) * heads * channels > 2**31, "the case no longer needs 64-bit offsets")
    g = torch.Generator().manual_seed(0)
    cropped = make_inputs(Case(small, heads=heads, channels=channels, queries=queries, points=points), torch.float32)
    value = (zeros or emulation.huge_zeros)((2, num_value, heads, channels), torch.float32)
    value[:, big:] = cropped[0].to(value.device)  # touches only the small levels' pages
    shapes = torch.tensor(((16500, 16500),) + small)
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    outside = torch.full((2, queries, heads, 1, points, 2), -2.0)
    locations = torch.cat([outside, cropped[3]], 3)
    weights = torch.cat([torch.rand(2, queries, heads, 1, points, generator=g), cropped[4]], 3)
    ref = reference(cropped)
    if run is emulated:  # the forward must have fallen back to 64-bit indices
        emulation.emulated_forward(value, shapes, starts, locations, weights)
        variant = emulation.last_launches()[0].variant
        require(variant.startswith("i64"), f"value of {value.numel()} elements ran the {variant} forward")
    # wide_keys=False: the device op, which cannot be forced to 64-bit keys (emulation-only case).
    variants = ((False, False), (True, False)) + (((True, True),) if wide_keys else ())
    for deterministic, wide in variants:
        out, grad_value, grad_locations, grad_weights = run(
            (value, shapes, starts, locations, weights, cropped[5]), deterministic=deterministic, wide_keys=wide)
        what = f"deterministic={deterministic} wide_keys={wide}"
        assert_close((out, grad_value[:, big:], grad_locations[:, :, :, 1:], grad_weights[:, :, :, 1:]), ref,
                     torch.float32, what)
        require(torch.count_nonzero(grad_locations[:, :, :, 0]) == 0, f"{what}: level 0 location gradients")
        require(torch.count_nonzero(grad_weights[:, :, :, 0]) == 0, f"{what}: level 0 weight gradients")
        require(torch.count_nonzero(grad_value[:, big - 4096:big]) == 0, f"{what}: gradient before the small levels")
        del grad_value
    keys = "" if wide_keys else " (64-bit sort keys: emulation only)"
    return (f"value has {2 * num_value * heads * channels / 2**31:.2f} x 2^31 elements; matches the cropped "
            f"reference{keys}")


def check_layout_memory(forward: Callable[..., torch.Tensor] | None = None,
                        device: torch.device | str = "cpu") -> str:
    """A bad level layout raises even right after a good call with the same sizes.

    The CUDA path's checks remember the last layout that passed (one device-to-host copy per
    forward, not per attention layer; the emulation does the same on the CPU). The memory must
    never be fooled: an in-place write to a tensor that passed, a clone, and a fresh tensor
    (possibly at a freed address) are all checked again. ``forward(value, shapes, starts,
    locations, weights)``: default the emulated CUDA forward; the GPU check passes the real op."""
    if forward is None:
        forward = emulation.emulated_forward
    value, shapes, starts, locations, weights, _ = (t.to(device) for t in make_inputs(CASES["odd_multi_level"]))

    def must_raise(s: torch.Tensor, t: torch.Tensor, what: str) -> None:
        try:
            forward(value, s, t, locations, weights)
        except RuntimeError as error:
            require("ms_deform_attn" in str(error), f"{what}: unexpected error {error}")
            return
        raise AssertionError(f"{what}: a wrong level layout was accepted")

    forward(value, shapes, starts, locations, weights)
    forward(value, shapes, starts, locations, weights)  # the remembered layout
    bad = starts.clone()
    bad[-1] += 1
    must_raise(shapes, bad, "a clone with a wrong start")
    kept = starts.clone()
    forward(value, shapes, kept, locations, weights)
    kept[-1] += 1  # in place: same storage and address, a new version
    must_raise(shapes, kept, "an in-place write to a layout that had passed")
    del kept, bad
    for _ in range(3):  # fresh allocations land at freed addresses (caching allocators, malloc)
        fresh = starts.clone()
        forward(value, shapes, fresh, locations, weights)
        del fresh
        wrong = starts.clone()
        wrong[-1] += 1
        must_raise(shapes, wrong, "a fresh tensor at a freed address")
        del wrong
    forward(value, shapes, starts, locations, weights)
    # A view of other strides on the same memory (same pointer, version and size) reads other values.
    buffer = torch.stack([starts, torch.full_like(starts, 10**6)], 1).reshape(-1)
    forward(value, shapes, buffer[0::2], locations, weights)
    must_raise(shapes, buffer[:len(starts)], "a view of other strides on a layout that had passed")
    with torch.inference_mode():  # inference tensors have no version counter: checked every time
        inference_shapes, inference_starts = shapes.clone(), starts.clone()
        forward(value, inference_shapes, inference_starts, locations, weights)
        inference_starts[-1] += 1
        must_raise(inference_shapes, inference_starts, "an in-place write to an inference tensor")
    return ("wrong layouts raise after good calls (in-place write, clone, re-allocated address, other strides, "
            "inference mode)")


def _checks() -> dict[str, Callable[[], str]]:
    checks: dict[str, Callable[[], str]] = {"launch_config": check_launch_config}
    for case in CASES:
        for dtype in (torch.float64, torch.float32):
            checks[f"reference/{case}/{str(dtype)[6:]}"] = (lambda c=case, d=dtype: check_against_reference(c, d))
    checks.update({
        "forward_variants": check_forward_variants,
        "channel_counts": check_channel_counts,
        "grid_stride": check_grid_stride,
        "shuffled_thread_order": check_shuffled_thread_order,
        "global_deterministic_flag": check_global_deterministic_flag,
        "wide_keys": check_wide_keys,
        "half_accumulation/float16": lambda: check_half_accumulation(torch.float16),
        "half_accumulation/bfloat16": lambda: check_half_accumulation(torch.bfloat16),
        "mixed_precision/float16": lambda: check_mixed_precision(torch.float16),
        "mixed_precision/bfloat16": lambda: check_mixed_precision(torch.bfloat16),
        "empty_inputs": check_empty_inputs,
        "layout_memory": check_layout_memory,
        "large_offsets": check_large_offsets,
    })
    return checks


CHECKS = _checks()
