"""Model family: backbone, position encoding, deformable transformer, heads,
matcher, criterion and post-processing."""
from detr_deform.models.build import build_criterion, build_model, build_postprocessor
from detr_deform.models.config import ModelConfig
from detr_deform.models.dat import DAT, DAT_PRESETS, DATBackbone, build_dat, load_dat_checkpoint
from detr_deform.models.deformable_detr import DeformableDETR

__all__ = ["DAT", "DAT_PRESETS", "DATBackbone", "DeformableDETR", "build_dat", "load_dat_checkpoint", "ModelConfig",
           "build_criterion", "build_model", "build_postprocessor"]
