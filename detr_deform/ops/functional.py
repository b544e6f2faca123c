"""``ms_deform_attn``: the operator's Python entry point and its dispatch."""
from __future__ import annotations

import sys
import threading
from typing import Literal

import torch

from detr_deform.ops._build import OpsBuildError
from detr_deform.ops._checks import check_level_layout, check_metadata, check_tensor_arguments
from detr_deform.ops._library import (
    compiled_op_available,
    compiled_op_description,
    compiled_op_has_cuda,
    load_compiled_op,
)
from detr_deform.ops.reference import ms_deform_attn_pytorch

Impl = Literal["auto", "cpp", "pytorch"]
IMPLS = ("auto", "cpp", "pytorch")

_announced: set[tuple[str, str]] = set()
_announce_lock = threading.Lock()


def announce_implementation(path: str, device: torch.device) -> None:
    """One stderr line per process, implementation and device type, the first time it runs: which
    MSDeformAttn a run uses (the compiled kernels and what they were built for, or the grid_sample path)."""
    key = (path, device.type)
    if key in _announced:
        return
    with _announce_lock:
        if key in _announced:
            return
        _announced.add(key)
    what = compiled_op_description() if path == "cpp" else "the pure-PyTorch grid_sample path (slow)"
    print(f"detr_deform: MSDeformAttn on {device.type} uses {what}", file=sys.stderr, flush=True)


def _auto_on_cuda_error(error: OpsBuildError) -> OpsBuildError:
    return OpsBuildError(
        f"attn_impl='auto' on a CUDA device needs the compiled CUDA kernels, which failed to build or load: "
        f"{str(error).splitlines()[0]} -- fix the build, or choose the (much slower) grid_sample path explicitly "
        "with model.attn_impl=pytorch (impl='pytorch')")


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    impl: Impl = "auto",
    deterministic: bool | None = None,
) -> torch.Tensor:
    """Multi-scale deformable attention.

    Args:
        value: (N, S, M, D) per-head values of all levels, S = sum(H_l * W_l).
        spatial_shapes: (L, 2) int64, (H_l, W_l) per level.
        level_start_index: (L,) int64, offset of each level inside S.
        sampling_locations: (N, Lq, M, L, P, 2), normalised (x, y) in [0, 1]; pixel
            centres at (i + 0.5) / W (``align_corners=False``); zero outside.
        attention_weights: (N, Lq, M, L, P).
        value may be float16 / bfloat16 with sampling_locations and attention_weights in
        float32 (mixed precision, as under autocast): accumulation is in float32, the
        output is in value's dtype, and each gradient in its input's dtype.
        impl: "cpp" (compiled kernels), "pytorch" (grid_sample reference) or
            "auto" (compiled when available; else, on the CPU, the reference with a
            warning, and on a GPU an OpsBuildError: a silent 10x slowdown there would
            go unnoticed, so the reference must be chosen explicitly).
        deterministic: True selects the atomic-free, run-to-run deterministic
            value gradient of the CUDA backward. None or False follow
            ``torch.are_deterministic_algorithms_enabled()`` (read when the
            backward runs); False cannot switch it off while that global mode is on.
            The CPU kernels are always deterministic.

    Returns:
        (N, Lq, M * D)
    """
    check_tensor_arguments(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if impl not in IMPLS:
        raise ValueError(f"ms_deform_attn: impl must be 'auto', 'cpp' or 'pytorch', got {impl!r}")
    compiling = torch.compiler.is_compiling()
    if impl == "auto" and not compiling and value.is_cuda:
        try:
            load_compiled_op()
        except OpsBuildError as error:
            raise _auto_on_cuda_error(error) from error
    if impl != "pytorch" and not compiling and value.is_cuda:
        load_compiled_op()
        if not compiled_op_has_cuda():  # else a dispatcher error deep inside torch
            raise OpsBuildError(
                "ms_deform_attn: the compiled operator was built without CUDA kernels (DETR_DEFORM_WITH_CUDA=0, "
                "or no GPU visible when it was built) but the inputs are on a GPU: rebuild with "
                "`python -m detr_deform.ops build --cuda`, or choose the grid_sample path with "
                "model.attn_impl=pytorch (impl='pytorch')")
    if impl == "pytorch" or (impl == "auto" and not compiling and not compiled_op_available()):
        check_metadata(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        if not compiling:
            check_level_layout(value, spatial_shapes, level_start_index)
            announce_implementation("pytorch", value.device)
        if value.dtype != sampling_locations.dtype:  # mixed precision: grid_sample needs one dtype
            return ms_deform_attn_pytorch(value.to(sampling_locations.dtype), spatial_shapes, sampling_locations,
                                          attention_weights).to(value.dtype)
        return ms_deform_attn_pytorch(value, spatial_shapes, sampling_locations, attention_weights)
    if not compiling:
        load_compiled_op()
        announce_implementation("cpp", value.device)
    # The C++ entry points validate everything (once per call); under torch.compile the fake kernel does.
    return torch.ops.detr_deform.ms_deform_attn_forward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, bool(deterministic)
    )
