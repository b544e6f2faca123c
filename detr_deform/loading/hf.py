"""Hugging Face transformers checkpoints of ``DeformableDetrForObjectDetection``,
in and out: :func:`read_hf` turns a ``save_pretrained`` folder into our in-memory
checkpoint layout (so every consumer of :func:`detr_deform.loading.model.read_content`
works unchanged), :func:`save_hf` writes a folder that ``from_pretrained`` loads.

The parts: folder files (:mod:`detr_deform.io.hf_folder`), config.json
(:mod:`detr_deform.loading.hf_config`), weight names (:mod:`detr_deform.loading.hf_weights`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from detr_deform.data.transforms import OFFICIAL_MAX_SIZE, OFFICIAL_VAL_SIZE
from detr_deform.io.checkpoint import FORMAT, VERSION, CheckpointError
from detr_deform.io.hf_folder import (
    CONFIG_NAME,
    PREPROCESSOR_NAME,
    WEIGHTS_NAME,
    find_config_file,
    find_weights_file,
    prepare_folder,
    read_json,
    read_weights,
    write_atomically,
)
from detr_deform.loading.hf_config import (
    class_names_from_hf,
    config_from_hf,
    hf_config_from,
    image_processor_config,
    sizes_from_image_processor,
)
from detr_deform.loading.hf_weights import independent_class_heads, state_dict_from_hf, state_dict_to_hf
from detr_deform.models.config import ModelConfig


def read_hf(path: str | os.PathLike) -> dict[str, Any]:
    """A Hugging Face checkpoint (folder, or weights file with config.json beside it) as a
    checkpoint content in our layout: ``{"format": "detr_deform", "version", "model": state
    dict in our (= official) names, "config": {"model": ModelConfig dict}, "category_names":
    {str(id): name} from id2label, "source": {"format": "hf", "path"}}``."""
    path = Path(path)
    config_file = find_config_file(path)
    config = read_json(config_file)
    cfg = config_from_hf(config, source=str(config_file))
    names = class_names_from_hf(config, str(config_file))
    weights_file = find_weights_file(path)
    state = state_dict_from_hf(read_weights(weights_file), cfg, source=str(weights_file))
    rows = state["class_embed.0.weight"].shape[0]
    if rows != cfg.num_classes:
        raise CheckpointError(f"{config_file}: id2label has {cfg.num_classes} labels but the class head in "
                              f"{weights_file.name} has {rows} rows; fix id2label (one entry per class logit)")
    saved = {"model": cfg.to_dict()}
    processor = config_file.parent / PREPROCESSOR_NAME
    sizes = sizes_from_image_processor(read_json(processor), str(processor)) if processor.is_file() else {}
    if sizes:
        saved["data"] = sizes
    return {"format": FORMAT, "version": VERSION, "model": state, "config": saved,
            "category_names": names, "source": {"format": "hf", "path": str(path)}}



def save_hf(model: nn.Module, cfg: ModelConfig | Mapping[str, Any], folder: str | os.PathLike,
            class_names: Mapping[Any, str] | Sequence[str] | None = None, val_size: int = OFFICIAL_VAL_SIZE,
            max_size: int = OFFICIAL_MAX_SIZE) -> Path:
    """Writes ``model`` as a transformers ``save_pretrained`` folder (config.json +
    model.safetensors + preprocessor_config.json, each written atomically) that
    ``DeformableDetrForObjectDetection.from_pretrained(folder)`` loads with no missing or
    unexpected keys and no tying warnings, and that computes our outputs;
    ``AutoImageProcessor.from_pretrained(folder)`` gets our validation resize
    (``val_size``/``max_size``) and normalisation.

    ``class_names`` ({id: name} or a list) become id2label; default: the COCO names for 91
    classes ("N/A" for unused ids), else the ids as text.

    Box refinement without two-stage, with per-layer class heads that differ (as official
    training gives): transformers would tie them into one, so the folder stores every head
    copy and sets ``tie_word_embeddings=false`` (docs/model_zoo.md: what this means for
    training in transformers). Otherwise the file is what transformers writes (tied copies
    omitted, ``tie_word_embeddings=true``)."""
    if not isinstance(cfg, ModelConfig):
        cfg = ModelConfig.from_dict(dict(cfg.get("model", cfg)), validate=False)
    if cfg.arch != "deformable_detr":
        raise CheckpointError(f"model.arch={cfg.arch}: transformers has no {cfg.arch.upper()} model class (only "
                              f"DeformableDetr); keep this model as a detr_deform or original-format checkpoint")
    if cfg.backbone == "timm" and cfg.backbone_out_indices is None:  # the default stages, as built
        cfg = dataclasses.replace(cfg, backbone_out_indices=list(model.backbone[0].out_indices))
    state = model.state_dict()
    tie = not independent_class_heads(state, cfg)
    config = hf_config_from(cfg, class_names, tie_weights=tie)
    # safetensors refuses tensors that share memory (our tied heads, q/k/v views): one copy each.
    weights = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict_to_hf(state, cfg, tie).items()}
    folder = Path(folder)
    prepare_folder(folder)
    write_atomically(folder / WEIGHTS_NAME, lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    write_atomically(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    processor = json.dumps(image_processor_config(val_size, max_size), indent=2, sort_keys=True) + "\n"
    write_atomically(folder / PREPROCESSOR_NAME, lambda tmp: Path(tmp).write_text(processor, encoding="utf-8"))
    return folder
