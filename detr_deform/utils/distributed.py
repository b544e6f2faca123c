"""Process-group set-up for one process, torchrun (single or multi-node) and SLURM.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
Under SLURM without torchrun (``srun python tools/train.py ...``, one task per
GPU) they are derived from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and the
first host of SLURM_JOB_NODELIST. Backend: NCCL on GPUs, gloo on CPU.
"""
from __future__ import annotations

import datetime
import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from detr_deform.utils.device import resolve_device

T = TypeVar("T")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    # Without scontrol: "node[01-04,07],gpu5" -> "node01"
    match = re.match(r"([^,\[]+)(?:\[([0-9]+))?", nodelist)
    return (match.group(1) + (match.group(2) or "")) if match else nodelist


def _slurm_env() -> None:
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    ntasks = int(os.environ.get("SLURM_NTASKS", "1"))
    if ntasks <= 1:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = str(ntasks)
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_ADDR", _first_slurm_host(os.environ.get("SLURM_JOB_NODELIST", "localhost")))
    os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ.get("SLURM_JOB_ID", "0")) % 1000))


def init_distributed(device_name: str = "auto", timeout_s: int = 1800, option: str = "runtime.device") -> DistInfo:
    """Initialises the default process group when launched with several processes.
    ``timeout_s`` bounds every wait: joining the group and every collective (a dead
    rank becomes an error, not a hang)."""
    _slurm_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank, option)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        store = _elastic_attempt_store(world_size, timeout)
        kwargs = {"store": store, "rank": rank, "world_size": world_size} if store is not None else {}
        dist.init_process_group(backend=backend, timeout=timeout, device_id=device if device.type == "cuda" else None,
                                **kwargs)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def _elastic_attempt_store(world_size: int, timeout: datetime.timedelta) -> dist.Store | None:
    """Under torchrun, the elastic agent's store with a namespace of its own for
    this restart attempt. The agent keeps one store across restarts (static and
    c10d rendezvous), so without it a restarted group reads the previous attempt's
    process-group keys — the dead rank's old address — and fails to connect or
    hangs. The workers of one agent share its restart count."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                         timeout=timeout)
    return dist.PrefixStore(f"detr_deform/attempt_{attempt}", base)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if is_initialized() else 1


def broadcast_object(value, src: int = 0):
    if not is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_object(value) -> list:
    """Every rank's ``value``, in rank order (``[value]`` when not distributed)."""
    if not is_initialized():
        return [value]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over ranks, in place (unchanged when not distributed)."""
    if is_initialized():
        dist.all_reduce(tensor)
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true on any rank (every rank gets the same answer)."""
    if not is_initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item() > 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def rank_zero_first(fn: Callable[[], T]) -> T:
    """``fn()`` on each node's local rank 0 first, then (after a barrier) on the other ranks:
    the first downloads into the node's cache, the others read it. Every rank reaches the
    barrier even when the first call fails (the others then fail with the same one line, or
    succeed)."""
    if not is_initialized() or world_size() == 1:
        return fn()
    if int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0:
        try:
            return fn()
        finally:
            barrier()
    barrier()
    return fn()


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean over ranks of a dict of floats (same keys on every rank)."""
    if world_size() == 1 or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    tensor /= dist.get_world_size()
    return dict(zip(keys, tensor.tolist()))


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()
