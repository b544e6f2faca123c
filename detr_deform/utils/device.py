"""Which torch device a run or a tool uses."""
from __future__ import annotations

from typing import TYPE_CHECKING

from detr_deform.errors import DetrDeformError

if TYPE_CHECKING:
    import torch


class DeviceError(DetrDeformError, ValueError):
    """The requested device does not exist here; the message names the option and the fix."""


def resolve_device(name: str, local_rank: int = 0, option: str = "runtime.device") -> torch.device:
    """``auto`` (a GPU when one is visible, else the CPU), ``cpu``, ``cuda`` or
    ``cuda:N``. ``option`` names the setting in error messages (``--device`` for
    the tools). Raises DeviceError with one line when the device is not there."""
    import torch  # here, not above: the configuration schema (every --help) imports this module without torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"{option}={name} but no GPU is visible to torch (torch.cuda.is_available() is False); "
                             f"use {option}=cpu or {option}=auto")
        if name == "cuda":
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"{option}={name} but only {torch.cuda.device_count()} GPU(s) are visible")
        return device
    if name == "cpu":
        return torch.device("cpu")
    raise DeviceError(f"{option}={name!r} is not a device: use auto, cpu, cuda or cuda:N")
