"""Hugging Face ``save_pretrained`` folders as files: which file holds the config, the
weights (single file or shards) and the image processor, reading them with one-line
errors, and writing them atomically. Knows nothing of models: the meaning of config.json
is :mod:`detr_deform.loading.hf_config`, the weight names :mod:`detr_deform.loading.hf_weights`.

No transformers at runtime: ``config.json`` is plain JSON and the weights are read with
safetensors (``pytorch_model.bin``: our weights-only ``torch.load``).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from detr_deform.errors import EXIT_FAILED
from detr_deform.io.checkpoint import CheckpointError, read_checkpoint, state_dict_of
from detr_deform.utils.files import OutputError, atomic_path

CONFIG_NAME = "config.json"
PREPROCESSOR_NAME = "preprocessor_config.json"  # DeformableDetrImageProcessor: the validation resize
WEIGHTS_NAME = "model.safetensors"
# What a save_pretrained folder may hold, in the order transformers looks for them.
WEIGHTS_NAMES = (WEIGHTS_NAME, "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def is_hf_checkpoint(path: str | os.PathLike) -> bool:
    """True for what only a Hugging Face checkpoint can be: a folder (``save_pretrained``
    writes folders; ours and official checkpoints are files), a ``.safetensors`` file or a
    shard index JSON, or ``pytorch_model*.bin`` with a config.json beside it. Whether it is
    a usable DeformableDetr one is :func:`read_hf`'s to say, with a message naming why."""
    path = Path(path)
    if path.is_dir():
        return True
    name = path.name
    if name.endswith(".safetensors") or name.endswith(".index.json"):
        return True
    return name.startswith("pytorch_model") and name.endswith(".bin") and (path.parent / CONFIG_NAME).is_file()


def find_config_file(path: Path) -> Path:
    """The config.json of a folder, or the one beside a weights file."""
    if path.is_dir():
        config = path / CONFIG_NAME
        if not config.is_file():
            files = sorted(p.name for p in path.glob("*.pth"))
            hint = f"; for our or official checkpoints pass the file itself, e.g. {files[0]}" if files else ""
            raise CheckpointError(f"{path}: no {CONFIG_NAME} in this folder; a Hugging Face checkpoint is the folder "
                                  f"that save_pretrained writes ({CONFIG_NAME} + {WEIGHTS_NAME}){hint}")
        return config
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    config = path.parent / CONFIG_NAME
    if not config.is_file():
        raise CheckpointError(f"{path}: a Hugging Face weights file needs the {CONFIG_NAME} that save_pretrained "
                              f"writes beside it; there is none in {path.parent}")
    return config


def find_weights_file(path: Path) -> Path:
    """The weights file (or shard index) of a folder, in transformers' order; a file itself."""
    if not path.is_dir():
        return path
    for name in WEIGHTS_NAMES:
        if (path / name).is_file():
            return path / name
    found = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
    raise CheckpointError(f"{path}: no weights file ({', '.join(WEIGHTS_NAMES)}) in this folder"
                          + (f"; pass one of {found} itself" if found else ""))


def read_json(file: Path) -> dict[str, Any]:
    try:
        content = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{file}: not a readable JSON file: {error}") from error
    if not isinstance(content, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(content).__name__}")
    return content


def _read_weights_file(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file}: weights file not found")
    if file.suffix == ".safetensors":
        try:
            return load_file(str(file))
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"{file}: not a readable safetensors file (truncated or corrupted?): "
                                  f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from error
    return state_dict_of(read_checkpoint(file), file)  # pytorch_model.bin: a torch.save'd state dict


def read_weights(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, or of every shard a ``*.index.json`` names (its
    ``weight_map``), under the names in the file."""
    file = Path(file)
    if not file.name.endswith(".index.json"):
        return _read_weights_file(file)
    weight_map = read_json(file).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{file}: no 'weight_map' in this shard index")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(map(str, weight_map.values()))):
        state.update(_read_weights_file(file.parent / shard))
    absent = sorted(k for k in weight_map if k not in state)
    if absent:
        raise CheckpointError(f"{file}: {len(absent)} weight(s) of the index are in none of its shards, "
                              f"e.g. {absent[:3]}")
    return state



def write_atomically(path: Path, write: Callable[[str], None]) -> None:
    try:
        with atomic_path(path) as tmp:
            write(str(tmp))
    except OutputError as error:
        raise CheckpointError(f"{error} (disk full or quota exceeded?)", exit_code=EXIT_FAILED) from error


def prepare_folder(folder: Path) -> None:
    """Creates ``folder``; refuses one holding other weights that transformers would load
    instead of (or together with) ours."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CheckpointError(f"cannot create {folder}: {error}") from error
    others = sorted(p.name for p in folder.iterdir() if p.name != WEIGHTS_NAME and (
        p.name in WEIGHTS_NAMES or p.suffix in (".safetensors", ".bin")))
    if others:
        raise CheckpointError(f"{folder}: already holds other weights {others[:4]} that transformers could load "
                              f"instead of these; write to an empty folder or remove them")


