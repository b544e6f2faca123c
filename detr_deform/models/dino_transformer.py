"""DINO's transformer: the Deformable DETR encoder, mixed query selection, and a decoder
with look-forward-twice box refinement (official structure and parameter names).

Shapes: C = d_model, S = sum of H_l * W_l over levels, Q = num_queries matching queries,
P = denoising slots (training only), L = levels, D = decoder layers.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from detr_deform.models.deformable_detr import MLP
from detr_deform.models.deformable_transformer import (
    encoder_and_decoder_layer,
    encoder_output_proposals,
    flatten_levels,
    reset_transformer_parameters,
)
from detr_deform.models.denoising import DINO_EPS
from detr_deform.ops import Impl
from detr_deform.utils.box_ops import inverse_sigmoid


def box_sine_embedding(boxes: torch.Tensor, num_pos_feats: int = 128) -> torch.Tensor:
    """(N, Q, 4) normalised (cx, cy, w, h) -> (N, Q, 4 * num_pos_feats): sine/cosine
    features of each coordinate (temperature 10000, scale 2π), in the order y, x, w, h
    (the original's gen_sineembed_for_position; it fixes num_pos_feats at 128 = C / 2)."""
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=boxes.device)
    dim_t = 10000 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    features = []
    for coordinate in (1, 0, 2, 3):
        pos = boxes[:, :, coordinate, None] * (2 * math.pi) / dim_t
        features.append(torch.stack((pos[:, :, 0::2].sin(), pos[:, :, 1::2].cos()), dim=3).flatten(2))
    return torch.cat(features, dim=2)


class DINODecoder(nn.Module):
    """Deformable DETR decoder layers with, per layer: the positional query recomputed
    from the current reference box (``ref_point_head`` on its sine embedding), the box
    refinement of the shared head (assigned by DINO as ``bbox_embed``), and the final
    ``norm`` on every stored hidden state.

    Look forward twice: the refined box enters the next layer detached, but the
    undetached one is returned, so layer l's loss also trains layer l - 1 through
    its reference. ``look_forward_twice=False`` is the original's
    use_detached_boxes_dec_out=True."""

    def __init__(self, decoder_layer: nn.Module, num_layers: int, d_model: int,
                 look_forward_twice: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(decoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.look_forward_twice = look_forward_twice
        self.bbox_embed: nn.ModuleList | None = None   # assigned by DINO (shared heads)
        self.class_embed: nn.ModuleList | None = None

    def forward(self, tgt, reference_logits, memory, spatial_shapes, level_start_index, valid_ratios,
                memory_padding_mask=None, self_attn_mask=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """tgt (N, P+Q, C); reference_logits (N, P+Q, 4) -> normalised hidden states
        (D, N, P+Q, C) and D + 1 references (N, P+Q, 4): the start one, then each layer's."""
        reference = reference_logits.sigmoid()
        references, hidden = [reference], []
        output = tgt
        scale = torch.cat([valid_ratios, valid_ratios], -1)[:, None]
        for lid, layer in enumerate(self.layers):
            reference_input = reference[:, :, None] * scale
            query_pos = self.ref_point_head(box_sine_embedding(reference_input[:, :, 0], output.shape[-1] // 2))
            output = layer(output, query_pos, reference_input, memory, spatial_shapes, level_start_index,
                           memory_padding_mask, self_attn_mask=self_attn_mask)
            refined = (self.bbox_embed[lid](output) + inverse_sigmoid(reference, eps=DINO_EPS)).sigmoid()
            reference = refined.detach()
            references.append(refined if self.look_forward_twice else reference)
            hidden.append(self.norm(output))
        return torch.stack(hidden), references


class DINOTransformer(nn.Module):
    """Encoder + mixed query selection + DINODecoder. The encoder heads
    ``enc_out_class_embed`` / ``enc_out_bbox_embed`` are assigned by DINO (copies of
    its freshly initialised detection heads, not shared)."""

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.0, activation: str = "relu",
                 num_feature_levels: int = 4, dec_n_points: int = 4, enc_n_points: int = 4, num_queries: int = 900,
                 look_forward_twice: bool = True, attn_impl: Impl = "auto") -> None:
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        self.num_queries = num_queries
        self.num_feature_levels = num_feature_levels
        self.encoder, decoder_layer = encoder_and_decoder_layer(d_model, nhead, num_encoder_layers, dim_feedforward,
                                                                dropout, activation, num_feature_levels,
                                                                dec_n_points, enc_n_points, attn_impl)
        self.decoder = DINODecoder(decoder_layer, num_decoder_layers, d_model, look_forward_twice)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self.tgt_embed = nn.Embedding(num_queries, d_model)
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        self.enc_out_class_embed: nn.Module | None = None
        self.enc_out_bbox_embed: nn.Module | None = None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # The original's order: the xavier pass also overwrites tgt_embed's normal init.
        reset_transformer_parameters(self)
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: list[torch.Tensor], masks: list[torch.Tensor], pos_embeds: list[torch.Tensor],
                dn_labels: torch.Tensor | None = None, dn_boxes: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None):
        """srcs/pos_embeds per level (N, C, H_l, W_l); masks (N, H_l, W_l); the
        denoising part (training): dn_labels (N, P, C), dn_boxes (N, P, 4) logits,
        attn_mask (P+Q, P+Q).

        Returns hidden states (D, N, P+Q, C), D + 1 references (N, P+Q, 4), and the
        interm outputs of the Q selected tokens: class logits (N, Q, K) and boxes (N, Q, 4)."""
        src_flatten, mask_flatten, lvl_pos_embed_flatten, spatial_shapes, level_start_index, valid_ratios = \
            flatten_levels(srcs, masks, pos_embeds, self.level_embed)
        memory = self.encoder(src_flatten, spatial_shapes, level_start_index, valid_ratios, lvl_pos_embed_flatten,
                              mask_flatten)
        output_memory, output_proposals = encoder_output_proposals(memory, mask_flatten, spatial_shapes)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        enc_class = self.enc_out_class_embed(output_memory)
        enc_coord_unact = self.enc_out_bbox_embed(output_memory) + output_proposals
        # Mixed query selection: the score of a token is its best class logit.
        topk = torch.topk(enc_class.max(-1)[0], self.num_queries, dim=1)[1]
        selected_logits = torch.gather(enc_coord_unact, 1, topk.unsqueeze(-1).repeat(1, 1, 4))
        selected_memory = torch.gather(output_memory, 1, topk.unsqueeze(-1).repeat(1, 1, self.d_model))
        batch = memory.shape[0]
        tgt = self.tgt_embed.weight[:, None, :].repeat(1, batch, 1).transpose(0, 1)
        reference_logits = selected_logits.detach()
        if dn_labels is not None:
            tgt = torch.cat([dn_labels.to(tgt.dtype), tgt], dim=1)
            reference_logits = torch.cat([dn_boxes, reference_logits], dim=1)
        hs, references = self.decoder(tgt, reference_logits, memory, spatial_shapes, level_start_index, valid_ratios,
                                      mask_flatten, self_attn_mask=attn_mask)
        # The interm class logits are recomputed on the undetached selected memory (as the original).
        return hs, references, self.enc_out_class_embed(selected_memory), selected_logits.sigmoid()
