"""Position embeddings of feature maps (official Deformable DETR variants)."""
from __future__ import annotations

import math

import torch
from torch import nn

from detr_deform.utils.nested_tensor import NestedTensor


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine embedding of normalised (y, x) positions inside the valid
    (non-padded) region.

    Positions are the cumulative count of valid pixels minus ``offset`` (0.5: pixel
    centres), divided by the valid extent (+1e-6) and scaled by ``scale``. The official
    Deformable DETR code subtracts the 0.5; DETR's and DINO's do not (``offset=0``).
    ``temperature_w``: the x axis' temperature when it differs from the y axis'
    (DINO's pe_temperatureH / pe_temperatureW; both 20 there, 10000 in Deformable DETR).

    Output: (B, 2 * num_pos_feats, H, W) as [y features, x features].
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000, normalize: bool = True,
                 scale: float = 2 * math.pi, offset: float = 0.5, temperature_w: float | None = None) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.temperature_w = temperature if temperature_w is None else temperature_w
        self.normalize = normalize
        self.scale = scale
        self.offset = offset

    def forward(self, tensor_list: NestedTensor) -> torch.Tensor:
        not_mask = ~tensor_list.mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            # Divided by the valid extent (the last count), the offset taken off the numerator only.
            y_last, x_last = y_embed[:, -1:, :], x_embed[:, :, -1:]
            if self.offset:
                y_embed, x_embed = y_embed - self.offset, x_embed - self.offset
            y_embed = y_embed / (y_last + eps) * self.scale
            x_embed = x_embed / (x_last + eps) * self.scale
        exponent = 2 * torch.div(torch.arange(self.num_pos_feats, dtype=torch.float32, device=not_mask.device), 2,
                                 rounding_mode="floor") / self.num_pos_feats
        pos_x = x_embed[:, :, :, None] / self.temperature_w ** exponent
        pos_y = y_embed[:, :, :, None] / self.temperature ** exponent
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute embedding for maps up to 50x50 (official ``learned`` option).

    Output: (B, 2 * num_pos_feats, H, W) as [x features, y features].
    """

    def __init__(self, num_pos_feats: int = 128, max_size: int = 50) -> None:
        super().__init__()
        self.max_size = max_size
        self.row_embed = nn.Embedding(max_size, num_pos_feats)
        self.col_embed = nn.Embedding(max_size, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, tensor_list: NestedTensor) -> torch.Tensor:
        x = tensor_list.tensors
        h, w = x.shape[-2:]
        if h > self.max_size or w > self.max_size:
            raise ValueError(
                f"learned position embedding supports feature maps up to {self.max_size}x{self.max_size}, "
                f"got {h}x{w}; use position_embedding='sine' for large images"
            )
        x_emb = self.col_embed(torch.arange(w, device=x.device))
        y_emb = self.row_embed(torch.arange(h, device=x.device))
        pos = torch.cat([x_emb.unsqueeze(0).repeat(h, 1, 1), y_emb.unsqueeze(1).repeat(1, w, 1)], dim=-1)
        return pos.permute(2, 0, 1).unsqueeze(0).repeat(x.shape[0], 1, 1, 1)


def build_position_encoding(kind: str, hidden_dim: int, scale: float = 2 * math.pi,
                            temperature: tuple[float, float] = (10000, 10000), offset: float = 0.5) -> nn.Module:
    """``kind``: 'sine' (alias 'v2') or 'learned' (alias 'v3'), as in the official arguments.
    Sine only: ``temperature`` (y, x) and ``offset`` (Deformable DETR: 10000 and 0.5; DINO: 20 and 0)."""
    num_pos_feats = hidden_dim // 2
    if kind in ("sine", "v2"):
        return PositionEmbeddingSine(num_pos_feats, temperature[0], normalize=True, scale=scale, offset=offset,
                                     temperature_w=temperature[1])
    if kind in ("learned", "v3"):
        return PositionEmbeddingLearned(num_pos_feats)
    raise ValueError(f"position_embedding must be 'sine' or 'learned', got {kind!r}")
