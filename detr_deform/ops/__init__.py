"""Multi-scale deformable attention operator.

``ms_deform_attn`` dispatches to the compiled C++/CUDA kernels
(``torch.ops.detr_deform.ms_deform_attn_forward``, registered with
``torch.library`` together with fake kernels and an autograd formula, so that
``torch.compile(fullgraph=True)`` traces through it) or to the pure-PyTorch
reference in :mod:`detr_deform.ops.reference`.
"""
from __future__ import annotations

import threading
import warnings
from typing import Literal

import torch

from detr_deform.ops._build import OpsBuildError, build_and_load
from detr_deform.ops.reference import ms_deform_attn_pytorch

__all__ = ["ms_deform_attn", "ms_deform_attn_pytorch", "compiled_op_available", "load_compiled_op", "OpsBuildError"]

Impl = Literal["auto", "cpp", "pytorch"]

_lock = threading.Lock()
_loaded = False
_load_error: OpsBuildError | None = None


def load_compiled_op() -> None:
    """Builds/loads the compiled operator once per process; raises OpsBuildError on failure."""
    global _loaded, _load_error
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        if _load_error is not None:
            raise _load_error
        try:
            build_and_load()
        except OpsBuildError as error:
            _load_error = error
            raise
        _register_python_parts()
        _loaded = True


def compiled_op_available() -> bool:
    """True when the compiled operator is (or can be) loaded; warns once otherwise."""
    try:
        load_compiled_op()
    except OpsBuildError as error:
        if not getattr(compiled_op_available, "_warned", False):
            compiled_op_available._warned = True  # type: ignore[attr-defined]
            warnings.warn(
                f"detr_deform: using the slow pure-PyTorch MSDeformAttn because the compiled operator is "
                f"unavailable: {error}",
                RuntimeWarning,
                stacklevel=3,
            )
        return False
    return True


def _register_python_parts() -> None:
    """Fake kernels (shape propagation for torch.compile / meta tensors) and autograd."""

    @torch.library.register_fake("detr_deform::ms_deform_attn_forward")
    def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        batch, _, heads, channels = value.shape
        return value.new_empty((batch, sampling_locations.shape[1], heads * channels))

    @torch.library.register_fake("detr_deform::ms_deform_attn_backward")
    def _backward_fake(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = torch.ops.detr_deform.ms_deform_attn_backward(
            grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
        return grad_value, None, None, grad_locations, grad_weights

    torch.library.register_autograd(
        "detr_deform::ms_deform_attn_forward", _backward, setup_context=_setup_context
    )


def _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> None:
    """Metadata-only checks (cheap, and traceable by torch.compile)."""
    tensors = {
        "value": value,
        "spatial_shapes": spatial_shapes,
        "level_start_index": level_start_index,
        "sampling_locations": sampling_locations,
        "attention_weights": attention_weights,
    }
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"ms_deform_attn: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be (N, S, M, D), got shape {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got shape "
            f"{tuple(sampling_locations.shape)}"
        )
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(
            f"ms_deform_attn: attention_weights shape {tuple(attention_weights.shape)} must equal "
            f"sampling_locations shape without the last axis, {tuple(sampling_locations.shape[:-1])}"
        )
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"ms_deform_attn: spatial_shapes must be (L, 2) as (H, W), got shape {tuple(spatial_shapes.shape)}")
    num_levels = spatial_shapes.shape[0]
    if level_start_index.shape != (num_levels,):
        raise ValueError(
            f"ms_deform_attn: level_start_index must be (L,) with L = {num_levels}, got shape "
            f"{tuple(level_start_index.shape)}"
        )
    n, _, m, _ = value.shape
    if sampling_locations.shape[0] != n or sampling_locations.shape[2] != m or sampling_locations.shape[3] != num_levels:
        raise ValueError(
            f"ms_deform_attn: sampling_locations {tuple(sampling_locations.shape)} does not match value "
            f"(N, S, M, D) = {tuple(value.shape)} and L = {num_levels} levels"
        )
    if not value.is_floating_point():
        raise TypeError(f"ms_deform_attn: value must be floating point, got {value.dtype}")
    if sampling_locations.dtype != value.dtype or attention_weights.dtype != value.dtype:
        raise TypeError(
            "ms_deform_attn: value, sampling_locations and attention_weights must share one dtype, got "
            f"{value.dtype}, {sampling_locations.dtype}, {attention_weights.dtype}"
        )
    if spatial_shapes.dtype != torch.int64 or level_start_index.dtype != torch.int64:
        raise TypeError(
            "ms_deform_attn: spatial_shapes and level_start_index must be int64, got "
            f"{spatial_shapes.dtype} and {level_start_index.dtype}"
        )
    devices = {name: tensor.device for name, tensor in tensors.items()}
    if len(set(devices.values())) != 1:
        listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"ms_deform_attn: all inputs must be on one device, got {listing}")


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Multi-scale deformable attention.

    Args:
        value: (N, S, M, D) per-head values of all levels, S = sum(H_l * W_l).
        spatial_shapes: (L, 2) int64, (H_l, W_l) per level.
        level_start_index: (L,) int64, offset of each level inside S.
        sampling_locations: (N, Lq, M, L, P, 2), normalised (x, y) in [0, 1]; pixel
            centres at (i + 0.5) / W (``align_corners=False``); zero outside.
        attention_weights: (N, Lq, M, L, P).
        impl: "cpp" (compiled kernels), "pytorch" (grid_sample reference) or
            "auto" (compiled when available, else the reference with a warning).

    Returns:
        (N, Lq, M * D)
    """
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if impl == "pytorch":
        _check_level_layout(value, spatial_shapes, level_start_index)
        return ms_deform_attn_pytorch(value, spatial_shapes, sampling_locations, attention_weights)
    if impl == "cpp":
        if not torch.compiler.is_compiling():
            load_compiled_op()
    elif impl == "auto":
        if not torch.compiler.is_compiling() and not compiled_op_available():
            _check_level_layout(value, spatial_shapes, level_start_index)
            return ms_deform_attn_pytorch(value, spatial_shapes, sampling_locations, attention_weights)
    else:
        raise ValueError(f"ms_deform_attn: impl must be 'auto', 'cpp' or 'pytorch', got {impl!r}")
    return torch.ops.detr_deform.ms_deform_attn_forward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


def _check_level_layout(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor) -> None:
    """Value-dependent checks for the reference path (the compiled op does them in C++)."""
    if torch.compiler.is_compiling():
        return
    shapes = spatial_shapes.tolist()
    starts = level_start_index.tolist()
    total = 0
    for level, ((height, width), start) in enumerate(zip(shapes, starts)):
        if height <= 0 or width <= 0:
            raise ValueError(f"ms_deform_attn: level {level} has non-positive spatial shape ({height}, {width})")
        if start != total:
            raise ValueError(
                f"ms_deform_attn: level_start_index[{level}] = {start} but the levels before it hold {total} positions"
            )
        total += height * width
    if total != value.shape[1]:
        raise ValueError(
            f"ms_deform_attn: spatial_shapes sum to {total} positions (sum of H*W) but value has S = {value.shape[1]}"
        )
