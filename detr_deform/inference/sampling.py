"""Where the deformable attention of a Detector sampled (for tools/visualize.py).

    with recording_sampling(detector):
        found = detector(image, threshold=0.0, batch_size=1)[0]
    points = decoder_sampling(detector, found, query=int(found.queries[0]))
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from detr_deform.inference.detector import Detections, Detector
from detr_deform.inference.inputs import InputError
from detr_deform.layers.ms_deform_attn import MSDeformAttn


@dataclass
class SamplingPoints:
    """Where one query of one MSDeformAttn layer sampled, in input-image pixels."""
    points: torch.Tensor      # (K, 2) x, y for K = heads x levels x points
    weights: torch.Tensor     # (K,) attention weights (each head's weights sum to 1)
    levels: torch.Tensor      # (K,) feature level of each point
    reference: torch.Tensor   # (2,) x, y of the reference point (box centre for box references)
    heads: int
    num_levels: int
    num_points: int


def attention_layers(model: nn.Module) -> list[MSDeformAttn]:
    return [m for m in model.modules() if isinstance(m, MSDeformAttn)]


@contextlib.contextmanager
def recording_sampling(detector: Detector) -> Iterator[None]:
    """Every MSDeformAttn layer keeps the sampling locations and weights of the last
    forward pass inside this block (run one image at a time: ``batch_size=1``)."""
    layers = attention_layers(detector.model)
    for layer in layers:
        layer.keep_sampling = True
    try:
        yield
    finally:
        for layer in layers:
            layer.keep_sampling = False


def _sampling_of(layer: MSDeformAttn, query: int, detections: Detections) -> SamplingPoints:
    if layer.last_sampling_locations is None:
        raise RuntimeError("no sampling recorded: run the detector inside `with recording_sampling(detector):`")
    if layer.last_sampling_locations.shape[0] != 1:
        raise InputError("sampling points are drawn for one image at a time (batch_size=1, no padding)")
    # Locations are normalised to the (unpadded, batch of 1) network input, which is the resized image.
    scale = torch.tensor([detections.width, detections.height], dtype=torch.float32)
    locations = layer.last_sampling_locations[0, query].float().cpu()   # (M, L, P, 2)
    weights = layer.last_attention_weights[0, query].float().cpu()      # (M, L, P)
    heads, levels, points = weights.shape
    level_of = torch.arange(levels)[None, :, None].expand(weights.shape)
    reference = layer.last_reference_points[0, query].float().cpu()     # (L, 2) or (L, 4)
    # Reference points carry the valid ratios of each level (all 1 without padding): take level 0.
    return SamplingPoints(points=locations.reshape(-1, 2) * scale, weights=weights.reshape(-1),
                          levels=level_of.reshape(-1), reference=reference[0, :2] * scale, heads=heads,
                          num_levels=levels, num_points=points)


def decoder_sampling(detector: Detector, detections: Detections, query: int) -> SamplingPoints:
    """The last decoder layer's cross-attention sampling points of ``query``."""
    layer = detector.model.transformer.decoder.layers[-1].cross_attn
    return _sampling_of(layer, query, detections)


def encoder_sampling(detector: Detector, detections: Detections, x: float, y: float) -> SamplingPoints:
    """The last encoder layer's sampling points for the level-0 (finest) feature
    position under pixel (x, y) of the input image."""
    layer = detector.model.transformer.encoder.layers[-1].self_attn
    width, height = detections.width, detections.height
    if not (0 <= x < width and 0 <= y < height):
        raise InputError(f"pixel ({x:g}, {y:g}) is outside the {width}x{height} image {detections.source}")
    if layer.last_spatial_shapes is None:
        raise RuntimeError("no sampling recorded: run the detector inside `with recording_sampling(detector):`")
    level_h, level_w = (int(v) for v in layer.last_spatial_shapes[0])
    row, col = min(int(y / height * level_h), level_h - 1), min(int(x / width * level_w), level_w - 1)
    return _sampling_of(layer, row * level_w + col, detections)


__all__ = ["SamplingPoints", "attention_layers", "decoder_sampling", "encoder_sampling", "recording_sampling"]
