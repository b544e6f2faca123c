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
"""
from detr_deform.checkpoint import CheckpointError, read_checkpoint
from detr_deform.detector import Detector
from detr_deform.hf import save_hf
from detr_deform.loading import init_from, load_model, save_checkpoint
from detr_deform.models.build import build_criterion, build_model, build_postprocessor
from detr_deform.models.config import ModelConfig

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Detector",
    "ModelConfig",
    "build_criterion",
    "build_model",
    "build_postprocessor",
    "init_from",
    "load_model",
    "read_checkpoint",
    "save_checkpoint",
    "save_hf",
]
