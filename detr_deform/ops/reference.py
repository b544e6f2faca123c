"""Pure-PyTorch multi-scale deformable attention (``impl="pytorch"``).

This is the grid_sample formulation used by the official repository as its
test oracle. It is slow and memory hungry (it materialises one sampled tensor
per level of shape (N*M, D, Lq, P)) but needs no compiler, runs on any device
and exports to ONNX.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def ms_deform_attn_pytorch(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor | list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """value (N, S, M, D), sampling_locations (N, Lq, M, L, P, 2) as normalised
    (x, y), attention_weights (N, Lq, M, L, P) -> (N, Lq, M*D)."""
    batch, _, num_heads, channels = value.shape
    _, num_query, _, num_levels, num_points, _ = sampling_locations.shape
    shapes = spatial_shapes.tolist() if isinstance(spatial_shapes, torch.Tensor) else spatial_shapes
    value_per_level = value.split([int(h) * int(w) for h, w in shapes], dim=1)
    # grid_sample wants [-1, 1]; with align_corners=False this is the same
    # pixel-centre convention as the compiled kernel.
    sampling_grids = 2 * sampling_locations - 1
    sampled = []
    for level, (height, width) in enumerate(shapes):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        level_value = (
            value_per_level[level].flatten(2).transpose(1, 2)
            .reshape(batch * num_heads, channels, int(height), int(width))
        )
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        level_grid = sampling_grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(
            F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # (N, Lq, M, L, P) -> (N*M, 1, Lq, L*P)
    weights = attention_weights.transpose(1, 2).reshape(batch * num_heads, 1, num_query, num_levels * num_points)
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(batch, num_heads * channels, num_query)
    return output.transpose(1, 2).contiguous()
