"""Models from checkpoint files and back: ``load_model`` (ours, official
model-zoo files, Hugging Face folders), ``init_from`` (fine-tuning),
``save_checkpoint``; ``read_content`` is the one entry point that reads any of them.

The layer above :mod:`detr_deform.models` (it builds models) and above
:mod:`detr_deform.io.checkpoint` (which only reads and writes files) and
:mod:`detr_deform.loading.hf` (which reads Hugging Face folders into our layout).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detr_deform.io.checkpoint import FORMAT, VERSION, CheckpointError, read_checkpoint, state_dict_of, write_checkpoint
from detr_deform.io.hf_folder import is_hf_checkpoint
from detr_deform.io.hub import resolve_checkpoint
from detr_deform.loading.hf import read_hf
from detr_deform.models.build import build_model
from detr_deform.models.config import ModelConfig


def read_content(path: str | os.PathLike, revision: str | None = None) -> Any:
    """The content of any checkpoint we read: a Hugging Face ``save_pretrained`` folder
    (or its weights file) converted to our layout by :func:`detr_deform.loading.hf.read_hf`, else
    the file as ``read_checkpoint`` reads it (ours, official). A Hugging Face hub id
    (``org/name``, ``org/name@revision``; ``revision``) is such a folder, from the hub cache
    (or downloaded; never with ``HF_HUB_OFFLINE=1``). Feed it to ``model_from_content``."""
    path = resolve_checkpoint(path, revision)
    return read_hf(path) if is_hf_checkpoint(path) else read_checkpoint(path)


def config_of(content: Any, path: str | os.PathLike, state: dict[str, torch.Tensor] | None = None) -> ModelConfig:
    """The ModelConfig stored in (or implied by) a checkpoint's content, not yet
    validated (``build_model`` validates it). ``state``: the file's weights, when
    already extracted (official files: the class count is read from the class head)."""
    path = Path(path)
    if isinstance(content, dict) and content.get("format") == FORMAT:
        config = content.get("config", {})
        model = config.get("model", config) if isinstance(config, dict) else config
        if not isinstance(model, dict):
            raise CheckpointError(f"{path}: the stored model configuration is a {type(model).__name__}, not a "
                                  f"mapping; the file was not written by detr_deform (or was edited)")
        try:
            return ModelConfig.from_dict(dict(model), validate=False)
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{path}: {error}") from error
    if isinstance(content, dict) and isinstance(content.get("args"), (argparse.Namespace, dict)):
        state = state_dict_of(content, path) if state is None else state
        num_classes = state["class_embed.0.bias"].shape[0] if "class_embed.0.bias" in state else None
        try:
            return ModelConfig.from_official_args(content["args"], num_classes=num_classes, validate=False)
        except (TypeError, ValueError) as error:  # e.g. args.lr_backbone='x'
            raise CheckpointError(f"{path}: official 'args': {error}") from error
    raise CheckpointError(
        f"{path}: no model configuration in this file (neither a detr_deform checkpoint nor an official one with "
        f"'args'); pass the configuration explicitly: load_model(path, cfg=ModelConfig(...))"
    )


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               cfg: ModelConfig | dict | None = None, revision: str | None = None) -> tuple[nn.Module, ModelConfig]:
    """Builds the model a checkpoint describes and loads its weights strictly.

    Works for our checkpoints, official model-zoo files and Hugging Face
    ``save_pretrained`` folders of DeformableDetrForObjectDetection (or their
    ``.safetensors`` / ``pytorch_model.bin`` file with config.json beside it), and hub
    ids of such folders (``"SenseTime/deformable-detr"``, at ``revision``), read from the
    Hugging Face cache first. Returns the model in eval mode on ``device`` and its ModelConfig.
    """
    return model_from_content(read_content(path, revision), Path(path), device, cfg)


def model_from_content(content: Any, path: str | os.PathLike, device: str | torch.device = "cpu",
                       cfg: ModelConfig | dict | None = None) -> tuple[nn.Module, ModelConfig]:
    """``load_model`` for a checkpoint already read with ``read_content``."""
    path = Path(path)
    state = state_dict_of(content, path)
    if cfg is None:
        cfg = config_of(content, path, state)
    elif isinstance(cfg, dict):
        cfg = ModelConfig.from_dict(cfg, validate=False)
    # Never fetch backbone weights: the checkpoint carries them.
    cfg = dataclasses.replace(cfg, pretrained_backbone=None)
    try:
        model = build_model(cfg)  # validates the configuration (once)
    except ValueError as error:
        raise CheckpointError(f"{path}: the model configuration is not usable: {error}") from error
    own = model.state_dict()
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    if wrong or missing or unexpected:
        example = (f"e.g. {wrong[0]} is {tuple(state[wrong[0]].shape)} in the file but {tuple(own[wrong[0]].shape)} "
                   f"in the model; " if wrong else "")
        raise CheckpointError(
            f"{path}: weights do not match the model described by its configuration "
            f"(with_box_refine={cfg.with_box_refine}, two_stage={cfg.two_stage}, "
            f"num_feature_levels={cfg.num_feature_levels}, backbone={cfg.backbone}, hidden_dim={cfg.hidden_dim}): "
            f"{len(wrong)} tensor(s) of another shape, {len(missing)} missing key(s) {missing[:4]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:4]}; {example}is the stored configuration (official: "
            f"'args') the one the weights were trained with? To start a differently shaped model from these "
            f"weights, use runtime.init_from (fine-tuning)")
    model.load_state_dict(state)
    bad = nonfinite_tensors(state)
    if bad:
        warnings.warn(f"{path}: {len(bad)} weight tensor(s) hold NaN or inf values, e.g. {bad[:3]}: the model's "
                      f"outputs are not meaningful (was the run stopped by a non-finite loss?)",
                      NonFiniteWeightsWarning, stacklevel=2)
    return model.to(device).eval(), cfg


class NonFiniteWeightsWarning(UserWarning):
    """A loaded checkpoint holds NaN/inf weights (its predictions are meaningless)."""


def nonfinite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``state`` that hold a NaN or an inf."""
    return [name for name, tensor in state.items()
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all()]


def init_from(model: nn.Module, path: str | os.PathLike, allow_nonfinite: bool = False) -> dict[str, list[str]]:
    """Fine-tuning initialisation: copies every weight whose name and shape fit,
    and reports the rest (e.g. a class head of another size) instead of failing.

    Returns {"loaded", "shape_mismatch", "missing", "unexpected"} key lists.
    """
    state = state_dict_of(read_content(path), Path(path))
    path = Path(path)
    bad = [] if allow_nonfinite else nonfinite_tensors(state)
    if bad:
        raise CheckpointError(f"runtime.init_from={path}: {len(bad)} weight tensor(s) hold NaN/inf (e.g. {bad[:3]}); "
                              f"set runtime.allow_nonfinite_weights=true to start from them anyway")
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    report = {
        "loaded": sorted(fitting),
        "shape_mismatch": sorted(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                                 for k, v in state.items() if k in own and own[k].shape != v.shape),
        "missing": sorted(k for k in own if k not in state),
        "unexpected": sorted(k for k in state if k not in own),
    }
    model.load_state_dict(fitting, strict=False)
    if report["shape_mismatch"] or report["missing"] or report["unexpected"]:
        # The file's unused tensors matter as much as the missing ones: a renamed or prefixed state dict
        # ("module.", "model.") loads nothing yet "misses" every key.
        warnings.warn(
            f"init_from {path}: loaded {len(report['loaded'])} tensors; kept the model's own values for "
            f"{len(report['shape_mismatch'])} of another shape (e.g. {report['shape_mismatch'][:2]}) and "
            f"{len(report['missing'])} missing from the file (e.g. {report['missing'][:2]}); left unused "
            f"{len(report['unexpected'])} tensor(s) of the file that the model does not have (e.g. "
            f"{report['unexpected'][:2]})",
            stacklevel=2,
        )
    return report


def save_checkpoint(path: str | os.PathLike, model: nn.Module, cfg: ModelConfig | dict, **extra: Any) -> Path:
    """Writes ``model`` with its configuration in our format (atomically);
    ``extra`` entries (optimizer state, epoch, ...) are stored beside them."""
    config = cfg.to_dict() if isinstance(cfg, ModelConfig) else dict(cfg)
    if "model" not in config:
        config = {"model": config}
    content = {"format": FORMAT, "version": VERSION, "model": model.state_dict(), "config": config, **extra}
    return write_checkpoint(path, content)
