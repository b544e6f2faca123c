"""Multi-scale deformable attention module (Zhu et al., 2021), with the
official parameter names and initialisation so that official checkpoints load.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from detr_deform.ops import Impl, ms_deform_attn


class MSDeformAttn(nn.Module):
    """Each query, in each of ``n_heads`` heads, samples ``n_points`` points on
    each of ``n_levels`` feature levels around its reference point and sums
    them with softmax weights.

    Args:
        d_model: embedding width C.
        n_levels: number of feature levels L.
        n_heads: number of heads M; C must divide by M.
        n_points: sampling points P per head and level.
        impl: operator implementation, see :func:`detr_deform.ops.ms_deform_attn`.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 impl: Impl = "auto") -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.impl = impl
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        # Set by forward when ``keep_sampling`` is true (for visualisation).
        self.keep_sampling = False
        self.last_sampling_locations: torch.Tensor | None = None
        self.last_attention_weights: torch.Tensor | None = None
        self.last_reference_points: torch.Tensor | None = None
        self.last_spatial_shapes: torch.Tensor | None = None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        # Head m starts looking along direction 2*pi*m/M (scaled so the larger
        # of |cos|, |sin| is 1); point k sits k+1 pixels out, on every level.
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: torch.Tensor,
        input_level_start_index: torch.Tensor,
        input_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            query: (N, Lq, C).
            reference_points: (N, Lq, L, 2) normalised (x, y) points, or
                (N, Lq, L, 4) normalised (cx, cy, w, h) boxes.
            input_flatten: (N, S, C) features of all levels, flattened level by level.
            input_spatial_shapes: (L, 2) int64 (H, W) per level.
            input_level_start_index: (L,) int64.
            input_padding_mask: (N, S) bool, True at padding (those values are zeroed).

        Returns:
            (N, Lq, C)
        """
        batch, num_query, _ = query.shape
        _, num_value, _ = input_flatten.shape
        if input_spatial_shapes.shape[0] != self.n_levels:
            raise ValueError(
                f"MSDeformAttn was built for {self.n_levels} levels but got spatial_shapes for "
                f"{input_spatial_shapes.shape[0]}"
            )
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(batch, num_value, self.n_heads, self.d_model // self.n_heads)
        sampling_offsets = self.sampling_offsets(query).view(
            batch, num_query, self.n_heads, self.n_levels, self.n_points, 2
        )
        attention_weights = self.attention_weights(query).view(
            batch, num_query, self.n_heads, self.n_levels * self.n_points
        )
        attention_weights = F.softmax(attention_weights, -1).view(
            batch, num_query, self.n_heads, self.n_levels, self.n_points
        )
        sampling_locations = self._sampling_locations(reference_points, sampling_offsets, input_spatial_shapes)
        if self.keep_sampling:
            self.last_sampling_locations = sampling_locations.detach()
            self.last_attention_weights = attention_weights.detach()
            self.last_reference_points = reference_points.detach()
            self.last_spatial_shapes = input_spatial_shapes.detach()
        # Under autocast value is fp16/bf16 (from value_proj) and the locations float32: the op takes
        # that mix as it is (its half-precision kernels, float32 accumulation). Otherwise one dtype.
        mixed = value.dtype in (torch.float16, torch.bfloat16) and sampling_locations.dtype == torch.float32
        output = ms_deform_attn(
            value.to(sampling_locations.dtype) if value.dtype != sampling_locations.dtype and not mixed else value,
            input_spatial_shapes,
            input_level_start_index,
            sampling_locations,
            attention_weights.to(sampling_locations.dtype),
            impl=self.impl,
        )
        return self.output_proj(output)

    def _sampling_locations(self, reference_points: torch.Tensor, sampling_offsets: torch.Tensor,
                            input_spatial_shapes: torch.Tensor) -> torch.Tensor:
        """reference_points (N, Lq, L, 2 | 4), sampling_offsets (N, Lq, M, L, P, 2) in pixels of their
        level -> sampling locations (N, Lq, M, L, P, 2), normalised (x, y)."""
        # Sampling locations in the reference points' precision (float32 under autocast, where the
        # Linear gives bf16/fp16 offsets): a bf16 location is ~0.4 px off on a 100-px map. Without
        # autocast both are float32 already and nothing changes.
        sampling_offsets = sampling_offsets.to(reference_points.dtype)
        if reference_points.shape[-1] == 2:
            # Offsets are (x, y) in pixels of their level, hence the (W, H) normaliser.
            # Cast explicitly (same values): the ONNX exporter would otherwise promote to float64.
            offset_normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1).to(
                sampling_offsets.dtype)
            sampling_locations = (
                reference_points[:, :, None, :, None, :]
                + sampling_offsets / offset_normalizer[None, None, None, :, None, :]
            )
        elif reference_points.shape[-1] == 4:
            sampling_locations = (
                reference_points[:, :, None, :, None, :2]
                + sampling_offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                "MSDeformAttn: reference_points must end in 2 (points) or 4 (boxes), got shape "
                f"{tuple(reference_points.shape)}"
            )
        return sampling_locations
