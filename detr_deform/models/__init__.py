"""Model family: backbone, position encoding, deformable transformer, heads,
matcher, criterion and post-processing. The exports are imported on first use
(utils/lazy.py): ``detr_deform.models.config`` loads without torch."""
from typing import TYPE_CHECKING

from detr_deform.utils.lazy import lazy_exports

if TYPE_CHECKING:
    from detr_deform.models.build import build_criterion, build_model, build_postprocessor
    from detr_deform.models.config import ModelConfig
    from detr_deform.models.dat import DAT, DAT_PRESETS, DATBackbone, build_dat, load_dat_checkpoint
    from detr_deform.models.deformable_detr import DeformableDETR

__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(("build_criterion", "build_model", "build_postprocessor"), "detr_deform.models.build"),
    "ModelConfig": "detr_deform.models.config",
    **dict.fromkeys(("DAT", "DAT_PRESETS", "DATBackbone", "build_dat", "load_dat_checkpoint"),
                    "detr_deform.models.dat"),
    "DeformableDETR": "detr_deform.models.deformable_detr",
})

__all__ = ["DAT", "DAT_PRESETS", "DATBackbone", "DeformableDETR", "build_dat", "load_dat_checkpoint", "ModelConfig",
           "build_criterion", "build_model", "build_postprocessor"]
