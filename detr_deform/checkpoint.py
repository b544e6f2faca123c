"""Checkpoint files: safe loading, official model-zoo files, fine-tuning init.

Every file is read with ``torch.load(weights_only=True)``; the only non-tensor
classes allowed are ``argparse.Namespace`` (the ``args`` of official Deformable
DETR files) and ``yacs.config.CfgNode`` (the ``config`` of official DAT files),
which is read as an OrderedDict without importing yacs. A
file that pickles anything else is refused and no code from it runs.

Formats:
- ours: ``{"format": "detr_deform", "version": 1, "model": state_dict, "config": {"model": {...}, ...}, ...}``
- official: ``{"model": state_dict, "args": argparse.Namespace, ...}``
"""
from __future__ import annotations

import argparse
import collections
import os
import pickle
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detr_deform.models.build import build_model
from detr_deform.models.config import ModelConfig

FORMAT = "detr_deform"
VERSION = 1

# yacs.config.CfgNode (the ``config`` of official DAT files) is read as an
# OrderedDict: the weights-only unpickler can fill it and its attributes, and no
# yacs code runs (nor needs to be installed).
SAFE_GLOBALS = [argparse.Namespace, (collections.OrderedDict, "yacs.config.CfgNode")]


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used; the message names the file and the fix."""


def read_checkpoint(path: str | os.PathLike) -> Any:
    """torch.load with weights_only=True and the allow-list; clear errors."""
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"checkpoint not found: {file}")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{file}: refused to load: it contains pickled Python objects outside the allow-list "
            f"(tensors, containers, argparse.Namespace, yacs CfgNode). Checkpoints are read with weights_only=True so that a "
            f"file cannot run code. If you trust the file, re-save only its state dict. Details: "
            f"{str(error).splitlines()[0]}"
        ) from error
    except (EOFError, zipfile.BadZipFile, RuntimeError, ValueError) as error:
        raise CheckpointError(
            f"{file}: not a readable PyTorch checkpoint (truncated or corrupted?): {type(error).__name__}: {error}"
        ) from error


def _state_dict_of(content: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(content, dict) and isinstance(content.get("model"), dict):
        return content["model"]
    if isinstance(content, dict) and content and all(isinstance(v, torch.Tensor) for v in content.values()):
        return content
    raise CheckpointError(f"{path}: no model weights found (expected a dict with a 'model' state dict)")


def config_of(content: Any, path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig stored in (or implied by) a checkpoint's content."""
    path = Path(path)
    if isinstance(content, dict) and content.get("format") == FORMAT:
        config = content.get("config", {})
        return ModelConfig.from_dict(dict(config.get("model", config)))
    if isinstance(content, dict) and isinstance(content.get("args"), (argparse.Namespace, dict)):
        state = _state_dict_of(content, path)
        num_classes = state["class_embed.0.bias"].shape[0] if "class_embed.0.bias" in state else None
        try:
            return ModelConfig.from_official_args(content["args"], num_classes=num_classes)
        except ValueError as error:
            raise CheckpointError(f"{path}: {error}") from error
    raise CheckpointError(
        f"{path}: no model configuration in this file (neither a detr_deform checkpoint nor an official one with "
        f"'args'); pass the configuration explicitly: load_model(path, cfg=ModelConfig(...))"
    )


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               cfg: ModelConfig | dict | None = None) -> tuple[nn.Module, ModelConfig]:
    """Builds the model a checkpoint describes and loads its weights strictly.

    Works for our checkpoints and for official model-zoo files. Returns the
    model in eval mode on ``device`` and its ModelConfig.
    """
    path = Path(path)
    return model_from_content(read_checkpoint(path), path, device, cfg)


def model_from_content(content: Any, path: str | os.PathLike, device: str | torch.device = "cpu",
                       cfg: ModelConfig | dict | None = None) -> tuple[nn.Module, ModelConfig]:
    """``load_model`` for a checkpoint already read with ``read_checkpoint``."""
    path = Path(path)
    if cfg is None:
        cfg = config_of(content, path)
    elif isinstance(cfg, dict):
        cfg = ModelConfig.from_dict(cfg)
    # Never fetch backbone weights: the checkpoint carries them.
    cfg = ModelConfig.from_dict({**cfg.to_dict(), "pretrained_backbone": None})
    model = build_model(cfg)
    state = _state_dict_of(content, path)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: weights do not match the model described by its configuration "
            f"(with_box_refine={cfg.with_box_refine}, two_stage={cfg.two_stage}, "
            f"num_feature_levels={cfg.num_feature_levels}, backbone={cfg.backbone}): "
            f"{len(result.missing_keys)} missing key(s) {result.missing_keys[:4]}, "
            f"{len(result.unexpected_keys)} unexpected key(s) {result.unexpected_keys[:4]}"
        )
    return model.to(device).eval(), cfg


def init_from(model: nn.Module, path: str | os.PathLike) -> dict[str, list[str]]:
    """Fine-tuning initialisation: copies every weight whose name and shape fit,
    and reports the rest (e.g. a class head of another size) instead of failing.

    Returns {"loaded", "shape_mismatch", "missing", "unexpected"} key lists.
    """
    path = Path(path)
    state = _state_dict_of(read_checkpoint(path), path)
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
    if report["shape_mismatch"] or report["missing"]:
        warnings.warn(
            f"init_from {path}: loaded {len(report['loaded'])} tensors; kept the model's own values for "
            f"{len(report['shape_mismatch'])} of another shape (e.g. {report['shape_mismatch'][:2]}) and "
            f"{len(report['missing'])} missing from the file",
            stacklevel=2,
        )
    return report


def save_checkpoint(path: str | os.PathLike, model: nn.Module, cfg: ModelConfig | dict, **extra: Any) -> Path:
    """Writes our format atomically: a temporary file in the same folder, fsync,
    then rename, so an interrupted save never replaces a good checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = cfg.to_dict() if isinstance(cfg, ModelConfig) else dict(cfg)
    if "model" not in config:
        config = {"model": config}
    content = {"format": FORMAT, "version": VERSION, "model": model.state_dict(), "config": config, **extra}
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise CheckpointError(f"cannot write checkpoint {path}: {error}") from error
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(content, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, (OSError, RuntimeError)):
            previous = "the previous checkpoint there is untouched" if path.exists() else "no file was written"
            raise CheckpointError(f"could not write checkpoint {path}: {error} (disk full or quota exceeded?); "
                                  f"{previous}") from error
        raise
    return path
