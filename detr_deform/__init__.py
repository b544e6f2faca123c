"""detr_deform: Deformable DETR, faithful to the official implementation.

Public API::

    detector = detr_deform.Detector.from_pretrained(path)     # ours, official or Hugging Face; device="auto"
    found = detector("photos/")                               # per image (paths, folders, PIL, numpy, tensors):
    picture = detector.draw(found[0].source, found[0])        # boxes xyxy in its pixels, scores, names; drawn
    model, cfg = detr_deform.load_model(path, device="cpu")   # ours, official or Hugging Face; eval mode
    criterion = detr_deform.build_criterion(cfg)              # (outputs, targets) -> unweighted losses; .weight_dict
    postprocess = detr_deform.build_postprocessor(cfg)        # (outputs, target_sizes (B,2) as (h,w)) -> detections
    outputs = model(images)                                   # list of normalised 3xHxW tensors of any sizes
    detr_deform.save_hf(model, cfg, folder)                   # a transformers from_pretrained folder
    detr_deform.detect_video(detector, "clip.mp4")            # per frame; docs/model.md
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from detr_deform.utils.lazy import lazy_exports

# The public names, imported on first use (PEP 562): ``import detr_deform.errors`` (what every tool
# needs before it has parsed its arguments) must not pay for torch, torchvision and the models.
_PUBLIC = {
    "CheckpointError": "detr_deform.io.checkpoint",
    "read_checkpoint": "detr_deform.io.checkpoint",
    "Detector": "detr_deform.inference.detector",
    "detect_video": "detr_deform.inference.video",
    "save_hf": "detr_deform.loading.hf",
    "init_from": "detr_deform.loading.model",
    "load_model": "detr_deform.loading.model",
    "save_checkpoint": "detr_deform.loading.model",
    "build_criterion": "detr_deform.models.build",
    "build_model": "detr_deform.models.build",
    "build_postprocessor": "detr_deform.models.build",
    "ModelConfig": "detr_deform.models.config",
}

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from detr_deform.inference.detector import Detector
    from detr_deform.inference.video import detect_video
    from detr_deform.io.checkpoint import CheckpointError, read_checkpoint
    from detr_deform.loading.hf import save_hf
    from detr_deform.loading.model import init_from, load_model, save_checkpoint
    from detr_deform.models.build import build_criterion, build_model, build_postprocessor
    from detr_deform.models.config import ModelConfig


__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Detector",
    "ModelConfig",
    "build_criterion",
    "build_model",
    "build_postprocessor",
    "detect_video",
    "init_from",
    "load_model",
    "read_checkpoint",
    "save_checkpoint",
    "save_hf",
]
