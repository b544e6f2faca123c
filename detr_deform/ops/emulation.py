"""CPU emulation of the CUDA kernels (a test harness, not an implementation).

``ops/ms_deform_attn/cuda_emulation.cpp`` compiles the CUDA kernels' bodies and
host driver with the normal C++ compiler and runs every (block, thread) of the
real launch configuration on the CPU -- the backward warp by warp, its 32 lanes
in lockstep between the warp sums, which it performs as the shuffles do --
atomics as plain adds, optionally in a shuffled thread (warp and lane) order. It is built and cached like the
operator (``python -m detr_deform.ops build --emulation``) and registers
``torch.ops.detr_deform_emulation.*``. See docs/operator.md, "Testing the CUDA
kernels without a GPU".
"""
from __future__ import annotations

import threading
from typing import NamedTuple

import torch

from detr_deform.ops._build import OpsBuildError, build_and_load_emulation
from detr_deform.ops._checks import check_tensor_arguments

__all__ = [
    "Launch",
    "backward_threads",
    "sort_chunk_entries",
    "trace_start",
    "trace_stop",
    "emulated_backward",
    "emulated_forward",
    "huge_zeros",
    "last_launches",
    "launch_config",
    "load_emulation",
    "OpsBuildError",
]

_lock = threading.Lock()
_loaded = False


class Launch(NamedTuple):
    kernel: str       # forward | backward | gather
    blocks: int
    threads: int      # per block
    bodies: int       # (block, thread) bodies that ran: blocks * threads when every thread ran
    variant: str      # forward: index type and vector width (i32v4, i64v1, ...); backward: lanes per sample (g32)


def load_emulation(trace: bool = False) -> None:
    """Builds (if needed) and loads the harness once per process; raises OpsBuildError on failure.
    ``trace``: the flavour with the global-memory trace (tools/kernel_report.py); whichever flavour
    a process loads first is the one it keeps (both register the same operators)."""
    global _loaded
    with _lock:
        if not _loaded:
            build_and_load_emulation(trace=trace)
            _loaded = True


def trace_start() -> None:
    """Zeroes and starts the global-memory trace (trace flavour only; natural thread order)."""
    load_emulation()
    torch.ops.detr_deform_emulation.trace_start()


def trace_stop() -> dict[str, dict[str, float]]:
    """Stops the trace; per kernel (forward, backward, gather): distinct 32-byte sectors and warp-wide
    memory instructions per kind of access (value_read, grad_value, other_read, other_write), and
    lane-level atomics."""
    load_emulation()
    counts = torch.ops.detr_deform_emulation.trace_stop()
    kinds = ("value_read", "grad_value", "other_read", "other_write")
    out = {}
    for index, kernel in enumerate(("forward", "backward", "gather")):
        block = counts[9 * index: 9 * index + 9]
        out[kernel] = {f"{kind}_sectors": block[i] for i, kind in enumerate(kinds)}
        out[kernel].update({f"{kind}_instructions": block[4 + i] for i, kind in enumerate(kinds)})
        out[kernel]["atomics"] = block[8]
    return out


def _max_blocks(max_blocks: int | None) -> int:
    return 0 if max_blocks is None else int(max_blocks)


def emulated_forward(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                     sampling_locations: torch.Tensor, attention_weights: torch.Tensor, *, shuffle_seed: int = 0,
                     max_blocks: int | None = None, wide_index: bool = False,
                     narrow_vectors: bool = False) -> torch.Tensor:
    """The CUDA forward kernel run on the CPU. ``shuffle_seed`` 0 runs the threads in
    order, any other value in a seeded random order; ``max_blocks`` lowers the
    grid's block cap (default: the real one) so that grid-stride loops iterate;
    ``wide_index`` / ``narrow_vectors`` force the 64-bit-index / one-channel-per-thread
    variant that the driver otherwise picks only when it must."""
    load_emulation()
    check_tensor_arguments(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return torch.ops.detr_deform_emulation.forward(value, spatial_shapes, level_start_index, sampling_locations,
                                                   attention_weights, shuffle_seed, _max_blocks(max_blocks),
                                                   wide_index, narrow_vectors)


def emulated_backward(grad_output: torch.Tensor, value: torch.Tensor, spatial_shapes: torch.Tensor,
                      level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                      attention_weights: torch.Tensor, *, deterministic: bool = False, shuffle_seed: int = 0,
                      max_blocks: int | None = None, wide_keys: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CUDA backward (atomic, or deterministic: keyed samples, sort, gather)
    run on the CPU; returns (grad_value, grad_locations, grad_weights). Like the
    CUDA entry point, it is deterministic also when torch's global deterministic
    mode is on. ``wide_keys`` shrinks the deterministic backward's sort chunks from 2^22 to 62 entries,
    so that small inputs take the path of inputs with more entries than one sort takes."""
    load_emulation()
    check_tensor_arguments(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return torch.ops.detr_deform_emulation.backward(grad_output, value, spatial_shapes, level_start_index,
                                                    sampling_locations, attention_weights, deterministic,
                                                    shuffle_seed, _max_blocks(max_blocks), wide_keys)


def launch_config(work: int, max_blocks: int | None = None) -> tuple[int, int]:
    """(blocks, threads per block) of a launch over ``work`` items, as ms_deform_attn_cuda.cu computes it."""
    load_emulation()
    blocks, threads = torch.ops.detr_deform_emulation.launch_config(work, _max_blocks(max_blocks))
    return blocks, threads


def sort_chunk_entries(wide_keys: bool = False) -> int:
    """Entries per sort of the deterministic backward (2^22; with ``wide_keys``: the emulation's 62)."""
    load_emulation()
    return int(torch.ops.detr_deform_emulation.sort_chunk_entries(wide_keys))


def backward_threads(samples: int, channels: int) -> int:
    """Threads of the backward launch (whole warps, 32 / G samples each), as cuda_kernels.h computes them."""
    load_emulation()
    return int(torch.ops.detr_deform_emulation.backward_threads(samples, channels))


def last_launches() -> list[Launch]:
    """The kernel launches of the last emulated forward/backward call, in order."""
    load_emulation()
    launches = []
    for line in torch.ops.detr_deform_emulation.last_launches().splitlines():
        kernel, blocks, threads, bodies, variant = line.split()
        launches.append(Launch(kernel, int(blocks), int(threads), int(bodies), variant))
    return launches


def huge_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor backed by anonymous mmap(MAP_NORESERVE) memory: pages cost
    nothing until written, so index ranges beyond 2^31 elements can be tested
    with a few MiB. Reading all of it is slow; touch only what you need."""
    load_emulation()
    return torch.ops.detr_deform_emulation.huge_zeros(list(shape), dtype)
