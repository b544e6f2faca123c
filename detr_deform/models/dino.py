"""DINO (Zhang et al., ICLR 2023): Deformable DETR's backbone, projections and encoder
with contrastive denoising, mixed query selection and look-forward-twice refinement.

The module tree and parameter names are the original's (IDEA-Research/DINO, R50
4/5-scale), so its checkpoints load with strict key matching; the shared heads appear
once per decoder layer and again under transformer.decoder, as there.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from detr_deform.models.deformable_detr import MLP, build_input_proj, init_input_proj, multi_level_features
from detr_deform.models.denoising import DINO_EPS, DenoisingQueries, contrastive_denoising_queries, split_denoising
from detr_deform.models.dino_transformer import DINOTransformer
from detr_deform.models.proposals import check_tokens
from detr_deform.utils.box_ops import inverse_sigmoid
from detr_deform.utils.nested_tensor import NestedTensor


class DINO(nn.Module):
    """
    Args:
        backbone: a Joiner exposing ``strides`` and ``num_channels``.
        transformer: DINOTransformer.
        num_classes: classification logits per query (COCO: 91, no background logit).
        num_queries: matching queries (= selected encoder tokens), 900 in the original.
        num_feature_levels: levels fed to the transformer (4 or 5 in the original).
        aux_loss: also return the predictions of every earlier decoder layer.
        dn_number: the original's dn_number (denoising queries: up to 2·dn_number); 0 = off.
        dn_label_noise_ratio, dn_box_noise_scale: the denoising noise (0.5 and 1.0 released).
        dn_labelbook_size: label-embedding rows − 1 (at least num_classes).
    """

    takes_targets = True  # the training step passes the targets (denoising queries)
    selects_encoder_tokens = True  # the queries are the top num_queries encoder tokens

    def __init__(self, backbone: nn.Module, transformer: DINOTransformer, num_classes: int, num_queries: int,
                 num_feature_levels: int, aux_loss: bool = True, dn_number: int = 100,
                 dn_label_noise_ratio: float = 0.5, dn_box_noise_scale: float = 1.0,
                 dn_labelbook_size: int | None = None) -> None:
        super().__init__()
        dn_labelbook_size = num_classes if dn_labelbook_size is None else dn_labelbook_size
        if dn_labelbook_size < num_classes:
            raise ValueError(f"model.dn_labelbook_size={dn_labelbook_size} must be at least model.num_classes="
                             f"{num_classes}: noisy labels are drawn from all classes and index the label embedding")
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.num_feature_levels = num_feature_levels
        self.aux_loss = aux_loss
        self.dn_number = dn_number
        self.dn_label_noise_ratio = dn_label_noise_ratio
        self.dn_box_noise_scale = dn_box_noise_scale
        self.transformer = transformer
        hidden_dim = transformer.d_model
        self.label_enc = nn.Embedding(dn_labelbook_size + 1, hidden_dim)
        self.input_proj = build_input_proj(backbone, hidden_dim, num_feature_levels)
        init_input_proj(self.input_proj)
        self.backbone = backbone

        class_embed = nn.Linear(hidden_dim, num_classes)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        class_embed.bias.data = torch.ones(num_classes) * -math.log((1 - 0.01) / 0.01)
        nn.init.constant_(bbox_embed.layers[-1].weight.data, 0)
        nn.init.constant_(bbox_embed.layers[-1].bias.data, 0)
        # One shared head per kind, listed once per decoder layer (every index is in the state dict).
        num_layers = transformer.decoder.num_layers
        self.bbox_embed = nn.ModuleList([bbox_embed for _ in range(num_layers)])
        self.class_embed = nn.ModuleList([class_embed for _ in range(num_layers)])
        self.transformer.decoder.bbox_embed = self.bbox_embed
        self.transformer.decoder.class_embed = self.class_embed
        # The encoder heads: copies of the initialised heads, not shared.
        self.transformer.enc_out_bbox_embed = copy.deepcopy(bbox_embed)
        self.transformer.enc_out_class_embed = copy.deepcopy(class_embed)

    def denoising_queries(self, targets: list[dict], generator: torch.Generator) -> DenoisingQueries:
        """This batch's contrastive denoising queries (see models/denoising.py)."""
        return contrastive_denoising_queries(targets, self.label_enc, self.num_queries, self.num_classes,
                                             self.dn_number, self.dn_label_noise_ratio, self.dn_box_noise_scale,
                                             generator)

    def forward(self, samples: NestedTensor | list[torch.Tensor] | torch.Tensor, targets: list[dict] | None = None,
                denoising: DenoisingQueries | None = None) -> dict:
        """
        Args:
            samples: normalised (3, H_i, W_i) images, a (B, 3, H, W) tensor or a NestedTensor.
            targets: training only: per image ``labels`` and normalised cxcywh ``boxes``,
                noised into the denoising queries (with a generator seeded from the global RNG,
                so a resumed run draws the same noise).
            denoising: the denoising queries to use instead (e.g. the same ones for two
                implementations); training only.

        Returns ``pred_logits`` (B, Q, K), ``pred_boxes`` (B, Q, 4), ``aux_outputs``,
        ``interm_outputs`` (the Q selected encoder tokens), and in training with
        denoising ``dn_outputs`` (the same for the P denoising slots, every layer)
        with ``dn_meta`` {pad_size, num_dn_group}.
        """
        samples, srcs, masks, pos = multi_level_features(self.backbone, self.input_proj, samples)
        if not torch.compiler.is_compiling() and not torch.jit.is_tracing():
            check_tokens(self.num_queries, sum(int(s.shape[-2]) * int(s.shape[-1]) for s in srcs),
                         tuple(int(v) for v in samples.tensors.shape[-2:]), what="DINO model")
        if self.training and denoising is None and targets is not None and self.dn_number > 0:
            seed = int(torch.randint(0, 2 ** 62, (1,)).item())
            denoising = self.denoising_queries(targets, torch.Generator().manual_seed(seed))
        if not self.training:
            denoising = None
        hs, references, interm_class, interm_boxes = self.transformer(
            srcs, masks, pos, *((denoising.labels, denoising.boxes, denoising.attn_mask) if denoising else ()))
        # Keeps label_enc in the graph when a batch has no objects (DDP without find_unused_parameters).
        hs = torch.cat([hs[:1] + self.label_enc.weight[0, 0] * 0.0, hs[1:]])

        # Look forward twice: layer l's box refines the UNDETACHED reference of layer l - 1.
        outputs_coord = torch.stack([(head(h) + inverse_sigmoid(ref, eps=DINO_EPS)).sigmoid()
                                     for ref, head, h in zip(references[:-1], self.bbox_embed, hs)])
        outputs_class = torch.stack([head(h) for head, h in zip(self.class_embed, hs)])
        out = {}
        if denoising is not None and denoising.pad_size > 0:
            (dn_class, dn_coord), (outputs_class, outputs_coord) = split_denoising(outputs_class, outputs_coord,
                                                                                   denoising.pad_size)
            out["dn_outputs"] = self._layers(dn_class, dn_coord)
            out["dn_meta"] = {"pad_size": denoising.pad_size, "num_dn_group": denoising.num_groups}
        out.update(self._layers(outputs_class, outputs_coord))
        out["interm_outputs"] = {"pred_logits": interm_class, "pred_boxes": interm_boxes}
        return out

    def _layers(self, outputs_class: torch.Tensor, outputs_coord: torch.Tensor) -> dict:
        out = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                                  for a, b in zip(outputs_class[:-1], outputs_coord[:-1])]
        return out
