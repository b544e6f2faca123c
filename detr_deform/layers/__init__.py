"""Reusable building blocks shared by the models."""
from detr_deform.layers.ms_deform_attn import MSDeformAttn

__all__ = ["MSDeformAttn"]
