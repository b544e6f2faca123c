"""Building blocks of DAT (Xia et al., CVPR 2022): window attention (L),
shifted-window attention (S), deformable attention (D), the MLP and the
channel LayerNorm. Module and parameter names follow the official code so that
its checkpoints load strictly; behaviour follows it exactly at the construction
size, and extends it to any input size (see docs/dat.md).

All blocks take and return (B, C, H, W) tensors.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class LayerNormProxy(nn.Module):
    """LayerNorm over the channels of an NCHW tensor (official name: child ``norm``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TransformerMLP(nn.Module):
    """Per-token Linear(C, 4C) -> GELU -> Dropout -> Linear(4C, C) -> Dropout."""

    def __init__(self, channels: int, expansion: int, drop: float) -> None:
        super().__init__()
        hidden = channels * expansion
        self.chunk = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(channels, hidden)), ("act", nn.GELU()), ("drop1", nn.Dropout(drop)),
            ("linear2", nn.Linear(hidden, channels)), ("drop2", nn.Dropout(drop)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = self.chunk(x.flatten(2).transpose(1, 2))
        return tokens.transpose(1, 2).reshape(batch, channels, height, width)


def relative_position_index(window: int) -> torch.Tensor:
    """(ws², ws²) row of the bias table for (query, key): (dy + ws - 1)(2ws - 1) + (dx + ws - 1)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return relative[..., 0] * (2 * window - 1) + relative[..., 1]


def shift_window_mask(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """(nW, ws², ws²) additive mask of shifted-window attention on an H x W map
    (multiples of ws): -100 between tokens of different regions, 0 otherwise."""
    labels = torch.zeros(height, width)
    bands_h = (slice(0, height - window), slice(height - window, height - shift), slice(height - shift, None))
    bands_w = (slice(0, width - window), slice(width - window, width - shift), slice(width - shift, None))
    for label, (rows, cols) in enumerate((r, c) for r in bands_h for c in bands_w):
        labels[rows, cols] = label
    windows = labels.view(height // window, window, width // window, window).permute(0, 2, 1, 3)
    windows = windows.reshape(-1, window * window)
    mask = windows[:, None, :] - windows[:, :, None]
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


class LocalAttention(nn.Module):
    """Window attention (L) or, with ``shifted``, shifted-window attention (S).

    Any H x W: the map is padded bottom/right with zeros to multiples of the
    window (padded tokens act as keys, as in Swin detection), the shift mask is
    computed for the padded size (the ``attn_mask`` buffer, kept for strict
    checkpoint loading, is that of the construction size), and the output is
    cropped back.
    """

    def __init__(self, dim: int, heads: int, window: int, attn_drop: float, proj_drop: float,
                 shifted: bool = False, fmap_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.window = window
        self.scale = (dim // heads) ** -0.5
        self.proj_qkv = nn.Linear(dim, 3 * dim)
        self.proj_out = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.01, a=-2.0, b=2.0)
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.shift = math.ceil(window / 2) if shifted else 0  # official: ceil, not Swin's floor
        self._masks: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        self.fmap_size = tuple(fmap_size) if fmap_size is not None else None
        if shifted:
            self.register_buffer("attn_mask", shift_window_mask(*fmap_size, window, self.shift))

    def _mask(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if (height, width) == self.fmap_size:
            return self.attn_mask.to(dtype)
        key = (height, width, device)
        if key not in self._masks:
            self._masks[key] = shift_window_mask(height, width, self.window, self.shift).to(device)
        return self._masks[key].to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        ws = self.window
        padded_h, padded_w = math.ceil(height / ws) * ws, math.ceil(width / ws) * ws
        if (padded_h, padded_w) != (height, width):
            x = F.pad(x, (0, padded_w - width, 0, padded_h - height))
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(2, 3))
        rows, cols = padded_h // ws, padded_w // ws
        windows = x.view(batch, channels, rows, ws, cols, ws).permute(0, 2, 4, 3, 5, 1).reshape(-1, ws * ws, channels)
        qkv = self.proj_qkv(windows).view(windows.shape[0], ws * ws, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(ws * ws, ws * ws, -1).permute(2, 0, 1)
        if self.shift:
            mask = self._mask(padded_h, padded_w, x.device, attn.dtype)
            attn = (attn.view(batch, rows * cols, self.heads, ws * ws, ws * ws) + mask[None, :, None])
            attn = attn.view(-1, self.heads, ws * ws, ws * ws)
        attn = self.attn_drop(attn.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(-1, ws * ws, channels)
        out = self.proj_drop(self.proj_out(out))
        out = out.view(batch, rows, cols, ws, ws, channels).permute(0, 5, 1, 3, 2, 4)
        out = out.reshape(batch, channels, padded_h, padded_w)
        if self.shift:
            out = torch.roll(out, shifts=(self.shift, self.shift), dims=(2, 3))
        return out[:, :, :height, :width]


def _reference_grid(height: int, width: int, count: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Pixel centres normalised to [-1, 1] as (count, H, W, 2) in (y, x) order."""
    ref_y, ref_x = torch.meshgrid(
        torch.linspace(0.5, height - 0.5, height, dtype=dtype, device=device),
        torch.linspace(0.5, width - 0.5, width, dtype=dtype, device=device),
        indexing="ij",
    )
    reference = torch.stack((ref_y, ref_x), -1)
    reference[..., 1].div_(width).mul_(2).sub_(1)
    reference[..., 0].div_(height).mul_(2).sub_(1)
    return reference[None].expand(count, -1, -1, -1)


class DeformableAttention2d(nn.Module):
    """DAT's deformable attention (D): a reference grid shifted by offsets that a
    small network predicts from the queries, keys/values sampled there
    (bilinear, align_corners=True), global attention of every query over the
    sampled keys with a relative position bias read from a continuous table.

    All groups are sampled in one batched grid_sample; no loops over heads or
    groups. The bias table is sampled at the normalised displacement directly,
    so it is independent of the run-time size (identical to the official code
    at the construction size).
    """

    def __init__(self, dim: int, heads: int, groups: int, attn_drop: float, proj_drop: float, stride: int,
                 offset_range_factor: float, use_pe: bool, stage_index: int, fmap_size: tuple[int, int]) -> None:
        super().__init__()
        if dim % groups or heads % groups:
            raise ValueError(f"DAT deformable attention: dim {dim} and heads {heads} must be divisible by "
                             f"groups {groups}")
        self.heads, self.groups = heads, groups
        self.head_channels = dim // heads
        self.group_channels = dim // groups
        self.group_heads = heads // groups
        self.scale = self.head_channels ** -0.5
        self.offset_range_factor = offset_range_factor
        self.use_pe = use_pe
        kernel = (9, 7, 5, 3)[stage_index]
        self.conv_offset = nn.Sequential(
            nn.Conv2d(self.group_channels, self.group_channels, kernel, stride, kernel // 2,
                      groups=self.group_channels),
            LayerNormProxy(self.group_channels),
            nn.GELU(),
            nn.Conv2d(self.group_channels, 2, 1, 1, 0, bias=False),
        )
        self.proj_q = nn.Conv2d(dim, dim, 1)
        self.proj_k = nn.Conv2d(dim, dim, 1)
        self.proj_v = nn.Conv2d(dim, dim, 1)
        self.proj_out = nn.Conv2d(dim, dim, 1)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        if use_pe:
            height, width = fmap_size
            self.rpe_table = nn.Parameter(torch.zeros(heads, 2 * height - 1, 2 * width - 1))
            nn.init.trunc_normal_(self.rpe_table, std=0.01, a=-2.0, b=2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        bg = batch * self.groups
        q = self.proj_q(x)
        offset = self.conv_offset(q.reshape(bg, self.group_channels, height, width))  # (B*G, 2, Hk, Wk) as (y, x)
        key_h, key_w = offset.shape[-2:]
        samples = key_h * key_w
        if self.offset_range_factor > 0:
            offset_range = torch.tensor([1.0 / key_h, 1.0 / key_w], device=x.device).reshape(1, 2, 1, 1)
            offset = offset.tanh().mul(offset_range).mul(self.offset_range_factor)
        offset = offset.permute(0, 2, 3, 1)
        reference = _reference_grid(key_h, key_w, bg, x.dtype, x.device)
        if self.offset_range_factor >= 0:
            position = offset + reference
        else:
            position = (offset + reference).tanh()
        sampled = F.grid_sample(x.reshape(bg, self.group_channels, height, width), grid=position[..., (1, 0)],
                                mode="bilinear", align_corners=True)
        sampled = sampled.reshape(batch, channels, 1, samples)
        q = q.reshape(batch * self.heads, self.head_channels, height * width)
        k = self.proj_k(sampled).reshape(batch * self.heads, self.head_channels, samples)
        v = self.proj_v(sampled).reshape(batch * self.heads, self.head_channels, samples)
        attn = torch.einsum("bcm,bcn->bmn", q, k).mul(self.scale)
        if self.use_pe:
            table = self.rpe_table[None].expand(batch, -1, -1, -1)
            table = table.reshape(bg, self.group_heads, *self.rpe_table.shape[-2:])
            query_grid = _reference_grid(height, width, bg, x.dtype, x.device).reshape(bg, height * width, 2)
            displacement = (query_grid[:, :, None] - position.reshape(bg, samples, 2)[:, None]).mul(0.5)
            bias = F.grid_sample(table, grid=displacement[..., (1, 0)], mode="bilinear", align_corners=True)
            attn = attn + bias.reshape(batch * self.heads, height * width, samples)
        attn = self.attn_drop(attn.softmax(dim=2))
        out = torch.einsum("bmn,bcn->bcm", attn, v).reshape(batch, channels, height, width)
        return self.proj_drop(self.proj_out(out))
