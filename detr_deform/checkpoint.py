"""Checkpoint files: safe reading, atomic writing. Knows nothing about models
(:mod:`detr_deform.loading` builds models from what is read here).

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
import zipfile
from pathlib import Path
from typing import Any

import torch

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


def state_dict_of(content: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint's content: ``content["model"]``, or the
    content itself when it is a bare state dict."""
    if isinstance(content, dict) and isinstance(content.get("model"), dict):
        return content["model"]
    if isinstance(content, dict) and content and all(isinstance(v, torch.Tensor) for v in content.values()):
        return content
    raise CheckpointError(f"{path}: no model weights found (expected a dict with a 'model' state dict)")


def write_checkpoint(path: str | os.PathLike, content: dict[str, Any]) -> Path:
    """Writes ``content`` atomically: a temporary file in the same folder, fsync,
    then rename, so an interrupted save never replaces a good checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
