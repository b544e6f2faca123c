"""Input checks of the operator, in Python.

Each check runs once per call: the compiled path is checked in C++
(``ops/ms_deform_attn/ms_deform_attn_checks.cpp``, same texts); these Python
checks serve the pure-PyTorch reference path and the fake (meta) kernel that
``torch.compile`` traces. Only :func:`check_tensor_arguments` runs on every
path, because the C++ dispatcher cannot see what a non-tensor argument was.
"""
from __future__ import annotations

import torch

ARGUMENT_NAMES = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")


def check_tensor_arguments(*tensors: object) -> None:
    """TypeError naming the first argument that is not a tensor."""
    for name, tensor in zip(ARGUMENT_NAMES, tensors):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"ms_deform_attn: {name} must be a torch.Tensor, got {type(tensor).__name__}")


def check_metadata(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                   sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> None:
    """Ranks, sizes, dtypes and devices: metadata only (cheap, traceable by torch.compile)."""
    _check_ranks_and_sizes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    _check_dtypes_and_devices(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def _check_ranks_and_sizes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> None:
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be (N, S, M, D), got shape {tuple(value.shape)}")
    loc = tuple(sampling_locations.shape)
    if len(loc) != 6 or loc[-1] != 2:
        raise ValueError(f"ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got shape {loc}")
    if tuple(attention_weights.shape) != loc[:-1]:
        raise ValueError(
            f"ms_deform_attn: attention_weights shape {tuple(attention_weights.shape)} must equal "
            f"sampling_locations shape without the last axis, {loc[:-1]}"
        )
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(
            f"ms_deform_attn: spatial_shapes must be (L, 2) as (H, W), got shape {tuple(spatial_shapes.shape)}")
    num_levels = spatial_shapes.shape[0]
    if tuple(level_start_index.shape) != (num_levels,):
        raise ValueError(
            f"ms_deform_attn: level_start_index must be (L,) with L = {num_levels}, got shape "
            f"{tuple(level_start_index.shape)}"
        )
    if loc[0] != value.shape[0] or loc[2] != value.shape[2] or loc[3] != num_levels:
        raise ValueError(
            f"ms_deform_attn: sampling_locations {loc} does not match value "
            f"(N, S, M, D) = {tuple(value.shape)} and L = {num_levels} levels"
        )
    # Zero heads, channels, levels or points have no meaning; zero batch or zero queries are empty calls.
    if num_levels == 0:
        raise ValueError("ms_deform_attn: spatial_shapes has L = 0 levels; need at least one level")
    if loc[4] == 0:
        raise ValueError(f"ms_deform_attn: sampling_locations has P = 0 points per level (shape {loc}); "
                         "need at least one point")
    if value.shape[2] == 0:
        raise ValueError(f"ms_deform_attn: value has M = 0 heads (shape {tuple(value.shape)}); need at least one head")
    if value.shape[3] == 0:
        raise ValueError(f"ms_deform_attn: value has D = 0 channels per head (shape {tuple(value.shape)}); "
                         "need at least one channel")


def _check_dtypes_and_devices(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> None:
    if not value.is_floating_point():
        raise TypeError(f"ms_deform_attn: value must be floating point, got {value.dtype}")
    if not dtypes_supported(value.dtype, sampling_locations.dtype, attention_weights.dtype):
        raise TypeError(
            "ms_deform_attn: value, sampling_locations and attention_weights must share one dtype (or a float16 / "
            "bfloat16 value with float32 sampling_locations and attention_weights), got "
            f"{value.dtype}, {sampling_locations.dtype}, {attention_weights.dtype}"
        )
    if spatial_shapes.dtype != torch.int64 or level_start_index.dtype != torch.int64:
        raise TypeError(
            "ms_deform_attn: spatial_shapes and level_start_index must be int64, got "
            f"{spatial_shapes.dtype} and {level_start_index.dtype}"
        )
    tensors = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    devices = [tensor.device for tensor in tensors]
    if len(set(devices)) != 1:
        listing = ", ".join(f"{name} on {device}" for name, device in zip(ARGUMENT_NAMES, devices))
        raise ValueError(f"ms_deform_attn: all inputs must be on one device, got {listing}")


def dtypes_supported(value: torch.dtype, locations: torch.dtype, weights: torch.dtype) -> bool:
    """One dtype for all three, or mixed precision: a float16 / bfloat16 value with float32 locations and
    weights (what autocast produces; accumulation is in float32 either way)."""
    if weights != locations:
        return False
    return locations == value or (value in (torch.float16, torch.bfloat16) and locations == torch.float32)


def check_level_layout(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor) -> None:
    """Value-dependent checks (reads the tensors): positive level sizes, consistent starts, sum = S."""
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
