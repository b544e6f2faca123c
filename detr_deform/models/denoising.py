"""DINO's contrastive denoising (CDN) queries: noised copies of the ground truth fed to
the decoder in front of the matching queries during training.

Shapes: B images, N_i boxes of image i, M = max_i N_i, G groups, P = pad_size = 2·M·G
denoising slots, Q matching queries, C = d_model.

Layout (the original's, ``prepare_for_cdn``): the batch's boxes are concatenated and
copied 2G times; copy 2g is group g's positive set, copy 2g+1 its negative set. Copy c
of image i occupies slots c·M … c·M + N_i − 1; the other M − N_i slots of each copy are
padding (zero content, zero box logit). Random draws, in the original's order: label
noise (a uniform mask, then the new labels), then box noise (signs, then magnitudes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from detr_deform.utils.box_ops import inverse_sigmoid

# DINO's inverse sigmoid: eps 1e-3 (Deformable DETR's is 1e-5).
DINO_EPS = 1e-3


@dataclass
class DenoisingQueries:
    """labels (B, P, C) content queries; boxes (B, P, 4) reference logits; attn_mask
    (P + Q, P + Q) bool, True = may not attend; pad_size P; num_groups G."""
    labels: torch.Tensor
    boxes: torch.Tensor
    attn_mask: torch.Tensor
    pad_size: int
    num_groups: int

    @property
    def group_size(self) -> int:
        """Slots per group: 2·M (M positives, then M negatives)."""
        return self.pad_size // self.num_groups


def denoising_groups(max_boxes: int, dn_number: int) -> int:
    """The original's group count: dn_number is doubled (positives and negatives), then
    divided by 2·M when that doubled number is at least 100; at least 1; 1 when M = 0."""
    groups = dn_number * 2
    if max_boxes == 0:
        return 1
    if groups >= 100:
        groups = groups // (max_boxes * 2)
    return max(groups, 1)


def denoising_attn_mask(pad_size: int, num_groups: int, num_queries: int, device=None) -> torch.Tensor:
    """(P + Q, P + Q) bool, True = blocked: matching queries see no denoising slot; a
    group sees no other group; a slot sees its own group (padding included) and every
    matching query."""
    size = pad_size + num_queries
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    mask[pad_size:, :pad_size] = True
    group = pad_size // num_groups if num_groups else 0
    for g in range(num_groups):
        rows = slice(group * g, group * (g + 1))
        mask[rows, group * (g + 1):pad_size] = True
        mask[rows, :group * g] = True
    return mask


def contrastive_denoising_queries(targets: list[dict], label_enc: nn.Embedding, num_queries: int, num_classes: int,
                                  dn_number: int, label_noise_ratio: float, box_noise_scale: float,
                                  generator: torch.Generator) -> DenoisingQueries:
    """The denoising queries of one batch.

    Args:
        targets: per image ``labels`` (N_i,) int64 and ``boxes`` (N_i, 4) normalised cxcywh.
        label_enc: the label embedding (at least ``num_classes`` rows; indexed by the labels).
        num_queries: Q, the matching queries that follow the denoising part.
        num_classes: noisy labels are drawn uniformly from [0, num_classes).
        dn_number: the original's dn_number (100).
        label_noise_ratio: a label is redrawn with probability ``label_noise_ratio / 2``.
        box_noise_scale: λ; each corner coordinate moves by ±u·λ·(half the box side),
            u in [0, 1) for positives and [1, 2) for negatives.
        generator: a CPU generator; every random draw comes from it (none from the global RNG).
    """
    device = label_enc.weight.device
    counts = [len(t["labels"]) for t in targets]
    max_boxes = max(counts, default=0)
    groups = denoising_groups(max_boxes, dn_number)
    copies = 2 * groups
    total = sum(counts)
    labels = torch.cat([t["labels"].reshape(-1).to("cpu", torch.int64) for t in targets]) if targets else \
        torch.zeros(0, dtype=torch.int64)
    boxes = torch.cat([t["boxes"].reshape(-1, 4).to("cpu", torch.float32) for t in targets]) if targets else \
        torch.zeros(0, 4)
    known_labels = labels.repeat(copies)
    known_boxes = boxes.repeat(copies, 1)
    noisy_labels = known_labels.clone()
    noisy_boxes = known_boxes.clone()
    if label_noise_ratio > 0:
        chosen = torch.nonzero(torch.rand(known_labels.shape, generator=generator) < label_noise_ratio * 0.5).view(-1)
        noisy_labels.scatter_(0, chosen, torch.randint(0, num_classes, chosen.shape, generator=generator))
    if box_noise_scale > 0:
        corners = torch.cat([known_boxes[:, :2] - known_boxes[:, 2:] / 2, known_boxes[:, :2] + known_boxes[:, 2:] / 2],
                            1)
        half_sides = torch.cat([known_boxes[:, 2:] / 2, known_boxes[:, 2:] / 2], 1)
        sign = torch.randint(0, 2, known_boxes.shape, generator=generator, dtype=torch.float32) * 2.0 - 1.0
        part = torch.rand(known_boxes.shape, generator=generator)
        negative = (torch.arange(copies * total) // max(total, 1)) % 2 == 1  # copies 1, 3, 5, …
        part[negative] += 1.0
        part *= sign
        corners = (corners + part * half_sides * box_noise_scale).clamp(min=0.0, max=1.0)
        noisy_boxes = torch.cat([(corners[:, :2] + corners[:, 2:]) / 2, corners[:, 2:] - corners[:, :2]], 1)

    pad_size = max_boxes * copies
    batch = len(targets)
    query_labels = torch.zeros(batch, pad_size, label_enc.embedding_dim, device=device, dtype=label_enc.weight.dtype)
    query_boxes = torch.zeros(batch, pad_size, 4, device=device)
    if total:
        image = torch.cat([torch.full((n,), i, dtype=torch.int64) for i, n in enumerate(counts)]).repeat(copies)
        within = torch.cat([torch.arange(n) for n in counts])
        slot = torch.cat([within + max_boxes * c for c in range(copies)])
        index = (image.to(device), slot.to(device))
        query_labels[index] = label_enc(noisy_labels.to(device))
        query_boxes[index] = inverse_sigmoid(noisy_boxes.to(device), eps=DINO_EPS)
    return DenoisingQueries(query_labels, query_boxes, denoising_attn_mask(pad_size, groups, num_queries, device),
                            pad_size, groups)


def split_denoising(outputs_class: torch.Tensor, outputs_coord: torch.Tensor,
                    pad_size: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(D, B, P + Q, ·) per-layer predictions -> ((denoising logits, boxes), (matching logits, boxes))."""
    return ((outputs_class[:, :, :pad_size], outputs_coord[:, :, :pad_size]),
            (outputs_class[:, :, pad_size:], outputs_coord[:, :, pad_size:]))


def denoising_pairs(targets: list[dict], pad_size: int, num_groups: int,
                    device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image (slot indices, target indices): positive slot g·2M + t is paired with
    ground-truth box t, in every group g (no Hungarian matching)."""
    group = pad_size // num_groups
    pairs = []
    for t in targets:
        count = len(t["labels"])
        target_idx = torch.arange(count, device=device).repeat(num_groups)
        slot_idx = (torch.arange(num_groups, device=device) * group)[:, None].repeat(1, count).flatten() + target_idx
        pairs.append((slot_idx, target_idx))
    return pairs
