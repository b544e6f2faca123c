"""Deformable DETR: backbone + input projections + deformable transformer +
class/box heads, with the iterative box refinement and two-stage variants.

The module tree and parameter names are the official ones, so official
state dicts load with strict key matching.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from detr_deform.models.deformable_transformer import DeformableTransformer
from detr_deform.models.proposals import check_tokens
from detr_deform.utils.box_ops import inverse_sigmoid
from detr_deform.utils.nested_tensor import NestedTensor, mask_to_feature, nested_tensor_from_tensor_list


class MLP(nn.Module):
    """Linear layers with ReLU between them: (…, input_dim) -> (…, output_dim)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        self.num_layers = num_layers
        hidden = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + hidden, hidden + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x


def build_input_proj(backbone: nn.Module, hidden_dim: int, num_feature_levels: int) -> nn.ModuleList:
    """One 1x1 conv + GroupNorm(32) per backbone map, then 3x3 stride-2 conv + GroupNorm
    levels (from the last map) up to ``num_feature_levels`` (default inits; see
    ``init_input_proj``)."""
    num_backbone_outs = len(backbone.strides)
    if num_feature_levels < num_backbone_outs:
        raise ValueError(
            f"num_feature_levels={num_feature_levels} is fewer than the backbone's {num_backbone_outs} outputs"
        )
    input_proj = []
    in_channels = backbone.num_channels[-1]
    for level in range(num_backbone_outs):
        in_channels = backbone.num_channels[level]
        input_proj.append(nn.Sequential(nn.Conv2d(in_channels, hidden_dim, kernel_size=1),
                                        nn.GroupNorm(32, hidden_dim)))
    for _ in range(num_feature_levels - num_backbone_outs):
        input_proj.append(nn.Sequential(nn.Conv2d(in_channels, hidden_dim, kernel_size=3, stride=2, padding=1),
                                        nn.GroupNorm(32, hidden_dim)))
        in_channels = hidden_dim
    return nn.ModuleList(input_proj)


def init_input_proj(input_proj: nn.ModuleList) -> None:
    for proj in input_proj:
        nn.init.xavier_uniform_(proj[0].weight, gain=1)
        nn.init.constant_(proj[0].bias, 0)


def multi_level_features(backbone: nn.Module, input_proj: nn.ModuleList,
                         samples: NestedTensor | list[torch.Tensor] | torch.Tensor):
    """Images -> (the padded NestedTensor, srcs, masks, position embeddings), one per
    level: srcs (B, C, H_l, W_l), masks (B, H_l, W_l), pos (B, C, H_l, W_l)."""
    if isinstance(samples, (list, tuple)):
        samples = nested_tensor_from_tensor_list(list(samples))
    elif isinstance(samples, torch.Tensor):
        samples = nested_tensor_from_tensor_list(list(samples))
    features, pos = backbone(samples)
    srcs, masks = [], []
    for level, feature in enumerate(features):
        srcs.append(input_proj[level](feature.tensors))
        masks.append(feature.mask)
    for level in range(len(features), len(input_proj)):
        src = input_proj[level](features[-1].tensors if level == len(features) else srcs[-1])
        mask = mask_to_feature(samples.mask, src.shape[-2:])
        srcs.append(src)
        masks.append(mask)
        pos.append(backbone[1](NestedTensor(src, mask)).to(src.dtype))
    return samples, srcs, masks, pos


class DeformableDETR(nn.Module):
    """
    Args:
        backbone: a Joiner exposing ``strides`` and ``num_channels``.
        transformer: DeformableTransformer.
        num_classes: classification logits per query (COCO: 91 = max id + 1; no background logit).
        num_queries: object queries (= two-stage proposals).
        num_feature_levels: levels fed to the transformer; levels beyond the
            backbone's come from 3x3 stride-2 convs.
        aux_loss: also return the predictions of every earlier decoder layer.
        with_box_refine: per-layer heads and iterative reference refinement.
        two_stage: encoder proposals as decoder queries (requires with_box_refine).
    """

    def __init__(self, backbone: nn.Module, transformer: DeformableTransformer, num_classes: int, num_queries: int,
                 num_feature_levels: int, aux_loss: bool = True, with_box_refine: bool = False,
                 two_stage: bool = False) -> None:
        super().__init__()
        if two_stage and not with_box_refine:
            raise ValueError(
                "two_stage=True requires with_box_refine=True: the official implementation only supports the "
                "two-stage variant together with iterative box refinement"
            )
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.transformer = transformer
        hidden_dim = transformer.d_model
        self.num_feature_levels = num_feature_levels
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage

        class_embed = nn.Linear(hidden_dim, num_classes)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)
        self.input_proj = build_input_proj(backbone, hidden_dim, num_feature_levels)
        self.backbone = backbone

        prior_prob = 0.01
        class_embed.bias.data = torch.ones(num_classes) * -math.log((1 - prior_prob) / prior_prob)
        nn.init.constant_(bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0)
        init_input_proj(self.input_proj)

        num_pred = transformer.decoder.num_layers + (1 if two_stage else 0)
        if with_box_refine:
            self.class_embed = nn.ModuleList([copy.deepcopy(class_embed) for _ in range(num_pred)])
            self.bbox_embed = nn.ModuleList([copy.deepcopy(bbox_embed) for _ in range(num_pred)])
            # Official: only head 0 gets the -2 size bias (the others were cloned before it was set).
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias.data[2:], -2.0)
            self.transformer.decoder.bbox_embed = self.bbox_embed
        else:
            nn.init.constant_(bbox_embed.layers[-1].bias.data[2:], -2.0)
            # One shared head, listed once per decoder layer (so every index is in the state dict).
            self.class_embed = nn.ModuleList([class_embed for _ in range(num_pred)])
            self.bbox_embed = nn.ModuleList([bbox_embed for _ in range(num_pred)])
            self.transformer.decoder.bbox_embed = None
        if two_stage:
            self.transformer.decoder.class_embed = self.class_embed
            for box_embed in self.bbox_embed:
                nn.init.constant_(box_embed.layers[-1].bias.data[2:], 0.0)

    @property
    def selects_encoder_tokens(self) -> bool:
        """Whether the queries are the top num_queries encoder tokens (needs that many tokens)."""
        return self.two_stage

    def forward(self, samples: NestedTensor | list[torch.Tensor] | torch.Tensor) -> dict:
        """
        Args:
            samples: a list of normalised (3, H_i, W_i) images of any sizes, a
                (B, 3, H, W) tensor, or a NestedTensor (padded batch + mask).

        Returns a dict with ``pred_logits`` (B, Q, num_classes), ``pred_boxes``
        (B, Q, 4) normalised (cx, cy, w, h), ``aux_outputs`` (list of such dicts
        for decoder layers 0..D-2) and, for two-stage, ``enc_outputs``.
        """
        samples, srcs, masks, pos = multi_level_features(self.backbone, self.input_proj, samples)

        if self.two_stage and not torch.compiler.is_compiling() and not torch.jit.is_tracing():
            # The proposal top-k needs num_queries tokens: one line instead of topk's "k out of range".
            check_tokens(self.num_queries, sum(int(s.shape[-2]) * int(s.shape[-1]) for s in srcs),
                         tuple(int(v) for v in samples.tensors.shape[-2:]))
        query_embeds = None if self.two_stage else self.query_embed.weight
        hs, init_reference, inter_references, enc_outputs_class, enc_outputs_coord_unact = self.transformer(
            srcs, masks, pos, query_embeds
        )

        outputs_classes, outputs_coords = [], []
        for lvl in range(hs.shape[0]):
            reference = inverse_sigmoid(init_reference if lvl == 0 else inter_references[lvl - 1])
            outputs_class = self.class_embed[lvl](hs[lvl])
            delta = self.bbox_embed[lvl](hs[lvl])
            if reference.shape[-1] == 4:
                delta = delta + reference
            else:
                delta = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
            outputs_classes.append(outputs_class)
            outputs_coords.append(delta.sigmoid())
        outputs_class = torch.stack(outputs_classes)
        outputs_coord = torch.stack(outputs_coords)

        out = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                                  for a, b in zip(outputs_class[:-1], outputs_coord[:-1])]
        if self.two_stage:
            out["enc_outputs"] = {"pred_logits": enc_outputs_class, "pred_boxes": enc_outputs_coord_unact.sigmoid()}
        return out
