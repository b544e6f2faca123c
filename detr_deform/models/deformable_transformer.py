"""Deformable transformer encoder-decoder (official structure and parameter names).

Shapes: C = d_model, S = sum of H_l * W_l over levels, Q = number of queries.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from detr_deform.layers import MSDeformAttn
from detr_deform.ops import Impl
from detr_deform.utils.box_ops import inverse_sigmoid


def _clones(module: nn.Module, count: int) -> nn.ModuleList:
    return nn.ModuleList([copy.deepcopy(module) for _ in range(count)])


def _activation(name: str):
    # The official code also lists GLU, which halves the FFN width and so cannot run there either.
    activations = {"relu": F.relu, "gelu": F.gelu}
    if name not in activations:
        raise ValueError(f"activation must be one of {sorted(activations)}, got {name!r}")
    return activations[name]


def _with_pos(tensor: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return tensor if pos is None else tensor + pos


class DeformableTransformerEncoderLayer(nn.Module):
    """Post-norm layer: deformable self-attention, then FFN."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, activation: str = "relu",
                 n_levels: int = 4, n_heads: int = 8, n_points: int = 4, attn_impl: Impl = "auto") -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, impl=attn_impl)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = _activation(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None):
        """src, pos (N, S, C); reference_points (N, S, L, 2) -> (N, S, C)."""
        src2 = self.self_attn(_with_pos(src, pos), reference_points, src, spatial_shapes, level_start_index,
                              padding_mask)
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))


class DeformableTransformerEncoder(nn.Module):
    def __init__(self, encoder_layer: nn.Module, num_layers: int) -> None:
        super().__init__()
        self.layers = _clones(encoder_layer, num_layers)
        self.num_layers = num_layers

    @staticmethod
    def get_reference_points(spatial_shapes: torch.Tensor, valid_ratios: torch.Tensor,
                             device: torch.device) -> torch.Tensor:
        """Pixel centres of every level, normalised by that image's valid extent on
        the level, then scaled by the valid ratios of every level: (N, S, L, 2)."""
        reference_points = []
        for level, (height, width) in enumerate(spatial_shapes.tolist()):
            # arange + 0.5 equals the official linspace(0.5, n - 0.5, n) exactly and exports to ONNX in float32.
            ref_y, ref_x = torch.meshgrid(
                torch.arange(height, dtype=torch.float32, device=device) + 0.5,
                torch.arange(width, dtype=torch.float32, device=device) + 0.5,
                indexing="ij",
            )
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * float(height))
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * float(width))
            reference_points.append(torch.stack((ref_x, ref_y), -1))
        reference_points = torch.cat(reference_points, 1)
        return reference_points[:, :, None] * valid_ratios[:, None]

    def forward(self, src, spatial_shapes, level_start_index, valid_ratios, pos=None, padding_mask=None):
        """src (N, S, C), valid_ratios (N, L, 2) -> memory (N, S, C)."""
        output = src
        reference_points = self.get_reference_points(spatial_shapes, valid_ratios, device=src.device)
        for layer in self.layers:
            output = layer(output, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return output


class DeformableTransformerDecoderLayer(nn.Module):
    """Post-norm layer: self-attention, deformable cross-attention, FFN."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, activation: str = "relu",
                 n_levels: int = 4, n_heads: int = 8, n_points: int = 4, attn_impl: Impl = "auto") -> None:
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, impl=attn_impl)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = _activation(activation)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, src, src_spatial_shapes, level_start_index,
                src_padding_mask=None, self_attn_mask=None):
        """tgt, query_pos (N, Q, C); reference_points (N, Q, L, 2 or 4); src (N, S, C);
        self_attn_mask (Q, Q) bool, True = may not attend (DINO's denoising groups)."""
        q = k = _with_pos(tgt, query_pos)
        tgt2 = self.self_attn(q.transpose(0, 1), k.transpose(0, 1), tgt.transpose(0, 1),
                              attn_mask=self_attn_mask)[0].transpose(0, 1)
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.cross_attn(_with_pos(tgt, query_pos), reference_points, src, src_spatial_shapes,
                               level_start_index, src_padding_mask)
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.linear2(self.dropout3(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(tgt2))


class DeformableTransformerDecoder(nn.Module):
    """With ``bbox_embed`` set (iterative box refinement) the reference points are
    refined after every layer in inverse-sigmoid space and detached."""

    def __init__(self, decoder_layer: nn.Module, num_layers: int, return_intermediate: bool = True) -> None:
        super().__init__()
        self.layers = _clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.return_intermediate = return_intermediate
        # Assigned by DeformableDETR (official layout: the same ModuleLists are
        # registered here too, so these keys exist in official state dicts).
        self.bbox_embed: nn.ModuleList | None = None
        self.class_embed: nn.ModuleList | None = None

    def forward(self, tgt, reference_points, src, src_spatial_shapes, src_level_start_index, src_valid_ratios,
                query_pos=None, src_padding_mask=None):
        """Returns hidden states (D, N, Q, C) and the reference points used after
        each layer (D, N, Q, 2 or 4); without intermediates, only the last."""
        output = tgt
        intermediate, intermediate_reference_points = [], []
        for lid, layer in enumerate(self.layers):
            if reference_points.shape[-1] == 4:
                reference_points_input = (
                    reference_points[:, :, None] * torch.cat([src_valid_ratios, src_valid_ratios], -1)[:, None]
                )
            else:
                reference_points_input = reference_points[:, :, None] * src_valid_ratios[:, None]
            output = layer(output, query_pos, reference_points_input, src, src_spatial_shapes,
                           src_level_start_index, src_padding_mask)
            if self.bbox_embed is not None:
                delta = self.bbox_embed[lid](output)
                if reference_points.shape[-1] == 4:
                    new_reference_points = (delta + inverse_sigmoid(reference_points)).sigmoid()
                else:
                    new_reference_points = torch.cat(
                        [delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]], -1
                    ).sigmoid()
                reference_points = new_reference_points.detach()
            if self.return_intermediate:
                intermediate.append(output)
                intermediate_reference_points.append(reference_points)
        if self.return_intermediate:
            return torch.stack(intermediate), torch.stack(intermediate_reference_points)
        return output[None], reference_points[None]


class DeformableTransformer(nn.Module):
    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 1024, dropout: float = 0.1, activation: str = "relu",
                 return_intermediate_dec: bool = True, num_feature_levels: int = 4, dec_n_points: int = 4,
                 enc_n_points: int = 4, two_stage: bool = False, two_stage_num_proposals: int = 300,
                 attn_impl: Impl = "auto") -> None:
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        self.encoder, decoder_layer = encoder_and_decoder_layer(d_model, nhead, num_encoder_layers, dim_feedforward,
                                                                dropout, activation, num_feature_levels,
                                                                dec_n_points, enc_n_points, attn_impl)
        self.decoder = DeformableTransformerDecoder(decoder_layer, num_decoder_layers, return_intermediate_dec)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        reset_transformer_parameters(self)
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    def get_proposal_pos_embed(self, proposals: torch.Tensor) -> torch.Tensor:
        """(N, Q, 4) unactivated boxes -> (N, Q, 2C) sine embedding of their sigmoid.

        The official code fixes 128 features per coordinate (C = 256); C/2 is the
        same there and keeps pos_trans (2C -> 2C) consistent for other widths."""
        num_pos_feats, temperature, scale = self.d_model // 2, 10000, 2 * math.pi
        dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
        dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
        proposals = proposals.sigmoid() * scale
        pos = proposals[:, :, :, None] / dim_t
        return torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(2)

    def gen_encoder_output_proposals(self, memory: torch.Tensor, memory_padding_mask: torch.Tensor,
                                     spatial_shapes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The projected memory (N, S, C) and one proposal per encoder pixel (N, S, 4),
        see ``encoder_output_proposals``."""
        output_memory, output_proposals = encoder_output_proposals(memory, memory_padding_mask, spatial_shapes)
        return self.enc_output_norm(self.enc_output(output_memory)), output_proposals

    def forward(self, srcs: list[torch.Tensor], masks: list[torch.Tensor], pos_embeds: list[torch.Tensor],
                query_embed: torch.Tensor | None = None):
        """srcs/pos_embeds: per level (N, C, H_l, W_l); masks (N, H_l, W_l);
        query_embed (Q, 2C) for the one-stage variants.

        Returns hs (D, N, Q, C), init_reference (N, Q, 2 or 4), inter_references
        (D, N, Q, 2 or 4), and for two-stage the encoder class logits (N, S, K)
        and unactivated boxes (N, S, 4) (else None, None)."""
        if not self.two_stage and query_embed is None:
            raise ValueError("DeformableTransformer: query_embed is required unless two_stage=True")
        src_flatten, mask_flatten, lvl_pos_embed_flatten, spatial_shapes, level_start_index, valid_ratios = \
            flatten_levels(srcs, masks, pos_embeds, self.level_embed)
        memory = self.encoder(src_flatten, spatial_shapes, level_start_index, valid_ratios, lvl_pos_embed_flatten,
                              mask_flatten)

        batch, _, channels = memory.shape
        enc_outputs_class = enc_outputs_coord_unact = None
        if self.two_stage:
            output_memory, output_proposals = self.gen_encoder_output_proposals(memory, mask_flatten, spatial_shapes)
            # The decoder holds the detection heads; index num_layers is the encoder's.
            enc_outputs_class = self.decoder.class_embed[self.decoder.num_layers](output_memory)
            enc_outputs_coord_unact = self.decoder.bbox_embed[self.decoder.num_layers](output_memory) + output_proposals
            # Channel 0 is the foreground score: encoder targets are all class 0.
            topk_proposals = torch.topk(enc_outputs_class[..., 0], self.two_stage_num_proposals, dim=1)[1]
            topk_coords_unact = torch.gather(enc_outputs_coord_unact, 1, topk_proposals.unsqueeze(-1).repeat(1, 1, 4))
            topk_coords_unact = topk_coords_unact.detach()
            reference_points = topk_coords_unact.sigmoid()
            init_reference_out = reference_points
            pos_trans_out = self.pos_trans_norm(self.pos_trans(self.get_proposal_pos_embed(topk_coords_unact)))
            query_pos, tgt = torch.split(pos_trans_out, channels, dim=2)
        else:
            query_pos, tgt = torch.split(query_embed, channels, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(batch, -1, -1)
            tgt = tgt.unsqueeze(0).expand(batch, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()
            init_reference_out = reference_points

        hs, inter_references = self.decoder(tgt, reference_points, memory, spatial_shapes, level_start_index,
                                            valid_ratios, query_pos, mask_flatten)
        return hs, init_reference_out, inter_references, enc_outputs_class, enc_outputs_coord_unact


def encoder_and_decoder_layer(d_model: int, nhead: int, num_encoder_layers: int, dim_feedforward: int,
                              dropout: float, activation: str, num_feature_levels: int, dec_n_points: int,
                              enc_n_points: int, attn_impl: Impl
                              ) -> tuple[DeformableTransformerEncoder, DeformableTransformerDecoderLayer]:
    """The encoder and one decoder layer (to be cloned by a decoder), built in the official order
    (encoder layer first: a given seed gives the same initial weights)."""
    encoder_layer = DeformableTransformerEncoderLayer(d_model, dim_feedforward, dropout, activation,
                                                      num_feature_levels, nhead, enc_n_points, attn_impl)
    encoder = DeformableTransformerEncoder(encoder_layer, num_encoder_layers)
    decoder_layer = DeformableTransformerDecoderLayer(d_model, dim_feedforward, dropout, activation,
                                                      num_feature_levels, nhead, dec_n_points, attn_impl)
    return encoder, decoder_layer


def reset_transformer_parameters(transformer: nn.Module) -> None:
    """The official initialisation pass: xavier-uniform on every matrix, then MSDeformAttn's own."""
    for p in transformer.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
    for m in transformer.modules():
        if isinstance(m, MSDeformAttn):
            m._reset_parameters()


def valid_ratio(mask: torch.Tensor) -> torch.Tensor:
    """(N, H, W) padding mask -> (N, 2) fraction of valid (w, h)."""
    _, height, width = mask.shape
    valid_h = torch.sum(~mask[:, :, 0], 1)
    valid_w = torch.sum(~mask[:, 0, :], 1)
    return torch.stack([valid_w.float() / width, valid_h.float() / height], -1)


def flatten_levels(srcs: list[torch.Tensor], masks: list[torch.Tensor], pos_embeds: list[torch.Tensor],
                   level_embed: torch.Tensor):
    """Per-level maps -> the encoder's token sequence: src (N, S, C), padding mask
    (N, S), position + level embedding (N, S, C), spatial shapes (L, 2) as (H, W),
    level start indices (L,), valid ratios (N, L, 2)."""
    src_flatten, mask_flatten, lvl_pos_embed_flatten, spatial_shapes = [], [], [], []
    for level, (src, mask, pos_embed) in enumerate(zip(srcs, masks, pos_embeds)):
        _, _, height, width = src.shape
        spatial_shapes.append((height, width))
        src_flatten.append(src.flatten(2).transpose(1, 2))
        mask_flatten.append(mask.flatten(1))
        lvl_pos_embed_flatten.append(pos_embed.flatten(2).transpose(1, 2) + level_embed[level].view(1, 1, -1))
    src_flatten = torch.cat(src_flatten, 1)
    mask_flatten = torch.cat(mask_flatten, 1)
    lvl_pos_embed_flatten = torch.cat(lvl_pos_embed_flatten, 1)
    spatial_shapes = torch.as_tensor(spatial_shapes, dtype=torch.long, device=src_flatten.device)
    level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
    valid_ratios = torch.stack([valid_ratio(m) for m in masks], 1)
    return src_flatten, mask_flatten, lvl_pos_embed_flatten, spatial_shapes, level_start_index, valid_ratios


def encoder_output_proposals(memory: torch.Tensor, memory_padding_mask: torch.Tensor,
                             spatial_shapes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One proposal per encoder pixel: centre at the pixel centre (normalised by the
    valid extent), size 0.05 * 2**level. Returns the memory zeroed where invalid
    (N, S, C) and the proposals in inverse-sigmoid space (N, S, 4), +inf where invalid
    (on padding or too close to the border). The same in Deformable DETR and DINO."""
    batch = memory.shape[0]
    proposals = []
    cursor = 0
    for level, (height, width) in enumerate(spatial_shapes.tolist()):
        mask = memory_padding_mask[:, cursor:cursor + height * width].view(batch, height, width, 1)
        valid_h = torch.sum(~mask[:, :, 0, 0], 1)
        valid_w = torch.sum(~mask[:, 0, :, 0], 1)
        grid_y, grid_x = torch.meshgrid(
            torch.linspace(0, height - 1, height, dtype=torch.float32, device=memory.device),
            torch.linspace(0, width - 1, width, dtype=torch.float32, device=memory.device),
            indexing="ij",
        )
        grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
        scale = torch.cat([valid_w.unsqueeze(-1), valid_h.unsqueeze(-1)], 1).view(batch, 1, 1, 2)
        grid = (grid.unsqueeze(0).expand(batch, -1, -1, -1) + 0.5) / scale
        wh = torch.ones_like(grid) * 0.05 * (2.0 ** level)
        proposals.append(torch.cat((grid, wh), -1).view(batch, -1, 4))
        cursor += height * width
    output_proposals = torch.cat(proposals, 1)
    valid = ((output_proposals > 0.01) & (output_proposals < 0.99)).all(-1, keepdim=True)
    output_proposals = torch.log(output_proposals / (1 - output_proposals))
    output_proposals = output_proposals.masked_fill(memory_padding_mask.unsqueeze(-1), float("inf"))
    output_proposals = output_proposals.masked_fill(~valid, float("inf"))
    output_memory = memory.masked_fill(memory_padding_mask.unsqueeze(-1), 0.0)
    output_memory = output_memory.masked_fill(~valid, 0.0)
    return output_memory, output_proposals
